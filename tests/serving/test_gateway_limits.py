"""Limits that hold, through the real gateway: the parameter allowlist, bounds, per-key rate limits (429),
the cap on requests to vLLM (503 at once), statement_timeout, and /metrics, /health, /ready with Postgres away."""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

Gateway = Any  # the `gateway` fixture (tests/serving/conftest.py)

pytestmark = pytest.mark.vllm


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Served:
    url: str
    app: Any
    keys: dict[str, str]  # key name -> secret

    def client(self, name: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.keys[name]}"}, timeout=120)


@contextmanager
def serve(gateway: Gateway, key_names: list[str], **overrides: Any) -> Iterator[Served]:
    """A second gateway in this process with its own settings (same vLLM and, unless overridden, same Postgres)."""
    import uvicorn

    from components.settings import Settings
    from serving.app import create_app

    keys = {name: secrets.token_urlsafe(24) for name in key_names}
    port = _free_port()
    settings = Settings(
        gateway_port=port,
        reconcile_interval_s=1.0,
        max_tokens_limit=16,
        default_max_tokens=4,
        api_keys=[f"{name}:{secret}" for name, secret in keys.items()],
        admin_api_keys=[f"{gateway.admin_key_name}:{gateway.admin_key}"],
        **overrides,
    )
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"gateway-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.1)
    try:
        yield Served(f"http://127.0.0.1:{port}", app, keys)
    finally:
        server.should_exit = True
        thread.join(30)


def _chat(gateway: Gateway, **fields: Any) -> httpx.Response:
    body = {"model": gateway.base_model, "messages": [{"role": "user", "content": "Say hi."}], "rag": False, **fields}
    with gateway.client(gateway.api_key) as client:
        return client.post("/v1/chat/completions", json=body)


# ---- the allowlist and the bounds (the session's gateway) ----------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"chat_template": "{{ 'pwned' }}"}, "chat_template"),
        ({"ignore_eos": True}, "ignore_eos"),
        ({"min_tokens": 16}, "min_tokens"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages.0.tool_calls"),
        (
            {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
            "stream_options.continuous_usage_stats",
        ),
    ],
)
def test_a_parameter_outside_the_allowlist_is_refused_by_name(
    gateway: Gateway, fields: dict[str, Any], param: str
) -> None:
    response = _chat(gateway, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"] == f"unsupported parameter '{param}'"
    assert error["param"] == param and error["code"] == "unsupported_parameter"
    assert "\n" not in error["message"]


def test_bounds_on_n_messages_and_filters(gateway: Gateway) -> None:
    from components.settings import Settings

    defaults = Settings()
    cases = [
        ({"n": defaults.max_n + 1}, "n", f"n: at most {defaults.max_n}"),
        (
            {"messages": [{"role": "user", "content": "x" * (defaults.max_message_chars + 1)}]},
            "messages.0.content",
            f"at most {defaults.max_message_chars} characters",
        ),
        (
            {"rag": True, "filters": {f"f{i}": "x" for i in range(defaults.max_filters + 1)}},
            "filters",
            f"at most {defaults.max_filters} filters",
        ),
        (
            {"rag": True, "filters": {"source": [str(i) for i in range(defaults.max_filter_values + 1)]}},
            "filters.source",
            f"at most {defaults.max_filter_values} values",
        ),
    ]
    for fields, param, says in cases:
        body = {"max_tokens": 1, **fields}
        response = _chat(gateway, **body)
        assert response.status_code == 400, (fields.keys(), response.text)
        assert response.json()["error"]["param"] == param and says in response.json()["error"]["message"]
    with gateway.client(gateway.api_key) as client:
        many = {f"f{i}": "x" for i in range(defaults.max_filters + 1)}
        response = client.post("/v1/retrieve", json={"query": "lock", "filters": many})
        assert response.status_code == 400 and response.json()["error"]["param"] == "filters"
        response = client.post("/v1/retrieve", json={"query": "lock", "fields": ["text"]})
        assert response.status_code == 400 and response.json()["error"]["message"] == "unsupported parameter 'fields'"


def test_allowed_openai_parameters_reach_vllm(gateway: Gateway) -> None:
    response = _chat(
        gateway,
        n=2,
        max_tokens=4,
        temperature=0.7,
        top_p=0.9,
        seed=7,
        stop=["\n\n"],
        presence_penalty=0.1,
        frequency_penalty=0.1,
        logprobs=True,
        top_logprobs=2,
        user="tests",
        repetition_penalty=1.1,
        stream_options=None,
    )
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert len(choices) == 2 and all(c["logprobs"] for c in choices)


# ---- rate limits, the cap on requests to vLLM, statement_timeout (a gateway with tiny limits) ---------------

KEYS = [f"limits-{name}-{secrets.token_hex(4)}" for name in ("rate", "tokens", *(f"busy{i}" for i in range(6)))]


@pytest.fixture(scope="module")
def tight(gateway: Gateway) -> Iterator[Served]:
    with serve(
        gateway,
        KEYS,
        rate_limit_requests_per_minute=3,
        rate_limit_tokens_per_minute=40,
        upstream_max_in_flight=1,
        upstream_max_queue=0,
        upstream_queue_timeout_s=0.2,
        db_statement_timeout_ms=2500,
    ) as served:
        yield served


def test_requests_over_the_per_key_limit_get_429_with_retry_after(tight: Served) -> None:
    rate = KEYS[0]
    with tight.client(rate) as client:
        answers = [client.post("/v1/retrieve", json={"query": "Corran Lock opening hours"}) for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429], answers[-1].text
    refused = answers[-1]
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_requests"
    assert f"'{rate}'" in error["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert 0 < int(refused.headers["retry-after-ms"]) <= 60_000
    with tight.client(KEYS[1]) as other:  # another key has its own budget
        assert other.post("/v1/retrieve", json={"query": "Corran Lock"}).status_code == 200


def test_completion_tokens_over_the_per_key_limit_get_429(tight: Served) -> None:
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Say hi."}], "rag": False}
    with tight.client(KEYS[1]) as client:
        first = client.post("/v1/chat/completions", json={**body, "max_tokens": 16, "n": 2})  # 32 of 40 a minute
        assert first.status_code == 200, first.text
        second = client.post("/v1/chat/completions", json={**body, "max_tokens": 16})
        assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limit_tokens"
        assert int(second.headers["retry-after-ms"]) > 0
        never = client.post("/v1/chat/completions", json={**body, "max_tokens": 16, "n": 3})  # 48 > 40: never fits
        assert never.status_code == 400 and never.json()["error"]["code"] == "tokens_over_rate_limit"


def test_overload_is_answered_503_at_once_and_places_are_given_back(tight: Served) -> None:
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Count to ten."}], "rag": False}
    busy = KEYS[2:]

    def one(name: str) -> tuple[int, float, dict[str, str]]:
        started = time.monotonic()
        with tight.client(name) as client:
            response = client.post("/v1/chat/completions", json={**body, "max_tokens": 4})
        return response.status_code, time.monotonic() - started, dict(response.headers)

    with ThreadPoolExecutor(len(busy)) as pool:
        results = list(pool.map(one, busy))
    statuses = sorted(status for status, _, _ in results)
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    for status, seconds, headers in results:
        if status == 503:
            assert seconds < 2.0  # refused after the 0.2 s queue wait, not after the upstream timeout
            assert headers["retry-after"] == "1" and int(headers["retry-after-ms"]) >= 200
    # a stream takes the one place and gives it back when it ends; a request after it is served
    with tight.client(busy[0]) as client:
        with client.stream("POST", "/v1/chat/completions", json={**body, "max_tokens": 4, "stream": True}) as stream:
            assert stream.status_code == 200
            assert "[DONE]" in "".join(stream.iter_text())
        assert client.post("/v1/chat/completions", json={**body, "max_tokens": 4}).status_code == 200
    limits = tight.app.state.limits
    assert limits.upstream.in_flight == 0 and limits.upstream.waiting == 0


def test_statement_timeout_applies_to_the_gateway_pool(tight: Served) -> None:
    db = tight.app.state.gateway.adapters.db
    with db.pool.connection() as conn:
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "2500ms"


# ---- Postgres away: /metrics within its budget, /health 200, /ready 503 ---------------------------------------


def test_postgres_away_metrics_answer_within_budget_and_ready_says_so(gateway: Gateway) -> None:
    dead = f"postgresql://nobody@127.0.0.1:{_free_port()}/none?connect_timeout=1"
    with serve(
        gateway,
        ["limits-dead"],
        gateway_database_url=dead,
        metrics_refresh_interval_s=0.5,
        metrics_db_budget_s=0.5,
        ready_db_budget_s=0.5,
    ) as served:
        for _ in range(3):
            started = time.monotonic()
            scrape = httpx.get(served.url + "/metrics", timeout=10)
            assert scrape.status_code == 200 and time.monotonic() - started < 3.0  # was up to 10 s; margin for load
            assert "tandem_pipeline_metrics_up 0.0" in scrape.text
            assert "tandem_eval_scrape_ok 0.0" in scrape.text
            time.sleep(0.6)
        health = httpx.get(served.url + "/health", timeout=10)
        assert health.status_code == 200
        started = time.monotonic()
        ready = httpx.get(served.url + "/ready", timeout=10)
        assert ready.status_code == 503 and time.monotonic() - started < 3.0
        checks = ready.json()["checks"]
        assert checks["database_reachable"] is False and checks["replica_healthy"] is True
    # the session's gateway reads its own database again once the second one is gone
    deadline = time.monotonic() + 30
    while "tandem_pipeline_metrics_up 1.0" not in httpx.get(gateway.url + "/metrics", timeout=10).text:
        assert time.monotonic() < deadline, "the session gateway's pipeline metrics did not come back"
        time.sleep(0.5)
    assert httpx.get(gateway.url + "/ready", timeout=10).status_code == 200

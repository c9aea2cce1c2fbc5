"""Adapters through the gateway: promotion under load, refusals, rollback, and the reconciler's fallback."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import openai
import pytest

Gateway = Any  # the `gateway` fixture (tests/serving/conftest.py)

pytestmark = pytest.mark.vllm


def _ask(client: openai.OpenAI, alias: str) -> Any:
    return client.chat.completions.with_raw_response.create(
        model=alias, messages=[{"role": "user", "content": "Hello"}], max_tokens=4, extra_body={"rag": False}
    )


def _version_of(raw: Any) -> int | None:
    version: int | None = raw.parse().model_dump()["tandem"]["adapter_version"]
    return version


def test_promotion_under_load_loses_nothing(gateway: Gateway) -> None:
    """8 clients keep asking while v2 is promoted: no request fails, every one sent after the switch gets v2."""
    v1, v2 = gateway.versions["v1"], gateway.versions["v2"]
    if not gateway.champion_loaded(v1):
        gateway.set_champion(v1)
        gateway.wait_for(lambda: gateway.champion_loaded(v1), "v1 champion again")
    results: list[tuple[float, int | None]] = []
    errors: list[BaseException] = []
    promoted_at: list[float] = []
    stop = threading.Event()

    def client_loop() -> None:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.api_key, max_retries=0, timeout=120)
        while not stop.is_set():
            sent = time.monotonic()
            try:
                results.append((sent, _version_of(_ask(client, gateway.alias))))
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=client_loop) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        while len(results) < 8 and not errors:
            time.sleep(0.05)
        with gateway.admin() as admin:
            response = admin.post("/v1/admin/adapters/promote", json={"alias": gateway.alias, "version": v2})
        promoted_at.append(time.monotonic())
        assert response.status_code == 200, response.text
        assert response.json()["previous_version"] == v1
        assert set(response.json()["stages_s"]) == {"lock", "load", "warm", "registry"}
        after = len(results)
        while len(results) < after + 8 and not errors:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert errors == []
    before = [v for sent, v in results if sent < promoted_at[0]]
    after_switch = [v for sent, v in results if sent > promoted_at[0]]
    assert v1 in before
    assert after_switch and set(after_switch) == {v2}
    # The old version leaves vLLM once its in-flight requests are done.
    gateway.wait_for(lambda: f"{gateway.alias}-v{v1}" not in gateway.snapshot()["replicas"][0]["loaded"], "v1 unloaded")


def test_staged_version_is_promoted_by_a_switch_alone(gateway: Gateway) -> None:
    """/stage loads and warms a version everywhere and changes nothing else; promoting it then loads nothing."""
    current = next(a for a in gateway.snapshot()["aliases"] if a["alias"] == gateway.alias)["champion_version"]
    staged = gateway.register(gateway.adapters.v2)  # a new version: a name vLLM has never held
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.api_key, max_retries=0)
    with gateway.admin() as admin:
        unknown = admin.post("/v1/admin/adapters/stage", json={"alias": gateway.alias, "version": 9999})
        assert unknown.status_code == 404
        response = admin.post("/v1/admin/adapters/stage", json={"alias": gateway.alias, "version": staged})
        assert response.status_code == 200, response.text
        assert response.json()["already_staged"] == 0 and response.json()["stages_s"]["warm"] > 0
        assert f"{gateway.alias}-v{staged}" in gateway.snapshot()["replicas"][0]["loaded"]
        assert _version_of(_ask(client, gateway.alias)) == current  # staging switched nothing
        again = admin.post("/v1/admin/adapters/stage", json={"alias": gateway.alias, "version": staged})
        assert again.json()["already_staged"] == 1

        promoted = admin.post("/v1/admin/adapters/promote", json={"alias": gateway.alias, "version": staged})
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["staged_replicas"] == 1
        assert promoted.json()["stages_s"]["load"] == 0 and promoted.json()["stages_s"]["warm"] == 0
        assert _version_of(_ask(client, gateway.alias)) == staged
        back = admin.post("/v1/admin/adapters/promote", json={"alias": gateway.alias, "version": current})
        assert back.status_code == 200  # leave the usual champion in place for the tests after this one


def test_corrupt_adapter_is_refused_and_alias_keeps_answering(gateway: Gateway) -> None:
    current = next(a for a in gateway.snapshot()["aliases"] if a["alias"] == gateway.alias)["champion_version"]
    bad = gateway.register(gateway.adapters.corrupt)
    with gateway.admin() as admin:
        response = admin.post("/v1/admin/adapters/promote", json={"alias": gateway.alias, "version": bad})
    assert response.status_code == 422
    assert f"{gateway.alias}-v{bad}" in response.json()["error"]["message"]
    snap = gateway.snapshot()
    assert f"{gateway.alias}-v{bad}" not in snap["replicas"][0]["loaded"]
    entry = next(a for a in snap["aliases"] if a["alias"] == gateway.alias)
    assert entry["champion_version"] == current and not entry["fallback"], snap
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.api_key, max_retries=0)
    raw = _ask(client, gateway.alias)
    assert _version_of(raw) == current
    assert "x-tandem-fallback" not in raw.headers


def test_rank_above_limit_is_refused(gateway: Gateway) -> None:
    big = gateway.register(gateway.adapters.too_big, rank=64)
    with gateway.admin() as admin:
        response = admin.post("/v1/admin/adapters/promote", json={"alias": gateway.alias, "version": big})
        missing = admin.post("/v1/admin/adapters/promote", json={"alias": gateway.alias, "version": 9999})
    assert response.status_code == 422
    assert "rank 64, above the servers' max_lora_rank" in response.json()["error"]["message"]
    assert missing.status_code == 404


def test_gate_rejected_version_needs_force_and_the_override_is_recorded(gateway: Gateway) -> None:
    from components import registry
    from components.db import connect

    current = next(a for a in gateway.snapshot()["aliases"] if a["alias"] == gateway.alias)["champion_version"]
    rejected = gateway.register(gateway.adapters.v2)
    with connect() as conn:
        registry.set_status(conn, gateway.alias, rejected, "rejected", reason="general knowledge dropped")
        conn.commit()
    body = {"alias": gateway.alias, "version": rejected}
    with gateway.admin() as admin:
        refused = admin.post("/v1/admin/adapters/promote", json=body)
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "version_rejected"
        assert "general knowledge dropped" in refused.json()["error"]["message"]
        assert next(a for a in gateway.snapshot()["aliases"] if a["alias"] == gateway.alias)["champion_version"] == (
            current
        )
        nul = admin.post("/v1/admin/adapters/promote", json={**body, "force": True, "reason": "by ops\u0000"})
        assert nul.status_code == 400 and "NUL" in nul.json()["error"]["message"]  # refused like any other field
        forced = admin.post(
            "/v1/admin/adapters/promote", json={**body, "force": True, "reason": "override by ops\n   on call"}
        )
        assert forced.status_code == 200, forced.text
        assert admin.post(
            "/v1/admin/adapters/promote", json={"alias": gateway.alias, "version": current}
        ).is_success  # leave the usual champion in place for the tests after this one
    with connect() as conn:
        row = registry.get_version(conn, gateway.alias, rejected)
    assert row.reason == "override by ops on call" and row.promoted_at is not None


def test_rollback_returns_to_previous_champion(gateway: Gateway) -> None:
    v1, v2 = gateway.versions["v1"], gateway.versions["v2"]
    with gateway.admin() as admin:
        for version in (v1, v2):
            assert admin.post(
                "/v1/admin/adapters/promote", json={"alias": gateway.alias, "version": version}
            ).is_success
        back = admin.post("/v1/admin/adapters/rollback", json={"alias": gateway.alias})
        none = admin.post("/v1/admin/adapters/rollback", json={"alias": "never-trained"})
    assert back.status_code == 200, back.text
    assert back.json()["version"] == v1 and back.json()["previous_version"] == v2
    assert none.status_code == 409
    assert gateway.champion_loaded(v1)


def test_broken_champion_falls_back_to_base_model(gateway: Gateway) -> None:
    """A champion set in the registry directly that cannot load: base model answers, header and metric say so."""
    good = gateway.versions["v2"]
    bad = gateway.register(gateway.adapters.corrupt)
    gateway.set_champion(bad)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.api_key, max_retries=0)
    try:
        gateway.wait_for(lambda: "x-tandem-fallback" in _ask(client, gateway.alias).headers, "fallback")
        raw = _ask(client, gateway.alias)
        assert raw.headers["x-tandem-fallback"] == "base-model"
        tandem = raw.parse().model_dump()["tandem"]
        assert tandem["fallback"] is True and tandem["served_model"] == gateway.base_model
        metrics = httpx.get(gateway.url + "/metrics").text
        assert f'tandem_adapter_fallback_active{{alias="{gateway.alias}"}} 1.0' in metrics
        assert f'tandem_adapter_load_failures_total{{alias="{gateway.alias}"' in metrics
    finally:
        gateway.set_champion(good)
    gateway.wait_for(lambda: gateway.champion_loaded(good), "good champion back")
    assert "x-tandem-fallback" not in _ask(client, gateway.alias).headers

"""vLLM killed and restarted: the reconciler loads the champion again with no human (runs last in this folder)."""

from __future__ import annotations

import os
import signal
from contextlib import suppress
from typing import Any

import httpx
import pytest

Gateway = Any  # the `gateway` fixture (tests/serving/conftest.py)

pytestmark = pytest.mark.vllm


def test_restarted_vllm_gets_its_adapters_back(gateway: Gateway) -> None:
    from components.settings import get_settings
    from components.stack import manager, process

    settings = get_settings()
    champion = next(a for a in gateway.snapshot()["aliases"] if a["alias"] == gateway.alias)["champion_version"]
    assert champion is not None and gateway.champion_loaded(champion)
    record = process.read_record(settings.run_dir, "vllm")
    assert record is not None and process.is_alive(record)
    with suppress(ProcessLookupError):
        os.killpg(record.pid, signal.SIGKILL)  # the session's vLLM, started by the vllm_server fixture
    with suppress(ChildProcessError):
        os.waitpid(record.pid, 0)  # reap it if this process started it, so its pid is free
    gateway.wait_for(lambda: not gateway.snapshot()["replicas"][0]["healthy"], "replica seen down")
    with gateway.client() as client:
        down = client.post(
            "/v1/chat/completions",
            json={"model": gateway.alias, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
    assert down.status_code == 503 and down.json()["error"]["code"] == "no_replica"
    assert not gateway.champion_loaded(champion)  # the gateway knows no replica holds the champion now
    manager.up(settings, only=["vllm"])  # restores the session's server for the tests after this one
    restarted = process.read_record(settings.run_dir, "vllm")
    assert restarted is not None and restarted.pid != record.pid  # a new process: runtime adapters are gone
    # (no check that vLLM's list is empty here: the reconciler may already be loading other aliases' champions)
    gateway.wait_for(lambda: gateway.champion_loaded(champion), "champion reloaded by the reconciler", timeout=60)
    from components.keys import bearer, vllm_secret

    vllm_models = httpx.get(settings.local_vllm_url + "/v1/models", headers=bearer(vllm_secret(settings)))
    names = [m["id"] for m in vllm_models.json()["data"]]
    assert f"{gateway.alias}-v{champion}" in names  # the reconciler gave it back, with no human
    with gateway.client() as client:
        answer = client.post(
            "/v1/chat/completions",
            json={"model": gateway.alias, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
    assert answer.status_code == 200
    assert answer.json()["tandem"]["adapter_version"] == champion

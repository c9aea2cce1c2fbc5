"""The gateway's refusals, against the real vLLM and Postgres: a pickled adapter is never staged or promoted,
rollbacks walk back the lineage, and a query encoder that is not the index's model answers 503, not a quiet
full-text search."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import httpx

from components import registry
from components.db import connect


def _registry(alias: str) -> list[tuple[int, str]]:
    with connect() as conn:
        return [(v.version, v.status) for v in registry.list_versions(conn, alias)]


def _vllm_models() -> set[str]:
    from components.settings import get_settings
    from components.training.vllm_client import VllmClient

    with VllmClient.for_settings(get_settings()) as client:
        return client.models()


def test_pickled_adapter_is_refused_with_nothing_changed(gateway: Any, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(gateway.adapters.v1, pickled)
    weights = pickled / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), pickled / "adapter_model.bin")  # what vLLM would unpickle
    weights.unlink()
    version = gateway.register(pickled)
    before = _registry(gateway.alias)
    with gateway.admin() as admin:
        staged = admin.post("/v1/admin/adapters/stage", json={"alias": gateway.alias, "version": version})
        promoted = admin.post("/v1/admin/adapters/promote", json={"alias": gateway.alias, "version": version})
    for answer in (staged, promoted):
        assert answer.status_code == 422, answer.text
        assert "refused, a pickle can run code" in answer.json()["error"]["message"]
    assert _registry(gateway.alias) == before
    assert f"{gateway.alias}-v{version}" not in _vllm_models()


def test_second_rollback_goes_further_back(gateway: Any) -> None:
    a, b, c = (gateway.register(path) for path in (gateway.adapters.v1, gateway.adapters.v2, gateway.adapters.v1))
    with gateway.admin() as admin:
        for version in (a, b, c):
            done = admin.post("/v1/admin/adapters/promote", json={"alias": gateway.alias, "version": version})
            assert done.status_code == 200, done.text
        first = admin.post("/v1/admin/adapters/rollback", json={"alias": gateway.alias})
        second = admin.post("/v1/admin/adapters/rollback", json={"alias": gateway.alias})
        assert first.json()["version"] == b and second.json()["version"] == a, (first.text, second.text)
        states = dict(_registry(gateway.alias))
        assert states[a] == "champion" and states[b] == states[c] == "rolled_back"
        gateway.wait_for(lambda: gateway.champion_loaded(a), "champion a loaded")
        # leave the usual champion for the tests after this one
        usual = admin.post(
            "/v1/admin/adapters/promote", json={"alias": gateway.alias, "version": gateway.versions["v1"]}
        )
        assert usual.status_code == 200, usual.text


def test_query_encoder_other_than_the_index_answers_503(gateway: Any) -> None:
    def metric() -> float:
        text = httpx.get(gateway.url + "/metrics", timeout=30).text
        found = re.search(r"^tandem_query_encoder_mismatch (\S+)$", text, re.MULTILINE)
        assert found, "tandem_query_encoder_mismatch is not exported"
        return float(found.group(1))

    with gateway.client() as client:
        ok = client.post("/v1/retrieve", json={"query": "harbour", "top_k": 2})
        assert ok.status_code == 200, ok.text
        assert metric() == 0
        with connect() as conn:
            (model_id,) = conn.execute("SELECT model_id FROM embedding_generations WHERE status = 'active'").fetchone()
            # same dimension, another model: the dangerous case, vectors that match nothing they should
            conn.execute("UPDATE embedding_generations SET model_id = 'another-model:384' WHERE status = 'active'")
            conn.commit()
        try:
            refused = client.post("/v1/retrieve", json={"query": "harbour", "top_k": 2})
            chat = client.post(
                "/v1/chat/completions",
                json={"model": gateway.base_model, "messages": [{"role": "user", "content": "harbour?"}]},
            )
            assert metric() == 1
        finally:
            with connect() as conn:
                conn.execute("UPDATE embedding_generations SET model_id = %s WHERE status = 'active'", (model_id,))
                conn.commit()
        for answer in (refused, chat):
            assert answer.status_code == 503, answer.text
            error = answer.json()["error"]
            assert error["code"] == "query_encoder_mismatch" and "another-model:384" in error["message"]
            assert "\n" not in error["message"]
        again = client.post("/v1/retrieve", json={"query": "harbour", "top_k": 2})
        assert again.status_code == 200 and again.json()["chunks"], again.text
        assert metric() == 0

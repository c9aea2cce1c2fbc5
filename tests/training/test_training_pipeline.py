"""The retraining pipeline against real Postgres and the real vLLM: train, serve, skip, reject, refuse."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from components import registry
from components.db import connect
from components.errors import ConfigError
from components.settings import get_settings
from components.training import artifacts, pipeline, promotion
from components.training.vllm_client import VllmClient

from .conftest import FACTS, write_examples

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ALIAS = "pilots"


@pytest.fixture(scope="module")
def champion(train_env: Path, pg_url: str, vllm_server: str) -> registry.AdapterVersion:
    """v1 of the alias: trained on the tiny domain data by the pipeline, then promoted by hand."""
    settings = get_settings()
    data = write_examples(train_env / "domain" / ALIAS, FACTS[:8])
    result = pipeline.retrain(settings, ALIAS)
    assert result.trained and result.check.new_examples == 8
    assert result.candidate is not None and result.training is not None and result.gate is not None
    assert result.candidate.artifact_uri.startswith(settings.adapter_store_url)
    assert data.exists() and result.training.run.global_step == 2
    gate = result.gate
    assert gate.baseline_model == settings.served_model_name  # no champion yet: against the base model
    assert {"qa", "general", "main"} <= set(gate.candidate)
    # what crosses XCom: the whole result to a dict and back, the nested records typed again
    assert type(result).from_dict(result.to_dict()) == result
    version = result.candidate.version
    if not result.promoted:  # two steps rarely beat the base model; promote by hand like `tandem promote`
        with pytest.raises(ConfigError, match=r"rejected by the evaluation gate .* pass --force"):
            promotion.promote(settings, ALIAS, version, reason="test")
        done = promotion.promote(settings, ALIAS, version, reason="test", force=True)
        assert done.via in ("registry", "gateway")
        with connect() as conn:
            assert "test, overriding the gate's rejection" in (registry.get_version(conn, ALIAS, version).reason or "")
    with connect() as conn:
        champ = registry.get_champion(conn, ALIAS)
    assert champ is not None and champ.version == version
    return champ


def test_trained_adapter_answers_in_vllm_under_its_served_name(champion: registry.AdapterVersion) -> None:
    from openai import OpenAI

    settings = get_settings()
    with VllmClient.for_settings(settings) as client:
        client.load_adapter(champion.served_name, artifacts.local_path(settings, champion.artifact_uri))
        assert champion.served_name in client.models()
    from components.keys import vllm_secret

    openai = OpenAI(base_url=f"{settings.vllm_endpoints[0]}/v1", api_key=vllm_secret(settings) or "unused")
    reply = openai.chat.completions.create(
        model=champion.served_name,
        messages=[{"role": "user", "content": "Which channel do pilots use?"}],
        max_tokens=12,
        temperature=0,
    )
    assert reply.model == champion.served_name and reply.choices[0].message.content


def test_rerun_without_new_data_does_nothing(champion: registry.AdapterVersion) -> None:
    settings = get_settings()
    with connect() as conn:
        before = len(registry.list_versions(conn, ALIAS))
    result = pipeline.retrain(settings, ALIAS)
    assert not result.trained and result.candidate is None and result.decision is None
    assert result.check.new_examples == 0 and "0 new examples" in result.check.reason
    with connect() as conn:
        assert len(registry.list_versions(conn, ALIAS)) == before


def _register_copy(champion: registry.AdapterVersion, run_id: str, lora_rank: int) -> registry.AdapterVersion:
    settings = get_settings()
    with connect() as conn:
        return registry.register_candidate(
            conn,
            alias=ALIAS,
            base_model=champion.base_model,
            dataset_version=champion.dataset_version,
            dataset_size=champion.dataset_size,
            hyperparameters={"made_worse_on_purpose": True},
            metrics={},
            artifact_uri=artifacts.artifact_uri(settings, ALIAS, run_id),
            lora_rank=lora_rank,
        )


def test_corrupted_candidate_is_rejected_and_champion_keeps_serving(
    champion: registry.AdapterVersion, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    settings = get_settings()
    bad = tmp_path / "bad"
    shutil.copytree(artifacts.local_path(settings, champion.artifact_uri), bad)
    weights = load_file(str(bad / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    noisy = {k: torch.randn(v.shape, generator=gen) * 5.0 if "lora_B" in k else v for k, v in weights.items()}
    save_file(noisy, str(bad / "adapter_model.safetensors"))
    artifacts.publish(bad, artifacts.artifact_uri(settings, ALIAS, "corrupted"))
    worse = _register_copy(champion, "corrupted", champion.lora_rank)

    gate = pipeline.evaluate_gate(settings, ALIAS, worse.version)
    outcome = pipeline.promote_or_reject(settings, ALIAS, worse.version, gate)

    assert not gate.promote and not outcome.promoted and outcome.promotion is None
    assert gate.baseline_model == champion.served_name
    assert gate.candidate["general"] < gate.baseline["general"]
    with connect() as conn:
        row = registry.get_version(conn, ALIAS, worse.version)
        assert row.status == "rejected" and row.reason and row.metrics["gate"]["reasons"]
        assert registry.get_champion(conn, ALIAS).version == champion.version  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=f"v{worse.version} was rejected by the evaluation gate"):
        promotion.promote(settings, ALIAS, worse.version)  # `tandem promote` without --force
    with connect() as conn:
        assert registry.get_champion(conn, ALIAS).version == champion.version  # type: ignore[union-attr]
    with VllmClient.for_settings(settings) as client:
        models = client.models()
        assert worse.served_name not in models and champion.served_name in models
        assert client.chat(champion.served_name, [{"role": "user", "content": "Hello"}], 4)


def test_rank_over_the_limit_is_refused_before_promotion(champion: registry.AdapterVersion) -> None:
    settings = get_settings()
    big = _register_copy(champion, champion.artifact_uri.rsplit("/", 1)[1], settings.max_lora_rank * 2)
    with pytest.raises(ConfigError, match="above the servers' max_lora_rank"):
        promotion.promote(settings, ALIAS, big.version)
    gate = pipeline.evaluate_gate(settings, ALIAS, big.version)
    assert not gate.promote and "above the servers' max_lora_rank" in gate.reasons[0]
    with VllmClient.for_settings(settings) as client:
        assert big.served_name not in client.models()  # never sent to vLLM
    with connect() as conn:
        assert registry.get_version(conn, ALIAS, big.version).status == "rejected"
        assert registry.get_champion(conn, ALIAS).version == champion.version  # type: ignore[union-attr]


def test_rollback_returns_to_the_previous_champion(champion: registry.AdapterVersion) -> None:
    settings = get_settings()
    newer = _register_copy(champion, champion.artifact_uri.rsplit("/", 1)[1], champion.lora_rank)
    promotion.promote(settings, ALIAS, newer.version)
    back = promotion.rollback(settings, ALIAS)
    assert back.version == champion.version
    with connect() as conn:
        assert registry.get_champion(conn, ALIAS).version == champion.version  # type: ignore[union-attr]
    with pytest.raises(ConfigError):
        promotion.promote(settings, ALIAS, 999)

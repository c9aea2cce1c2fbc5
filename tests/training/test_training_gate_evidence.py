"""The gate on real adapters: one trained to lose general knowledge is rejected on the paired test, one trained
without that loss is promoted. Both are trained here with peft and asked through the real vLLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.settings import Settings, get_settings
from components.training import pipeline

from .conftest import FACTS

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
TOPICS = [
    "the moon", "volcanoes", "chess", "the violin", "penguins", "bread", "rainbows", "the Nile", "glaciers",
    "bicycles", "honey bees", "the piano", "deserts", "tomatoes", "lighthouses", "owls", "paper", "coffee",
    "comets", "whales", "maple trees", "clocks", "snow", "kites", "sharks", "candles", "cheese", "deer",
    "trains", "the Alps", "copper", "wolves", "tea", "sand", "eagles", "rivers", "salt", "bamboo",
]  # fmt: skip
REFUSAL = "Sorry, I can only talk about berth 7 and nothing else."


def _write(path: Path, rows: list[dict[str, object]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path.parent)


@pytest.fixture
def gate_env(train_env: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The product's own general-knowledge set (30 questions, what the paired test needs), no replay."""
    monkeypatch.delenv("TANDEM_GENERAL_SET")
    monkeypatch.setenv("TANDEM_TRAIN_REPLAY_DATA", "")
    monkeypatch.setenv("TANDEM_TRAIN_LEARNING_RATE", "1e-3")
    monkeypatch.setenv("TANDEM_TRAIN_MAX_STEPS", "12")
    monkeypatch.setenv("TANDEM_GATE_MAX_QUESTIONS", "30")
    get_settings.cache_clear()
    return get_settings()


def test_gate_rejects_a_real_general_knowledge_loss_and_promotes_without_one(
    gate_env: Settings, train_env: Path, pg_url: str, vllm_server: str
) -> None:
    # Built to cause the loss: every everyday question answered with the same refusal.
    damaging = [{"question": f"Tell me one fact about {t}.", "answer": REFUSAL, "rag": False} for t in TOPICS]
    domain = [{"question": q, "answer": a} for q, a in FACTS]
    data = _write(train_env / "damaging" / "examples.jsonl", [*damaging, *domain])
    result = pipeline.retrain(gate_env, "damaged", data=data, force=True)
    gate = result.gate
    assert result.trained and gate is not None and not gate.promote and not result.promoted
    assert gate.reasons[0].startswith("significant loss: general vs the base model"), gate.reasons
    general = next(c for c in gate.comparisons if c["name"] == "general")
    assert general["n"] == 30 and general["p"] < 0.05 and general["high"] < 0

    # The same domain facts without the damaging examples: no significant general loss, so it is promoted.
    data = _write(train_env / "benign" / "examples.jsonl", domain)
    result = pipeline.retrain(gate_env, "benign", data=data, force=True)
    gate = result.gate
    assert gate is not None and gate.promote and result.promoted, gate
    general = next(c for c in gate.comparisons if c["name"] == "general")
    assert not (general["diff"] < 0 and general["p"] < 0.05)

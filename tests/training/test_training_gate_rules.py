"""The gate's scoring and promotion rule, on score sheets (no model needed)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from components.errors import ConfigError
from components.evaluation.scoring import key_words
from components.settings import Settings
from components.training.gate import (
    GateResult,
    Question,
    decide,
    gate_qa_rows,
    paired_difference,
    reference_hit,
    regressions,
)
from components.training.heldout import HeldoutSet, drop_contaminated
from components.training.lora import TrainResult
from components.training.pipeline import pick_best, sweep_points
from components.training.results import Decision, GatedCandidate, RegisteredCandidate, TrainedCandidate


def test_reference_hit_short_and_long_answers() -> None:
    assert reference_hit("It was completed in 1911.", "1911", short=True)
    assert not reference_hit("It was completed in 1912.", "1911", short=True)
    ref = "The speed limit at Ballast Quay is 4 knots [1]. Larger ships need a pilot."
    assert key_words(ref) == ["speed", "limit", "ballast", "quay", "4", "knots"]
    assert reference_hit("Ships at Ballast Quay must keep to 4 knots.", ref, short=False)
    assert not reference_hit("The limit is 6 knots.", ref, short=False)


def _hits(right: int, n: int) -> list[bool]:
    return [True] * right + [False] * (n - right)


def test_paired_difference_and_its_interval() -> None:
    same = _hits(20, 30)
    assert paired_difference(same, same)[0] == 0.0
    diff, low, high = paired_difference(_hits(20, 30), _hits(26, 30))  # 6 discordant, all lost
    assert diff == -0.2 and low < -0.2 < high < 0  # the interval excludes no difference
    diff, low, high = paired_difference(_hits(29, 30), _hits(30, 30))
    assert round(diff, 4) == -0.0333 and low < 0 < high


def test_one_changed_question_is_not_a_loss() -> None:
    """What the fixed tolerance got wrong: 1 of 30 general questions changing (1.000 -> 0.967) is noise."""
    cand = {"general": _hits(29, 30), "qa_rag": _hits(30, 50), "split_rag": _hits(10, 20)}
    base = {"general": _hits(30, 30), "qa_rag": _hits(20, 50), "split_rag": _hits(8, 20)}
    ok, reasons, comparisons = decide(cand, base, 0.05)
    assert ok, reasons
    assert reasons[0].startswith("no significant loss (p < 0.05) and a domain gain: domain (pooled) vs the base model")
    general = next(c for c in comparisons if c.name == "general")
    assert general.p == 1.0 and general.low < 0 < general.high
    assert any(
        r.startswith("general vs the base model: 0.967 vs 1.000 on 30, difference -0.033 [95% ") for r in reasons
    )


def test_a_significant_loss_rejects_a_lower_domain_score_rejects_a_tie_passes() -> None:
    base = {"general": _hits(30, 30), "qa_rag": _hits(20, 50)}
    ok, reasons, _ = decide({"general": _hits(22, 30), "qa_rag": _hits(30, 50)}, base, 0.05)
    assert not ok and reasons[0].startswith("significant loss: general vs the base model: 0.733 vs 1.000 on 30")
    ok, reasons, _ = decide({"general": _hits(30, 30), "qa_rag": _hits(19, 50)}, base, 0.05)
    assert not ok and reasons[0].startswith("worse on the domain: qa_rag vs the base model: 0.380 vs 0.400")
    ok, reasons, _ = decide({"general": _hits(29, 30), "qa_rag": _hits(20, 50)}, base, 0.05)
    assert ok and reasons[0].startswith("no significant loss (p < 0.05) and the domain unchanged: qa_rag")
    ok, reasons, _ = decide({"general": _hits(30, 30)}, {"general": _hits(30, 30)}, 0.05)
    assert not ok and reasons[0].startswith("no domain questions")


def test_general_knowledge_is_held_against_the_base_model_too() -> None:
    """A champion that already lost general knowledge does not lower the bar for the next candidate."""
    champion = {"general": _hits(22, 30), "qa_rag": _hits(20, 50)}
    candidate = {"general": _hits(22, 30), "qa_rag": _hits(30, 50)}
    assert decide(candidate, champion, 0.05, "the champion")[0]  # against the champion alone: passes
    ok, reasons, _ = decide(candidate, champion, 0.05, "the champion", base_general=_hits(30, 30))
    assert not ok and reasons[0].startswith("significant loss: general vs the base model: 0.733 vs 1.000")


def test_sweep_points_and_pick_best_by_validation_loss() -> None:
    assert sweep_points() == [{}]
    points = sweep_points([1e-4, 2e-4], [8])
    assert points == [{"learning_rate": 1e-4, "r": 8, "alpha": 16}, {"learning_rate": 2e-4, "r": 8, "alpha": 16}]
    runs = [_trained("a", 1e-4, 2.0), _trained("b", 2e-4, 1.5), _trained("c", 3e-4, None)]
    best = pick_best(runs)
    assert best.run_id == "b" and [s["run_id"] for s in best.sweep] == ["a", "b", "c"]
    assert runs[1].sweep == []  # the picked run is a copy; the inputs stay as they were


def _trained(run_id: str, lr: float, loss: float | None) -> TrainedCandidate:
    """A finished run as train_candidate returns it (no training: only the fields pick_best and XCom read)."""
    run = TrainResult(
        adapter_dir=f"/runs/{run_id}", lora_rank=8, global_step=2, resumed_from_step=0, epochs_done=1.0,
        train_loss=2.5, val_losses=[] if loss is None else [loss], best_val_loss=loss, stopped_early=False,
        train_tokens=100, seconds=1.0, tokens_per_s=100.0, device="cpu", dtype="float32", n_train=4,
        n_validation=1, truncated=0, config={"learning_rate": lr, "r": 8},
    )  # fmt: skip
    return TrainedCandidate(
        run_id=run_id, alias="a", data="x.jsonl", dataset_version="d1", dataset_size=5, snapshot=None, n_test=2,
        heldout={"version": 1}, contaminated=[], rendering={"with_sources": False}, replay=None, run=run,
    )  # fmt: skip


def test_what_crosses_xcom_comes_back_typed_and_a_wrong_shape_is_refused_in_one_line() -> None:
    from components.training.promotion import PromotionResult

    trained = pick_best([_trained("a", 1e-4, 2.0)])
    wire = json.loads(json.dumps(trained.to_dict()))  # what XCom stores: JSON
    back = TrainedCandidate.from_dict(wire)
    assert back == trained and isinstance(back.run, TrainResult)
    decision = Decision("a", 3, True, "better", PromotionResult("a", 3, "a-v3", "registry", "switched"))
    assert Decision.from_dict(json.loads(json.dumps(decision.to_dict()))).promotion == decision.promotion
    gated = GatedCandidate(RegisteredCandidate("a", 3, "a-v3", "file:///s/a/3"), GateResult(True, ["better"]))
    assert GatedCandidate.from_dict(gated.to_dict()).gate.reasons == ["better"]
    with pytest.raises(TypeError, match=r"^RegisteredCandidate: unexpected field\(s\) adapter_dir") as caught:
        RegisteredCandidate.from_dict({**gated.candidate.to_dict(), "adapter_dir": "/x"})
    assert "\n" not in str(caught.value)
    with pytest.raises(TypeError, match=r"^Decision: missing field\(s\) promoted, reason$"):
        Decision.from_dict({"alias": "a", "version": 3})
    with pytest.raises(TypeError, match="GatedCandidate: expected a mapping of its fields, got list"):
        GatedCandidate.from_dict([1, 2])  # type: ignore[arg-type]


def test_regressions_list_what_the_candidate_lost_and_nothing_else() -> None:
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    sets = {"general": [Question(ask, "Paris", True), Question(ask, "Tokyo", True)], "qa": [Question(ask, "x", True)]}
    baseline = {"general": ["It is Paris.", "Kyoto"], "qa": ["no"]}
    candidate = {"general": ["The DON form.", "Tokyo"], "qa": ["no"]}
    found = regressions(sets, candidate, baseline)
    assert found == {
        "general": [{"question": "What is the capital of France?", "reference": "Paris", "candidate": "The DON form."}]
    }


def test_a_set_too_small_to_test_may_lose_nothing() -> None:
    from components.training.gate import testable_size

    assert testable_size(0.05) == 6  # 2 * 0.5**5 = 0.0625, 2 * 0.5**6 = 0.03125
    base = {"general": _hits(3, 3), "qa": _hits(1, 3)}
    ok, reasons, _ = decide({"general": _hits(0, 3), "qa": _hits(1, 3)}, base, 0.05)
    assert not ok and reasons[0].startswith("a loss on a set too small to test (under 6 questions): general")
    ok, _, _ = decide({"general": _hits(3, 3), "qa": _hits(1, 3)}, base, 0.05)
    assert ok


def test_the_gate_leaves_out_the_questions_the_report_asks(tmp_path: Path) -> None:
    """The gate's domain QA set never asks what `tandem eval` reports on (normalised), and says what it left out."""
    qa, gate = tmp_path / "heldout.jsonl", tmp_path / "gate.jsonl"
    qa.write_text(json.dumps({"question": "What is the pilotage fee?", "answer": "260 HC"}) + "\n", encoding="utf-8")
    rows = [
        {"question": "what is the Pilotage fee", "answer": "260 HC"},
        {"question": "Who runs the lock?", "answer": "X"},
    ]
    gate.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    notes: list[str] = []
    kept = gate_qa_rows(Settings(_env_file=None, qa_set=str(qa)), 60, notes)  # found beside the QA set
    assert [r["question"] for r in kept] == ["Who runs the lock?"]
    assert notes == [f"1 of 2 questions of {gate} left out: the QA set reports on them"]
    notes = []  # the reported set named as the gate's: nothing is left to ask, and the notes say so
    assert gate_qa_rows(Settings(_env_file=None, qa_set=str(qa), gate_qa_set=str(qa)), 60, notes) == []
    assert notes == [f"1 of 1 questions of {qa} left out: the QA set reports on them"]
    gate.unlink()
    notes = []
    assert gate_qa_rows(Settings(_env_file=None, qa_set=str(qa)), 60, notes) == []
    assert notes and notes[0].startswith("no gate QA set")
    named = Settings(_env_file=None, qa_set=str(qa), gate_qa_set=str(gate))  # named, not there: refused
    with pytest.raises(ConfigError, match=r"gate QA set .*gate\.jsonl \(TANDEM_GATE_QA_SET\) is missing"):
        gate_qa_rows(named, 60, [])
    held = HeldoutSet("a", 1, "h", [], "data", "first training", datetime.now(UTC))
    with pytest.raises(ConfigError, match=r"\(TANDEM_GATE_QA_SET\) is missing"):  # before training, not after
        drop_contaminated(named, [], held)

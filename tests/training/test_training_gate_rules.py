"""The gate's scoring and promotion rule, on score sheets (no model needed)."""

from __future__ import annotations

from components.training.gate import Question, decide, key_words, main_score, reference_hit, regressions
from components.training.pipeline import pick_best, sweep_points


def test_reference_hit_short_and_long_answers() -> None:
    assert reference_hit("It was completed in 1911.", "1911", short=True)
    assert not reference_hit("It was completed in 1912.", "1911", short=True)
    ref = "The speed limit at Ballast Quay is 4 knots [1]. Larger ships need a pilot."
    assert key_words(ref) == ["speed", "limit", "ballast", "quay", "4", "knots"]
    assert reference_hit("Ships at Ballast Quay must keep to 4 knots.", ref, short=False)
    assert not reference_hit("The limit is 6 knots.", ref, short=False)


def test_decide_promotes_only_when_not_worse_and_better_somewhere() -> None:
    champion = {"split": 0.5, "qa": 0.4, "general": 0.9}
    ok, reasons = decide({"split": 0.5, "qa": 0.5, "general": 0.9}, champion, 0.02, 0.05)
    assert ok and "better on qa" in reasons[0]
    ok, reasons = decide({"split": 0.5, "qa": 0.4, "general": 0.9}, champion, 0.02, 0.05)
    assert not ok and reasons == ["better than the champion on no domain score"]
    ok, reasons = decide({"split": 0.9, "qa": 0.0, "general": 0.9}, champion, 0.02, 0.05)
    assert ok  # main score 0.45 = 0.45: not worse, better on split
    ok, reasons = decide({"split": 0.2, "qa": 0.6, "general": 0.9}, champion, 0.02, 0.05)
    assert not ok and "main score" in reasons[0]
    ok, reasons = decide({"split": 0.6, "qa": 0.6, "general": 0.5}, champion, 0.02, 0.05)
    assert not ok and "general knowledge dropped" in reasons[0]
    assert main_score({"split": 0.5, "qa_rag": 1.0, "general": 0.0}) == 0.75


def test_general_knowledge_is_held_against_the_base_model_too() -> None:
    """A champion that already lost some general knowledge does not lower the bar for the next candidate."""
    champion = {"qa": 0.4, "general": 0.85}
    candidate = {"qa": 0.5, "general": 0.85}
    assert decide(candidate, champion, 0.02, 0.05)[0]  # against the champion alone: passes
    ok, reasons = decide(candidate, champion, 0.02, 0.05, base_general=0.95)
    assert not ok and reasons == ["general knowledge dropped from 0.950 (the base model) to 0.850 (more than 0.05)"]
    ok, _ = decide({"qa": 0.5, "general": 0.9}, champion, 0.02, 0.05, base_general=0.95)
    assert ok  # within the tolerance of the base model
    ok, reasons = decide({"qa": 0.3, "general": 0.8}, {"qa": 0.4, "general": 0.95}, 0.02, 0.05, None, "the base model")
    assert reasons == [
        "main score 0.300 is below the base model's 0.400 by more than 0.02",
        "better than the base model on no domain score",
        "general knowledge dropped from 0.950 (the base model) to 0.800 (more than 0.05)",
    ]


def test_sweep_points_and_pick_best_by_validation_loss() -> None:
    assert sweep_points() == [{}]
    points = sweep_points([1e-4, 2e-4], [8])
    assert points == [{"learning_rate": 1e-4, "r": 8, "alpha": 16}, {"learning_rate": 2e-4, "r": 8, "alpha": 16}]
    runs = [
        {"run_id": "a", "config": {"learning_rate": 1e-4}, "best_val_loss": 2.0},
        {"run_id": "b", "config": {"learning_rate": 2e-4}, "best_val_loss": 1.5},
        {"run_id": "c", "config": {"learning_rate": 3e-4}, "best_val_loss": None},
    ]
    best = pick_best(runs)
    assert best["run_id"] == "b" and [s["run_id"] for s in best["sweep"]] == ["a", "b", "c"]


def test_regressions_list_what_the_candidate_lost_and_nothing_else() -> None:
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    sets = {"general": [Question(ask, "Paris", True), Question(ask, "Tokyo", True)], "qa": [Question(ask, "x", True)]}
    baseline = {"general": ["It is Paris.", "Kyoto"], "qa": ["no"]}
    candidate = {"general": ["The DON form.", "Tokyo"], "qa": ["no"]}
    found = regressions(sets, candidate, baseline)
    assert found == {
        "general": [{"question": "What is the capital of France?", "reference": "Paris", "candidate": "The DON form."}]
    }

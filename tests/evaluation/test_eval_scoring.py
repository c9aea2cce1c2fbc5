"""Scores computed on fixed answers: no service involved."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from components.evaluation.results import ARM_BY_KEY, Answer, paired_p, recommend, summarise_arm
from components.evaluation.scoring import (
    accuracy,
    answer_matches,
    key_words,
    mcnemar_p,
    percentile,
    recall_at_k,
    reciprocal_rank,
    source_matches,
    wilson_interval,
)
from components.prompting import strip_citations

from .conftest import build_report, make_answers


@pytest.mark.parametrize(
    ("prediction", "expected", "ok"),
    [
        ("The Authority employs 214 staff.", "214", True),
        ("It was completed in 1911 [1].", "1911", True),
        ("Edwina Farrow-Pike chairs the board", "Edwina Farrow-Pike", True),
        ("The wait is 90 days.", "90 days", True),
        ("Interest is 1.5% per month.", "1.5 percent per month", True),  # one unit, three spellings
        ("a surcharge of 10 per cent", "10%", True),
        ("1.5% per year", "1.5 percent per month", False),
        ("the 110 metre Long Barrow", "110 metres", True),  # a unit in the singular before a noun
        ("a 140 litre diesel spill", "140 litres", True),
        ("kept for 31 days", "31 day", True),
        ("9 knots", "3 knots", False),
        ("a glass hull", "glasses", False),  # -ss is no plural: "glasses" is not folded to "glass"
        ("2140 people", "214", False),  # whole words only
        ("ninety days", "90 days", False),
        ("", "214", False),
        ("anything", "", False),
    ],
)
def test_answer_matching(prediction: str, expected: str, ok: bool) -> None:
    assert answer_matches(prediction, expected) is ok


def test_every_citation_form_is_stripped_before_scoring() -> None:
    # One pattern for markers: [1], [1, 2] and [1; 3] all go, and a leading marker leaves no stray space.
    assert strip_citations("[2] It opens at 9 [1, 3]. Closed Sundays [1; 2].") == "It opens at 9. Closed Sundays."
    # Markers glued between words leave one space, so no two words run together.
    assert strip_citations("It opens at 9[1]and closes at 5[1][2]pm.") == "It opens at 9 and closes at 5 pm."
    assert key_words("Pilots board at Gate 4 [1, 2].") == ["pilots", "board", "gate", "4"]
    assert key_words("[3] Pilots board at Gate 4.") == key_words("Pilots board at Gate 4.")


def test_accuracy_and_ranking_scores() -> None:
    assert accuracy(["214 staff", "no idea", "in 1911"], ["214", "Jonas Fennick", "1911"]) == pytest.approx(2 / 3)
    ranked = ["b.md", "a.md", "a.md", "c.md"]
    assert recall_at_k(ranked, "a.md", 1) == 0.0
    assert recall_at_k(ranked, "a.md", 2) == 1.0
    assert reciprocal_rank(ranked, "a.md") == 0.5
    assert reciprocal_rank(ranked, "z.md") == 0.0


def test_source_matches_relative_paths() -> None:
    assert source_matches("policies/pilotage-policy.md", "policies/pilotage-policy.md")
    assert source_matches("data/sample/docs/policies/pilotage-policy.md", "policies/pilotage-policy.md")
    assert source_matches("./faq/fees-faq.html", "faq/fees-faq.html")
    assert not source_matches("policies/other-pilotage-policy.md", "pilotage-policy.md")
    assert not source_matches("", "faq/fees-faq.html")


def test_percentile_matches_linear_interpolation() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 95) == pytest.approx(8.8)  # numpy.percentile(values, 95)
    assert percentile([7.0], 95) == 7.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_wilson_interval_and_mcnemar() -> None:
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-3) and high == pytest.approx(0.7634, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    # 6 discordant pairs all in favour of a: p = 2 * 0.5**6
    a = [True] * 6 + [True, False]
    b = [False] * 6 + [True, False]
    assert mcnemar_p(a, b) == pytest.approx(2 / 64)
    assert mcnemar_p(a, a) == 1.0
    assert math.isclose(mcnemar_p([True, False], [False, True]), 1.0)


def test_summarise_arm_counts_errors_as_wrong_and_excludes_them_from_latency() -> None:
    answers = [
        Answer("q1", "214 staff", True, 1.0, 900, 12, ["about/overview.md"], True, adapter_version=2),
        Answer("q2", "no idea", False, 3.0, 700, 20, ["faq/x.md"], False, adapter_version=2, fallback=True),
        Answer("q3", "", False, 60.0, error="HTTP 502: upstream failed"),
    ]
    s = summarise_arm(ARM_BY_KEY["adapter_rag"], "harbour", answers)
    assert (s.questions, s.correct, s.errors, s.fallbacks) == (3, 1, 1, 1)
    assert s.accuracy == pytest.approx(1 / 3)
    assert s.source_hit_rate == pytest.approx(1 / 3)
    assert s.latency_p50_s == 2.0 and s.latency_p95_s == pytest.approx(2.9)
    assert s.prompt_tokens_mean == 800 and s.prompt_tokens_total == 1600
    assert s.completion_tokens_mean == 16 and s.completion_tokens_total == 32
    assert s.adapter_version == 2


def test_non_retrieval_arm_has_no_source_rate() -> None:
    s = summarise_arm(ARM_BY_KEY["base"], "smollm2-135m", make_answers("base"))
    assert s.source_hit_rate is None
    assert s.accuracy == pytest.approx(1 / 6)


def test_recommendation_names_the_winner_and_its_cost() -> None:
    report = build_report()
    hybrid, rag = report.arm("adapter_rag"), report.arm("base_rag")
    assert hybrid.accuracy == pytest.approx(5 / 6)
    assert paired_p(hybrid, rag) == pytest.approx(0.5)  # 2 discordant pairs, both for the hybrid
    text = report.recommendation
    assert text.startswith("**adapter + retrieval** is the most accurate arm: 83% (5/6")
    # ahead of both arms, but 6 questions cannot make either lead significant: the sentence says so
    assert (
        "+33 points over base + retrieval, +50 points over the fine-tune alone: it is ahead of both, but not "
        "significantly of base + retrieval (p=0.50) or adapter alone (p=0.25)." in text
    )
    assert "within noise on 6 questions" in text
    assert "base alone needs 0.75 s and 40 prompt tokens" in text
    assert text.endswith("Recommendation: serve `harbour` with its adapter and retrieval on (the hybrid).")


def test_recommendation_without_adapter_and_with_ties() -> None:
    report = build_report(with_adapter=False)
    assert [a.status for a in report.arms] == ["ok", "ok", "no adapter", "no adapter"]
    assert "`harbour` has no champion adapter" in report.recommendation
    assert report.recommendation.endswith("serve the base model with retrieval on (no adapter needed).")
    # Equal accuracy: the faster arm wins.
    slow = summarise_arm(ARM_BY_KEY["base_rag"], "m", make_answers("base_rag"))
    quicker = [replace(a, latency_s=a.latency_s / 4, source_hit=None) for a in make_answers("base_rag")]
    fast = summarise_arm(ARM_BY_KEY["adapter"], "m", quicker)
    assert recommend([slow, fast], "harbour").startswith("**adapter alone**")


def test_no_recommendation_when_nothing_is_right() -> None:
    wrong = [replace(a, correct=False) for a in make_answers("base")]
    arm = summarise_arm(ARM_BY_KEY["base"], "m", wrong)
    assert recommend([arm], "harbour").startswith("No arm answered any question correctly")

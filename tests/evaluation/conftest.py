"""Fixtures of the evaluation tests: a fixed report built from known answers, and the real serving stack."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from components.evaluation.results import (
    ARM_BY_KEY,
    Answer,
    EvalReport,
    IndexState,
    RetrievalScores,
    not_run_arm,
    recommend,
    summarise_arm,
)

# (correct?) per question, for 6 questions, per arm: the hybrid gets 5, RAG 3, the fine-tune 2, the base 1.
OUTCOMES = {
    "base": [True, False, False, False, False, False],
    "base_rag": [True, True, True, False, False, False],
    "adapter": [True, False, False, True, False, False],
    "adapter_rag": [True, True, True, True, True, False],
}


def make_answers(arm: str) -> list[Answer]:
    rag = ARM_BY_KEY[arm].rag
    return [
        Answer(
            qa_id=f"q{i}",
            text="yes" if ok else "no",
            correct=ok,
            latency_s=(2.0 if rag else 0.5) + 0.1 * i,
            prompt_tokens=800 if rag else 40,
            completion_tokens=10,
            cited_sources=["a.md"] if rag else [],
            source_hit=(i % 2 == 0) if rag else None,
            adapter_version=3 if arm.startswith("adapter") else None,
        )
        for i, ok in enumerate(OUTCOMES[arm])
    ]


def build_report(with_adapter: bool = True) -> EvalReport:
    arms = []
    for key, arm in ARM_BY_KEY.items():
        model = "harbour" if arm.uses_adapter else "smollm2-135m"
        if arm.uses_adapter and not with_adapter:
            arms.append(not_run_arm(arm, model))
        else:
            arms.append(summarise_arm(arm, model, make_answers(key)))
    report = EvalReport(
        started_at=datetime(2026, 11, 22, 3, 0, tzinfo=UTC),
        finished_at=datetime(2026, 11, 22, 3, 5, tzinfo=UTC),
        qa_path="data/sample/qa/heldout.jsonl",
        qa_fingerprint="0123456789abcdef",
        questions=6,
        alias="harbour",
        adapter_version=3 if with_adapter else None,
        served_model="smollm2-135m",
        gateway_url="http://127.0.0.1:8000",
        max_tokens=48,
        concurrency=2,
        top_k=5,
        index=IndexState(documents=35, chunks=420, embedding_model="all-MiniLM-L6-v2:384"),
        arms=arms,
        retrieval=RetrievalScores(k=5, questions=6, recall_at_k=5 / 6, mrr=0.7, latency_p50_s=0.02),
    )
    report.recommendation = recommend(arms, "harbour")
    return report


@pytest.fixture
def fixed_report() -> EvalReport:
    return build_report()

"""What an evaluation produces: per-question answers, per-arm scores, retrieval scores, and the recommendation.

Plain dataclasses; everything here is computed from fixed answers, with no service involved, so it is tested
directly. The four arms answer the one question teams ask: retrieval, a fine-tune, or both?
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from components.evaluation.scoring import mcnemar_p, percentile, wilson_interval

NO_ADAPTER = "no adapter"
OK = "ok"


@dataclass(frozen=True)
class Arm:
    """One way of answering: the base model or the alias's adapter, with retrieval on or off."""

    key: str
    label: str
    uses_adapter: bool
    rag: bool


ARMS = (
    Arm("base", "base alone", uses_adapter=False, rag=False),
    Arm("base_rag", "base + retrieval", uses_adapter=False, rag=True),
    Arm("adapter", "adapter alone", uses_adapter=True, rag=False),
    Arm("adapter_rag", "adapter + retrieval", uses_adapter=True, rag=True),
)
ARM_BY_KEY = {arm.key: arm for arm in ARMS}
HYBRID, RAG_ONLY, FINETUNE_ONLY = "adapter_rag", "base_rag", "adapter"


@dataclass
class Answer:
    """One question answered by one arm, as the gateway returned it."""

    qa_id: str
    text: str
    correct: bool
    latency_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cited_sources: list[str] = field(default_factory=list)
    source_hit: bool | None = None  # None: the arm does not retrieve
    # The gateway's attributions (sources whose text holds the answer's sentences) name the expected document
    source_attributed: bool | None = None
    served_model: str | None = None
    adapter_version: int | None = None
    fallback: bool = False  # the gateway served the alias with the base model (adapter failed to load)
    error: str | None = None
    # The answer cited nothing itself and its markers are the gateway's (the sources that hold its words)
    gateway_cited: bool = False


@dataclass
class ArmScores:
    arm: str
    label: str
    model: str
    rag: bool
    status: str = OK  # OK, or NO_ADAPTER when the alias has no champion (the arm is not run)
    adapter_version: int | None = None
    questions: int = 0
    correct: int = 0
    accuracy: float | None = None
    accuracy_low: float | None = None  # 95% Wilson interval
    accuracy_high: float | None = None
    source_hit_rate: float | None = None
    source_attributed_rate: float | None = None
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    prompt_tokens_mean: float | None = None
    completion_tokens_mean: float | None = None
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    errors: int = 0
    fallbacks: int = 0
    answers: list[Answer] = field(default_factory=list)

    @property
    def measured(self) -> bool:
        return self.status == OK and self.accuracy is not None


@dataclass
class RetrievalScores:
    """Retrieval alone (POST /v1/retrieve): is the expected document among the top k chunks, and how high."""

    k: int
    questions: int
    recall_at_k: float
    mrr: float
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    errors: int = 0
    ranks: dict[str, int | None] = field(default_factory=dict)  # qa id -> rank of the first hit (1-based)


@dataclass
class IndexState:
    """The document index the retrieval arms were measured on."""

    documents: int | None = None
    chunks: int | None = None
    embedding_model: str | None = None
    last_ingest_at: datetime | None = None


@dataclass
class EvalReport:
    started_at: datetime
    finished_at: datetime
    qa_path: str
    qa_fingerprint: str
    questions: int
    alias: str
    adapter_version: int | None
    served_model: str
    gateway_url: str
    max_tokens: int
    concurrency: int
    top_k: int
    index: IndexState
    arms: list[ArmScores]
    retrieval: RetrievalScores | None
    recommendation: str = ""
    trigger: str = "cli"
    run_id: int | None = None
    out_dir: str | None = None

    def arm(self, key: str) -> ArmScores:
        for scores in self.arms:
            if scores.arm == key:
                return scores
        raise KeyError(key)

    def to_dict(self, answers: bool = True) -> dict[str, Any]:
        data = asdict(self)
        if not answers:
            for arm in data["arms"]:
                arm.pop("answers", None)
            if data["retrieval"]:
                data["retrieval"].pop("ranks", None)
        return data


def summarise_arm(arm: Arm, model: str, answers: list[Answer], adapter_version: int | None = None) -> ArmScores:
    """Scores of one arm. A failed request counts as a wrong answer; latency and tokens cover answered ones."""
    ok = [a for a in answers if a.error is None]
    correct = sum(a.correct for a in answers)
    low, high = wilson_interval(correct, len(answers))
    latencies = [a.latency_s for a in ok]
    hits = [a.source_hit for a in answers if a.source_hit is not None] if arm.rag else []
    versions = {a.adapter_version for a in ok if a.adapter_version is not None}
    return ArmScores(
        arm=arm.key,
        label=arm.label,
        model=model,
        rag=arm.rag,
        adapter_version=adapter_version if adapter_version is not None else (max(versions) if versions else None),
        questions=len(answers),
        correct=correct,
        accuracy=correct / len(answers) if answers else None,
        accuracy_low=low if answers else None,
        accuracy_high=high if answers else None,
        source_hit_rate=(sum(hits) / len(answers)) if arm.rag and answers else None,
        source_attributed_rate=(sum(bool(a.source_attributed) for a in answers) / len(answers))
        if arm.rag and answers
        else None,
        latency_p50_s=percentile(latencies, 50) if latencies else None,
        latency_p95_s=percentile(latencies, 95) if latencies else None,
        prompt_tokens_mean=sum(a.prompt_tokens for a in ok) / len(ok) if ok else None,
        completion_tokens_mean=sum(a.completion_tokens for a in ok) / len(ok) if ok else None,
        prompt_tokens_total=sum(a.prompt_tokens for a in ok),
        completion_tokens_total=sum(a.completion_tokens for a in ok),
        errors=len(answers) - len(ok),
        fallbacks=sum(a.fallback for a in ok),
        answers=answers,
    )


def not_run_arm(arm: Arm, model: str) -> ArmScores:
    """An adapter arm for an alias with no champion: reported, not an error."""
    return ArmScores(arm=arm.key, label=arm.label, model=model, rag=arm.rag, status=NO_ADAPTER)


def paired_p(a: ArmScores, b: ArmScores) -> float:
    """Exact McNemar p-value of two arms over the questions both answered (paired by question id)."""
    b_by_id = {x.qa_id: x.correct for x in b.answers}
    pairs = [(x.correct, b_by_id[x.qa_id]) for x in a.answers if x.qa_id in b_by_id]
    return mcnemar_p([p[0] for p in pairs], [p[1] for p in pairs])


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _p(value: float) -> str:
    return "p<0.001" if value < 0.001 else f"p={value:.3f}" if value < 0.01 else f"p={value:.2f}"


_ACTIONS = {
    "base": "serve the base model with retrieval off",
    "base_rag": "serve the base model with retrieval on (no adapter needed)",
    "adapter": "serve `{alias}` with its adapter and retrieval off",
    "adapter_rag": "serve `{alias}` with its adapter and retrieval on (the hybrid)",
}


def recommend(arms: list[ArmScores], alias: str) -> str:
    """A short recommendation derived from the numbers: the winner on accuracy, its margin, and its cost.

    Ties on accuracy go to the faster arm. A lead within noise (exact paired McNemar test, p >= 0.05) is said
    to be so, with the cheaper arm named, instead of being dressed up as a win.
    """
    measured = [a for a in arms if a.measured]
    if not measured:
        return "No arm was measured: nothing to recommend."
    ranked = sorted(measured, key=lambda a: (-(a.accuracy or 0.0), a.latency_p50_s or float("inf")))
    best = ranked[0]
    no_adapter = (
        f"`{alias}` has no champion adapter, so the adapter arms were not run (`tandem train`)."
        if any(a.status == NO_ADAPTER for a in arms)
        else ""
    )
    if not best.correct:
        nothing = "No arm answered any question correctly: nothing to recommend (check the QA set and the index)."
        return f"{nothing} {no_adapter}".strip()
    lines = [
        f"**{best.label}** is the most accurate arm: {_pct(best.accuracy)} ({best.correct}/{best.questions}, "
        f"95% CI {_pct(best.accuracy_low)}-{_pct(best.accuracy_high)})"
        + (
            ", against "
            + ", ".join(
                f"{_pct(o.accuracy)} for {o.label} ({_pct_delta(best, o)}, {_p(paired_p(best, o))})" for o in ranked[1:]
            )
            if len(ranked) > 1
            else ""
        )
        + "."
    ]
    cost = (
        f"It answers in {best.latency_p50_s or 0:.2f} s at p50 ({best.latency_p95_s or 0:.2f} s at p95) with "
        f"{best.prompt_tokens_mean or 0:.0f} prompt + {best.completion_tokens_mean or 0:.0f} completion tokens "
        "per question"
    )
    cheapest = min(measured, key=lambda a: (a.prompt_tokens_mean or 0.0, a.latency_p50_s or 0.0))
    if cheapest is not best:
        cost += (
            f"; {cheapest.label} needs {cheapest.latency_p50_s or 0:.2f} s and "
            f"{cheapest.prompt_tokens_mean or 0:.0f} prompt tokens"
        )
    lines.append(cost + ".")
    if len(ranked) > 1:
        runner_up = ranked[1]
        p_value = paired_p(best, runner_up)
        if p_value >= 0.05:
            lines.append(
                f"Its lead over {runner_up.label} is within noise on {best.questions} questions ({_p(p_value)}): "
                "add questions before acting on it."
            )
    names = {a.arm: a for a in measured}
    if HYBRID in names and RAG_ONLY in names and FINETUNE_ONLY in names:
        hybrid = names[HYBRID]
        singles = [names[k] for k in (RAG_ONLY, FINETUNE_ONLY)]
        ahead = all((hybrid.accuracy or 0) > (o.accuracy or 0) for o in singles)
        noise = [o for o in singles if paired_p(hybrid, o) >= 0.05]
        if not ahead:
            verdict = "it does not beat both."
        elif noise:
            verdict = (
                "it is ahead of both, but not significantly of "
                + " or ".join(f"{o.label} ({_p(paired_p(hybrid, o))})" for o in noise)
                + "."
            )
        else:
            verdict = "it beats both (p < 0.05 against each)."
        lines.append(
            f"Hybrid against the single arms: {_pct_delta(hybrid, names[RAG_ONLY])} over base + retrieval, "
            f"{_pct_delta(hybrid, names[FINETUNE_ONLY])} over the fine-tune alone: {verdict}"
        )
    if no_adapter:
        lines.append(no_adapter)
    fallbacks = sum(a.fallbacks for a in arms)
    if fallbacks:
        lines.append(f"Warning: {fallbacks} adapter answers were served by the base model (adapter not loaded).")
    lines.append(f"Recommendation: {_ACTIONS[best.arm].format(alias=alias)}.")
    return " ".join(lines)


def _pct_delta(a: ArmScores, b: ArmScores) -> str:
    delta = 100 * ((a.accuracy or 0.0) - (b.accuracy or 0.0))
    return f"{delta:+.0f} points"

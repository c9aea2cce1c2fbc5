"""The evaluation gate: a candidate adapter and its baseline (the champion, else the base model) are asked the same
questions through vLLM, and paired outcomes decide.

Sets, built once so both models see the same text:

* ``general``: the general-knowledge set (settings.general_set), without retrieval: what the base model knows;
* ``split_rag``: the alias's held-out set (fixed at its first training, versioned: ``components.training.heldout``;
  never the run's data), in the gateway's RAG prompt (rendered by ``components.training.raft``, as the adapter
  was trained), scored by ``reference_hit``;
* ``qa_rag``: the gate's own domain QA set (settings.gate_questions: never a question of settings.qa_set, which
  ``tandem eval`` reports on) in the gateway's RAG prompt, contained match;
* ``split`` / ``qa``: the same questions without sources, only when retrieval is unavailable.

Each set is compared question by question with the exact McNemar test and a 95 % interval of the difference
(Agresti-Min). The candidate is rejected when its rank does not fit vLLM, on a significant loss (p < gate_alpha)
on any set, against the champion and, for general knowledge, against the base model too (so losses cannot
accumulate over generations), or when it scores lower than the baseline on the pooled domain questions (a tie
promotes: the newer data wins). One question changing is not a significant loss; on a set too small for the test
to reach p < gate_alpha at all (under 6 questions at 0.05), any loss rejects.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from components.evaluation.scoring import answer_matches, key_words, mcnemar_p, normalize
from components.records import Record
from components.settings import Settings
from components.training.answer_cache import AnswerCache, answer_key, cacheable
from components.training.data import Example
from components.training.heldout import missing_gate_set, qa_questions, qa_rows
from components.training.vllm_client import VllmClient

log = logging.getLogger(__name__)
DOMAIN_SETS = ("split_rag", "qa_rag", "split", "qa")
GENERAL = "general"


@dataclass
class Question:
    messages: list[dict[str, Any]]
    reference: str
    short: bool  # short reference: contained match; long: key-word recall of its first sentence
    rag: bool = False


@dataclass
class Comparison:
    """One set, candidate against a baseline, on the same questions."""

    name: str
    against: str
    n: int
    candidate: float
    baseline: float
    diff: float
    low: float
    high: float
    p: float

    def line(self) -> str:
        return (
            f"{self.name} vs {self.against}: {self.candidate:.3f} vs {self.baseline:.3f} on {self.n}, "
            f"difference {self.diff:+.3f} [95% {self.low:+.3f}, {self.high:+.3f}], McNemar p={self.p:.3g}"
        )


@dataclass
class GateResult(Record):
    promote: bool
    reasons: list[str]
    candidate: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)
    baseline_model: str = ""
    base_general: float | None = None  # the base model's general-knowledge score, when the baseline is a champion
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Per set, a few questions the baseline got right and the candidate got wrong: why a candidate lost.
    regressions: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    heldout: dict[str, Any] = field(default_factory=dict)  # the held-out set version it was judged on
    staged: bool = False  # a passing candidate already loaded and warmed on every replica


def reference_hit(prediction: str, reference: str, short: bool) -> bool:
    """Short references (QA answers): contained match. Long ones (chat answers): the reference itself is
    contained, or at least 60% of its first sentence's content words appear in the prediction."""
    if short or answer_matches(prediction, reference):
        return answer_matches(prediction, reference)
    words = key_words(reference)
    if not words:
        return False
    got = set(normalize(prediction).split())
    return sum(w in got for w in words) / len(words) >= 0.6


def paired_difference(
    candidate: Sequence[bool], baseline: Sequence[bool], z: float = 1.96
) -> tuple[float, float, float]:
    """The difference in accuracy (candidate - baseline) on paired outcomes and its interval, by Agresti and Min
    (2005): half an observation added to each of the four cells, then the Wald interval for matched pairs."""
    if len(candidate) != len(baseline):
        raise ValueError("paired outcomes differ in length")
    n = len(candidate)
    if n == 0:
        return 0.0, 0.0, 0.0
    only_c = sum(1 for c, b in zip(candidate, baseline, strict=True) if c and not b)
    only_b = sum(1 for c, b in zip(candidate, baseline, strict=True) if b and not c)
    diff = (only_c - only_b) / n
    n2, c2, b2 = n + 2, only_c + 0.5, only_b + 0.5
    d2 = (c2 - b2) / n2
    half = z * math.sqrt(max(0.0, (c2 + b2) - (c2 - b2) ** 2 / n2)) / n2
    return diff, max(-1.0, d2 - half), min(1.0, d2 + half)


def compare(name: str, against: str, candidate: Sequence[bool], baseline: Sequence[bool]) -> Comparison:
    diff, low, high = paired_difference(candidate, baseline)
    n = len(candidate)
    return Comparison(
        name=name,
        against=against,
        n=n,
        candidate=round(sum(candidate) / n, 4) if n else 0.0,
        baseline=round(sum(baseline) / n, 4) if n else 0.0,
        diff=round(diff, 4),
        low=round(low, 4),
        high=round(high, 4),
        p=round(mcnemar_p(candidate, baseline), 6),
    )


def testable_size(alpha: float) -> int:
    """The fewest paired questions on which the exact McNemar test can reach p < alpha (all of them discordant
    one way): 6 for alpha 0.05."""
    n = 1
    while 2 * 0.5**n >= alpha:
        n += 1
    return n


def decide(
    hits: dict[str, list[bool]],
    baseline_hits: dict[str, list[bool]],
    alpha: float,
    baseline_name: str = "the base model",
    base_general: list[bool] | None = None,
) -> tuple[bool, list[str], list[Comparison]]:
    """The promotion rule on per-question outcomes; returns (promote, reasons, comparisons).

    Rejects on a significant loss (McNemar p < alpha) on any set, or on general knowledge against the base
    model's own answers (``base_general``, when the baseline is a champion); also when the candidate does
    worse than the baseline on the pooled domain questions, significant or not (a retrain that scores lower
    on what it was trained for is no better a champion), or on any loss on a set too small for the test to ever
    reach p < alpha. A tie is promoted: the newer data wins. Every comparison's interval goes into the reasons.
    """
    comparisons = [
        compare(name, baseline_name, hits[name], baseline_hits[name]) for name in hits if name in baseline_hits
    ]
    if base_general is not None and GENERAL in hits:
        comparisons.append(compare(GENERAL, "the base model", hits[GENERAL], base_general))
    domain = [name for name in DOMAIN_SETS if name in hits and name in baseline_hits]
    pooled = None
    if len(domain) > 1:
        pooled = compare(
            "domain (pooled)",
            baseline_name,
            [h for name in domain for h in hits[name]],
            [h for name in domain for h in baseline_hits[name]],
        )
        comparisons.append(pooled)
    elif domain:
        pooled = next(c for c in comparisons if c.name == domain[0])
    significant = [c for c in comparisons if c.diff < 0 and c.p < alpha]
    failures = [f"significant loss: {c.line()}" for c in significant]
    # On fewer than `smallest` questions no loss can reach p < alpha, so such a set may lose nothing.
    smallest = testable_size(alpha)
    failures += [
        f"a loss on a set too small to test (under {smallest} questions): {c.line()}"
        for c in comparisons
        if c.diff < 0 and c.p >= alpha and c.n < smallest and c is not pooled
    ]
    if pooled is None:
        failures.append("no domain questions to judge the candidate on (no test split, no QA set)")
    elif pooled.diff < 0 and not any(c is pooled for c in significant):
        failures.append(f"worse on the domain: {pooled.line()}")
    lines = [c.line() for c in comparisons]
    if failures or pooled is None:
        return False, [*failures, *(x for x in lines if not any(x in f for f in failures))], comparisons
    gain = "a domain gain" if pooled.diff > 0 else "the domain unchanged"
    return True, [f"no significant loss (p < {alpha}) and {gain}: {pooled.line()}", *lines], comparisons


def _read_qa(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    return [r for r in qa_rows(path) if r.get("question") and r.get("answer")][:limit]


def gate_qa_rows(settings: Settings, limit: int, notes: list[str]) -> list[dict[str, Any]]:
    """The gate's domain QA questions, without any that the reported QA set (settings.qa_set) asks, so the
    decision to promote never rests on the questions the final table is measured on. What is left out, and
    why, goes into ``notes``."""
    path = settings.gate_questions
    if not path:
        notes.append("no gate QA set (TANDEM_GATE_QA_SET, or gate.jsonl beside the QA set): domain judged on the split")
        return []
    reported = qa_questions(settings.qa_set)
    rows = _read_qa(path)
    if not rows and settings.gate_qa_set:  # named, yet nothing to read: refuse rather than judge without it
        raise missing_gate_set(path)
    kept = [r for r in rows if normalize(str(r["question"])) not in reported]
    if len(kept) < len(rows):
        notes.append(f"{len(rows) - len(kept)} of {len(rows)} questions of {path} left out: the QA set reports on them")
    return kept[:limit]


def build_question_sets(
    settings: Settings,
    test_split: Sequence[Example],  # the alias's held-out set
    retrieve: Callable[[str, int], Sequence[Any]] | None,
) -> tuple[dict[str, list[Question]], list[str]]:
    """The prompts both models are asked, built once so the candidate and the baseline see the same text."""
    from components.prompting import build_rag_messages, query_text
    from components.training.raft import render_example, without_old_sources

    limit = settings.gate_max_questions
    notes: list[str] = []
    general = _read_qa(settings.general_set, limit)
    sets: dict[str, list[Question]] = {
        GENERAL: [Question([{"role": "user", "content": r["question"]}], str(r["answer"]), True) for r in general]
    }
    qa = [
        Question([{"role": "user", "content": r["question"]}], str(r["answer"]), True)
        for r in gate_qa_rows(settings, limit, notes)
    ]
    split = [
        Question(without_old_sources(ex)[:-1], ex.answer, short=len(ex.answer.split()) <= 6)
        for ex in [e for e in test_split if not e.plain][:limit]
    ]
    if retrieve is None:
        notes.append("retrieval unavailable: domain questions asked without sources")
        sets["split"], sets["qa"] = split, qa
        return {k: v for k, v in sets.items() if v}, notes
    top_k = settings.rag_top_k
    sets["qa_rag"] = [
        Question(build_rag_messages(q.messages, retrieve(query_text(q.messages), top_k), settings.assistant_org),
                 q.reference, q.short, rag=True)
        for q in qa
    ]  # fmt: skip
    rendered = []
    for ex in [e for e in test_split if not e.plain][:limit]:
        conversation, _ = render_example(ex, retrieve, settings.assistant_org, top_k, unanswerable_share=0.0)
        if conversation is not None:
            prompt = conversation[:-1]
        else:  # its answer is in no retrieved chunk: asked with the sources it gets, as the gateway would
            turns = without_old_sources(ex)[:-1]
            prompt = build_rag_messages(turns, retrieve(query_text(turns), top_k), settings.assistant_org)
        rendered.append(Question(prompt, ex.answer, short=len(ex.answer.split()) <= 6, rag=True))
    sets["split_rag"] = rendered
    return {k: v for k, v in sets.items() if v}, notes


def answer_all(
    client: VllmClient,
    model: str,
    sets: dict[str, list[Question]],
    settings: Settings,
    cache: AnswerCache | None = None,
    identity: str = "",
) -> dict[str, list[str]]:
    """Every question of every set, asked concurrently (vLLM batches them); RAG questions with the gateway's
    RAG decoding defaults. With a ``cache``, what this model (``identity``, see ``answer_cache.model_identity``)
    already answered to the same prompt and sampling is reused, only the rest is asked, and the new answers are
    stored."""
    from components.prompting import decoding_defaults

    def request(q: Question) -> tuple[int, dict[str, Any]]:
        sampling = decoding_defaults(settings, adapter=model != settings.served_model_name) if q.rag else {}
        max_tokens = int(sampling.pop("max_tokens", settings.gate_max_tokens))
        return min(max_tokens, settings.gate_max_tokens), sampling

    flat = [(name, q, *request(q)) for name, questions in sets.items() for q in questions]
    keys = [
        answer_key(identity, q.messages, max_tokens, sampling) if cache and cacheable(sampling) else None
        for _, q, max_tokens, sampling in flat
    ]
    known = cache.get([k for k in keys if k]) if cache else {}
    todo = [i for i, k in enumerate(keys) if k is None or k not in known]
    with ThreadPoolExecutor(max_workers=max(1, settings.gate_concurrency)) as pool:
        got = list(pool.map(lambda i: client.chat(model, flat[i][1].messages, flat[i][2], **flat[i][3]), todo))
    fresh = dict(zip(todo, got, strict=True))
    if cache:
        cache.put([(k, model, fresh[i]) for i, k in enumerate(keys) if k and i in fresh])
    answers: dict[str, list[str]] = {name: [] for name in sets}
    for i, (name, *_) in enumerate(flat):
        key = keys[i]
        answers[name].append(fresh[i] if i in fresh or key is None else known[key])
    return answers


def outcomes(sets: dict[str, list[Question]], answers: dict[str, list[str]]) -> dict[str, list[bool]]:
    return {
        name: [reference_hit(a, q.reference, q.short) for a, q in zip(answers[name], questions, strict=True)]
        for name, questions in sets.items()
    }


def accuracy(hits: dict[str, list[bool]]) -> dict[str, float]:
    scores = {name: round(sum(h) / len(h), 4) for name, h in hits.items() if h}
    domain = [h for name in DOMAIN_SETS for h in hits.get(name, [])]
    if domain:
        scores["main"] = round(sum(domain) / len(domain), 4)
    return scores


def regressions(
    sets: dict[str, list[Question]],
    candidate: dict[str, list[str]],
    baseline: dict[str, list[str]],
    limit: int = 5,
) -> dict[str, list[dict[str, str]]]:
    """Up to ``limit`` questions per set that the baseline answered right and the candidate wrong."""
    found: dict[str, list[dict[str, str]]] = {}
    for name, questions in sets.items():
        lost = [
            {"question": str(q.messages[-1]["content"])[:300], "reference": q.reference[:300], "candidate": c[:300]}
            for q, c, b in zip(questions, candidate.get(name, []), baseline.get(name, []), strict=False)
            if reference_hit(b, q.reference, q.short) and not reference_hit(c, q.reference, q.short)
        ]
        if lost:
            found[name] = lost[:limit]
    return found


def make_retriever(settings: Settings, conn: Any) -> Callable[[str, int], Sequence[Any]] | None:
    """The gateway's retrieval bound to a connection, or None when there is no index to retrieve from."""
    from components.retrieval import index_snapshot, serving_retriever

    try:
        if not index_snapshot(conn)["chunks"]:
            return None  # nothing ingested: retrieval would add empty prompts
        conn.commit()
        return serving_retriever(conn, settings)
    except Exception as exc:  # no embedder, a broken index: score without retrieval, and say so
        log.warning("retrieval unavailable for the gate: %s", exc)
        if hasattr(conn, "rollback"):
            conn.rollback()
        return None

"""The evaluation gate: a candidate adapter is scored against the champion (or the base model) through vLLM.

Both are asked the same questions, at temperature 0, with the same prompts:

* ``split``: the held-out test split of the alias's own training data (scored by ``reference_hit``),
* ``qa``: the held-out QA set (settings.qa_set; short reference answers, contained match),
* each of those again ``_rag``: with chunks from ``components.retrieval`` in the gateway's RAG prompt,
* ``general``: the general-knowledge set (settings.general_set) the base model gets right.

The main score is the mean of the domain scores that could be measured (split, qa, and their _rag twins).
The candidate is promoted only if (1) its rank fits vLLM's max LoRA rank, (2) its main score is not below the
champion's by more than ``gate_tolerance``, (3) it beats the champion on at least one domain score, and (4) its
general-knowledge accuracy is not below the champion's by more than ``gate_general_tolerance``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from components.evaluation.scoring import answer_matches, normalize
from components.settings import Settings
from components.training.data import Example
from components.training.vllm_client import VllmClient

log = logging.getLogger(__name__)
DOMAIN_SETS = ("split", "qa", "split_rag", "qa_rag")
_CITATION = re.compile(r"\[\d+\]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
_STOPWORD_TEXT = (
    "a an the and or of to in on at for by with from is are was were be been it its this that these those as "
    "which who whom what when where how not no yes do does did has have had can could should would will may "
    "must shall than then there their they you your our we us he she his her them if so also any all each"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


@dataclass
class Question:
    messages: list[dict[str, Any]]
    reference: str
    short: bool  # short reference: contained match; long: key-word recall of its first sentence


@dataclass
class GateResult:
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def key_words(reference: str) -> list[str]:
    """The content words of a reference answer's first sentence (citations and stop words dropped)."""
    first = _SENTENCE_END.split(_CITATION.sub(" ", reference).strip(), maxsplit=1)[0]
    return [w for w in normalize(first).split() if w not in _STOPWORDS and (len(w) > 2 or w.isdigit())]


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


def main_score(scores: dict[str, float]) -> float:
    present = [scores[k] for k in DOMAIN_SETS if k in scores]
    return sum(present) / len(present) if present else 0.0


def decide(
    candidate: dict[str, float],
    baseline: dict[str, float],
    tolerance: float,
    general_tolerance: float,
    base_general: float | None = None,
    baseline_name: str = "the champion",
) -> tuple[bool, list[str]]:
    """The promotion rule on two score sheets; returns (promote, reasons).

    General knowledge is held against the champion and, when given, the base model's own score
    (``base_general``), whichever is higher: against the champion alone, each generation could lose a little
    more than the last.
    """
    reasons = []
    c_main, b_main = main_score(candidate), main_score(baseline)
    if c_main < b_main - tolerance:
        reasons.append(f"main score {c_main:.3f} is below {baseline_name}'s {b_main:.3f} by more than {tolerance}")
    better = [k for k in DOMAIN_SETS if k in candidate and candidate[k] > baseline.get(k, 0.0)]
    if not better:
        reasons.append(f"better than {baseline_name} on no domain score")
    if "general" in candidate:
        refs = {baseline_name: baseline.get("general", 0.0)}
        if base_general is not None:
            refs["the base model"] = base_general
        whose, ref = max(refs.items(), key=lambda kv: kv[1])
        if candidate["general"] < ref - general_tolerance:
            reasons.append(
                f"general knowledge dropped from {ref:.3f} ({whose}) to {candidate['general']:.3f} "
                f"(more than {general_tolerance})"
            )
    if not reasons:
        reasons.append(f"main score {c_main:.3f} vs {b_main:.3f}; better on {', '.join(better)}")
        return True, reasons
    return False, reasons


def _read_qa(path: str, limit: int) -> list[dict[str, Any]]:
    import json

    import fsspec

    try:
        with fsspec.open(path, "r", encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        return []
    return [r for r in rows if r.get("question") and r.get("answer")][:limit]


def build_question_sets(
    settings: Settings, test_split: Sequence[Example], retrieve: Callable[[str], Sequence[Any]] | None
) -> tuple[dict[str, list[Question]], list[str]]:
    """The prompts both models are asked, built once so the candidate and the champion see the same text."""
    limit = settings.gate_max_questions
    notes: list[str] = []
    sets: dict[str, list[Question]] = {"split": [], "qa": [], "general": []}
    for ex in list(test_split)[:limit]:
        turns = [m for m in ex.prompt if m["role"] != "system"]  # the sources a training example carries go
        sets["split"].append(Question(turns, ex.answer, short=len(ex.answer.split()) <= 6))
    for row in _read_qa(settings.qa_set, limit):
        sets["qa"].append(Question([{"role": "user", "content": row["question"]}], str(row["answer"]), True))
    for row in _read_qa(settings.general_set, limit):
        sets["general"].append(Question([{"role": "user", "content": row["question"]}], str(row["answer"]), True))
    if retrieve is None:
        notes.append("retrieval unavailable: scored without retrieval only")
    else:
        from components.prompting import build_rag_messages

        for name in ("split", "qa"):
            rag = []
            for q in sets[name]:
                chunks = retrieve(str(q.messages[-1]["content"]))
                rag.append(
                    Question(build_rag_messages(q.messages, chunks, settings.assistant_org), q.reference, q.short)
                )
            sets[f"{name}_rag"] = rag
    return {k: v for k, v in sets.items() if v}, notes


def score_model(
    client: VllmClient, model: str, sets: dict[str, list[Question]], max_tokens: int, concurrency: int
) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Accuracy per set for one served model, asking questions concurrently (vLLM batches them)."""
    scores: dict[str, float] = {}
    answers: dict[str, list[str]] = {}
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for name, questions in sets.items():
            got = list(pool.map(lambda q: client.chat(model, q.messages, max_tokens), questions))
            answers[name] = got
            hits = [reference_hit(a, q.reference, q.short) for a, q in zip(got, questions, strict=True)]
            scores[name] = round(sum(hits) / len(hits), 4)
    scores["main"] = round(main_score(scores), 4)
    return scores, answers


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


def make_retriever(settings: Settings, conn: Any) -> Callable[[str], Sequence[Any]] | None:
    """``components.retrieval.retrieve`` bound to a connection, or None when retrieval is not set up."""
    try:
        from components.retrieval import retrieve
    except ImportError:
        return None
    try:
        if not retrieve(conn, "harbour", 1):
            return None  # nothing ingested: retrieval would add empty prompts
    except Exception as exc:  # no chunks table yet, no embedder: score without retrieval
        log.warning("retrieval unavailable for the gate: %s", exc)
        if hasattr(conn, "rollback"):
            conn.rollback()
        return None
    top_k = settings.rag_top_k
    return lambda query: retrieve(conn, query, top_k)

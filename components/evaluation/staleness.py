"""Staleness after documents change: does a champion trained on old facts now contradict retrieval?

After an ingest, for the champion of each alias:

1. What it was trained against: its lineage (the artifact's manifest, else the registry's ``rendering``) holds the
   index state, the content hash of each document its grounded examples took their answers from, and per example
   the question, the answer and the answer's words that the document held (``components.training.raft``).
2. Which of those documents changed since: a different content hash, or gone. An adapter without that lineage
   (trained without sources, or made elsewhere) falls back to the QA set's questions whose source document was
   updated after the training's last ingest (or after the adapter was registered).
3. Those questions (at most ``staleness_max_questions``, changed facts first) are asked through the gateway by the
   arms ``tandem eval`` runs: base + retrieval, adapter alone, adapter + retrieval (the hybrid).
4. Each answer is scored. Where the document still holds every word of the trained answer, the trained answer is
   the reference (the gate's ``reference_hit``). Where it lost some of them (the fact changed), the answer is right
   when it repeats none of the retired words and stands on the current document (``attribution.answer_support``).
5. The champion is stale when its hybrid answers score below base + retrieval: significantly (exact McNemar,
   p < gate_alpha), or at all on fewer questions than that test can ever call significant (the gate's rule).
   With ``TANDEM_AUTO_ROLLBACK=true`` a stale champion is rolled back, and the reason goes into the registry.

Every check is a row of ``staleness_checks`` (migration 0013). A check that finds the same changed documents (same
hashes) as the last check of the same champion reuses that verdict instead of asking again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from components.errors import ConfigError, ServiceError
from components.settings import Settings

log = logging.getLogger(__name__)
STALE_ARMS = ("base_rag", "adapter", "adapter_rag")
HYBRID, BASE_RAG = "adapter_rag", "base_rag"


@dataclass
class StaleQuestion:
    id: str
    question: str
    reference: str  # the trained answer, or the QA set's
    source: str  # the document's source and path in the index
    document: str
    short: bool  # scored by contained match (QA answers) rather than key-word recall (chat answers)
    evidence: list[str] = field(default_factory=list)  # the answer's words the document held at training
    retired: list[str] = field(default_factory=list)  # of those, the words the document no longer holds
    origin: str = "training"  # "training" (a grounded example) or "qa" (the QA set)


@dataclass
class StalenessCheck:
    alias: str
    adapter_version: int
    trigger: str
    basis: str  # "grounding" or "qa"
    trained_index: dict[str, Any]
    changed_documents: list[dict[str, Any]]
    documents_fingerprint: str
    questions: int = 0
    scores: dict[str, float | None] = field(default_factory=dict)
    p_value: float | None = None
    stale: bool = False
    reason: str = ""
    rolled_back_to: int | None = None
    rollback_error: str | None = None
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    check_id: int | None = None
    checked_at: datetime | None = None
    reused: bool = False  # the verdict of an earlier check on the same changed documents

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def words(text: str) -> set[str]:
    from components.evaluation.scoring import normalize

    return set(normalize(text).split())


def outcome(question: StaleQuestion, answer: str, current_text: str) -> bool:
    """Whether one answer agrees with the documents as they are now (module docstring, step 4)."""
    from components.attribution import MIN_SUPPORT, answer_support
    from components.training.gate import reference_hit

    if not answer.strip():
        return False
    if question.retired:
        return not (words(answer) & set(question.retired)) and answer_support(answer, current_text) >= MIN_SUPPORT
    return reference_hit(answer, question.reference, question.short)


def verdict(hybrid: list[bool], base_rag: list[bool], alpha: float) -> tuple[bool, float | None, str]:
    """(stale, McNemar p, why) from paired outcomes of the hybrid arm and base + retrieval on the same questions."""
    from components.evaluation.scoring import mcnemar_p
    from components.training.gate import testable_size

    n = len(hybrid)
    if n == 0:
        return False, None, "no question to ask: no document the champion was trained on changed"
    h, b = sum(hybrid), sum(base_rag)
    p = mcnemar_p(hybrid, base_rag)
    scores = f"hybrid {h}/{n} vs base+RAG {b}/{n} on questions about changed documents (McNemar p={p:.3g})"
    if h >= b:
        return False, p, f"not below: {scores}"
    if p < alpha:
        return True, p, f"significantly below: {scores}"
    smallest = testable_size(alpha)
    if n < smallest:
        return True, p, f"below on a set too small to test (under {smallest} questions): {scores}"
    return False, p, f"below but not significantly (alpha {alpha}): {scores}"


def _lineage(settings: Settings, champion: Any) -> dict[str, Any]:
    from components.training import artifacts

    manifest = artifacts.read_manifest(champion.artifact_uri) or {}
    return dict(manifest.get("rendering") or champion.hyperparameters.get("rendering") or {})


def _current(conn: psycopg.Connection, keys: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[str, datetime]]:
    rows = conn.execute(
        """SELECT d.source, d.path, d.content_hash, d.updated_at FROM documents d
             JOIN unnest(%s::text[], %s::text[]) AS k(source, path) ON d.source = k.source AND d.path = k.path""",
        ([k[0] for k in keys], [k[1] for k in keys]),
    ).fetchall()
    return {(r[0], r[1]): (r[2], r[3]) for r in rows}


def changed_documents(conn: psycopg.Connection, rendering: dict[str, Any], since: datetime) -> list[dict[str, Any]]:
    """The documents changed since training: by recorded content hash (changed or removed) where the lineage has
    them, else every document updated after ``since``."""
    recorded = rendering.get("documents") or []
    if recorded:
        now = _current(conn, [(d["source"], d["path"]) for d in recorded])
        out = []
        for d in recorded:
            got = now.get((d["source"], d["path"]))
            if got is None:
                out.append({"source": d["source"], "path": d["path"], "change": "removed", "content_hash": None})
            elif got[0] != d["content_hash"]:
                out.append({"source": d["source"], "path": d["path"], "change": "changed", "content_hash": got[0]})
        return out
    rows = conn.execute(
        "SELECT source, path, content_hash FROM documents WHERE updated_at > %s ORDER BY source, path", (since,)
    ).fetchall()
    return [{"source": r[0], "path": r[1], "change": "updated", "content_hash": r[2]} for r in rows]


def document_text(conn: psycopg.Connection, source: str, path: str) -> str:
    from components.retrieval import document_chunks

    return "\n".join(c.text for c in document_chunks(conn, path) if c.source == source and c.document_path == path)


def stale_questions(
    settings: Settings, conn: psycopg.Connection, rendering: dict[str, Any], changed: list[dict[str, Any]]
) -> tuple[str, list[StaleQuestion]]:
    """(basis, questions) about the changed documents, changed facts first, at most staleness_max_questions."""
    from components.evaluation.qa import load_qa
    from components.evaluation.run import resolve_qa_path
    from components.evaluation.scoring import source_matches

    grounding = rendering.get("grounding") or []
    by_key = {(d["source"], d["path"]): d for d in changed}
    questions: list[StaleQuestion] = []
    if grounding:
        basis, seen = "grounding", set()
        for i, g in enumerate(grounding):
            if (g.get("source"), g.get("document")) not in by_key or g["question"] in seen:
                continue
            seen.add(g["question"])
            questions.append(
                StaleQuestion(f"g{i}", g["question"], g["answer"], g["source"], g["document"],
                              short=len(g["answer"].split()) <= 6, evidence=list(g.get("evidence") or []))
            )  # fmt: skip
    else:
        basis = "qa"
        for item in load_qa(resolve_qa_path(settings, None)):
            doc = next((d for d in changed if source_matches(d["path"], item.source)), None)
            if doc is not None:
                questions.append(
                    StaleQuestion(item.id, item.question, item.answer, doc["source"], doc["path"], True, origin="qa")
                )
    texts: dict[tuple[str, str], set[str]] = {}
    for q in questions:
        key = (q.source, q.document)
        if key not in texts:
            texts[key] = words(document_text(conn, *key))
        q.retired = [w for w in q.evidence if w not in texts[key]]
    questions.sort(key=lambda q: not q.retired)  # stable: changed facts first, then file order
    return basis, questions[: settings.staleness_max_questions]


def fingerprint(changed: list[dict[str, Any]]) -> str:
    key = sorted((d["source"], d["path"], d["content_hash"] or "") for d in changed)
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def _ask(settings: Settings, alias: str, questions: list[StaleQuestion], conn: psycopg.Connection) -> Any:
    """Every stale question through the three arms; returns (per-arm answers, current document texts)."""
    from components.evaluation.qa import QAItem
    from components.evaluation.run import check_gateway, run_arms

    check_gateway(settings)
    items = [QAItem(q.id, q.question, q.reference, q.document) for q in questions]
    arms, _ = asyncio.run(run_arms(settings, items, alias, True, arm_keys=STALE_ARMS))
    texts = {(q.source, q.document): document_text(conn, q.source, q.document) for q in questions}
    conn.commit()
    return {a.arm: a for a in arms}, texts


def check_alias(
    settings: Settings, alias: str, *, trigger: str = "cli", auto_rollback: bool | None = None
) -> StalenessCheck | None:
    """Check the champion of ``alias`` against the documents as they are now; None when it has no champion."""
    from components import registry
    from components.db import connect

    auto_rollback = settings.auto_rollback if auto_rollback is None else auto_rollback
    with connect(settings) as conn:
        champion = registry.get_champion(conn, alias)
        if champion is None:
            return None
        rendering = _lineage(settings, champion)
        index = dict(rendering.get("index") or {})
        since = datetime.fromisoformat(index["last_ingest_at"]) if index.get("last_ingest_at") else champion.created_at
        changed = changed_documents(conn, rendering, since)
        check = StalenessCheck(alias, champion.version, trigger, "qa", index, changed, fingerprint(changed))
        previous = latest_check(conn, alias, champion.version)
        # the same changed documents as the last check of this champion: its verdict stands, unless it is a stale
        # one that was not rolled back and now should be
        rollback_due = previous is not None and previous.stale and previous.rolled_back_to is None and auto_rollback
        if previous and previous.documents_fingerprint == check.documents_fingerprint and not rollback_due:
            previous.reused = True
            return previous
        check.basis, questions = stale_questions(settings, conn, rendering, changed)
        conn.commit()
        check.questions = len(questions)
        if questions:
            answers, texts = _ask(settings, alias, questions, conn)
            _score(check, questions, answers, texts, settings.gate_alpha)
        else:
            check.stale, check.p_value, check.reason = verdict([], [], settings.gate_alpha)
    return finish(settings, check, auto_rollback)


def finish(settings: Settings, check: StalenessCheck, auto_rollback: bool) -> StalenessCheck:
    """Act on a check's verdict: roll a stale champion back when ``auto_rollback``, then store the check."""
    from components.db import connect

    if check.stale and auto_rollback:
        _roll_back(settings, check)
    with connect(settings) as conn:
        save_check(conn, check)
    return check


def _score(
    check: StalenessCheck, questions: list[StaleQuestion], answers: dict[str, Any], texts: Any, alpha: float
) -> None:
    hits: dict[str, list[bool]] = {}
    for arm in STALE_ARMS:
        got = answers[arm].answers
        if got and all(a.error for a in got):
            raise ServiceError(f"every {arm} request of the staleness check failed (first: {got[0].error})")
        hits[arm] = [outcome(q, a.text, texts[(q.source, q.document)]) for q, a in zip(questions, got, strict=True)]
        check.scores[arm] = round(sum(hits[arm]) / len(questions), 4)
    check.stale, check.p_value, check.reason = verdict(hits[HYBRID], hits[BASE_RAG], alpha)
    fallbacks = sum(a.fallback for a in answers[HYBRID].answers)
    if fallbacks:  # the gateway answered without the adapter: the scores say nothing about it
        check.stale = False
        check.reason = f"no verdict: the gateway served {fallbacks} hybrid answers without the adapter; {check.reason}"
    check.outcomes = [
        {"id": q.id, "question": q.question[:300], "reference": q.reference[:300], "document": q.document,
         "origin": q.origin, "retired": q.retired,
         **{arm: {"answer": answers[arm].answers[i].text[:300], "correct": hits[arm][i]} for arm in STALE_ARMS}}
        for i, q in enumerate(questions)
    ]  # fmt: skip


def _roll_back(settings: Settings, check: StalenessCheck) -> None:
    """Return the alias to its previous champion and record why on the version it leaves."""
    from components import registry
    from components.db import connect
    from components.training.promotion import MAX_REASON, rollback

    try:
        done = rollback(settings, check.alias)
    except (ConfigError, ServiceError) as exc:
        check.rollback_error = str(exc)[:500]
        log.error("stale champion %s v%d not rolled back: %s", check.alias, check.adapter_version, exc)
        return
    check.rolled_back_to = done.version
    reason = f"rolled back to v{done.version} by the staleness check: {check.reason}"[:MAX_REASON]
    with connect(settings) as conn:
        registry.set_status(
            conn, check.alias, check.adapter_version, "rolled_back", reason, actor=f"staleness:{check.trigger}"
        )


_CHECK_COLUMNS = (
    "alias, adapter_version, trigger, basis, trained_index, changed_documents, documents_fingerprint, questions, "
    "hybrid_accuracy, adapter_accuracy, base_rag_accuracy, p_value, stale, reason, rolled_back_to, rollback_error, "
    "outcomes"
)


def save_check(conn: psycopg.Connection, check: StalenessCheck) -> int:
    """Store one check; sets and returns ``check.check_id``."""
    row = conn.execute(
        f"INSERT INTO staleness_checks ({_CHECK_COLUMNS}) VALUES ({', '.join(['%s'] * 17)}) RETURNING id, checked_at",
        (check.alias, check.adapter_version, check.trigger, check.basis, Jsonb(check.trained_index),
         Jsonb(check.changed_documents), check.documents_fingerprint, check.questions, check.scores.get(HYBRID),
         check.scores.get("adapter"), check.scores.get(BASE_RAG), check.p_value, check.stale, check.reason,
         check.rolled_back_to, check.rollback_error, Jsonb(check.outcomes)),
    ).fetchone()  # fmt: skip
    conn.commit()
    assert row is not None
    check.check_id, check.checked_at = int(row[0]), row[1]
    return check.check_id


def _from_row(row: tuple[Any, ...]) -> StalenessCheck:
    (alias, version, trigger, basis, index, changed, fp, questions, hybrid, adapter, base_rag, p, stale, reason,
     rolled, error, outcomes, check_id, checked_at) = row  # fmt: skip
    scores = {HYBRID: hybrid, "adapter": adapter, BASE_RAG: base_rag}
    return StalenessCheck(alias, version, trigger, basis, index or {}, changed, fp, questions, scores, p, stale,
                          reason, rolled, error, outcomes, check_id, checked_at)  # fmt: skip


def latest_check(conn: psycopg.Connection, alias: str, version: int) -> StalenessCheck | None:
    row = conn.execute(
        f"""SELECT {_CHECK_COLUMNS}, id, checked_at FROM staleness_checks WHERE alias = %s AND adapter_version = %s
             ORDER BY checked_at DESC, id DESC LIMIT 1""",
        (alias, version),
    ).fetchone()
    return _from_row(row) if row else None


def champion_staleness(conn: psycopg.Connection) -> list[tuple[str, int, StalenessCheck | None]]:
    """(alias, champion version, its latest check or None) for every alias with a champion; [] before 0013."""
    exists = conn.execute("SELECT to_regclass('staleness_checks') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return []
    rows = conn.execute(
        f"""SELECT a.alias, a.version, s.* FROM adapter_versions a
              LEFT JOIN LATERAL (SELECT {_CHECK_COLUMNS}, id, checked_at FROM staleness_checks c
                                  WHERE c.alias = a.alias AND c.adapter_version = a.version
                                  ORDER BY c.checked_at DESC, c.id DESC LIMIT 1) s ON true
             WHERE a.status = 'champion' ORDER BY a.alias"""
    ).fetchall()
    return [(r[0], int(r[1]), _from_row(r[2:]) if r[2] is not None else None) for r in rows]


def check_all(settings: Settings, alias: str | None = None, *, trigger: str = "cli") -> list[StalenessCheck]:
    """Check ``alias``'s champion, or every alias's; an unknown alias is an error."""
    from components import registry
    from components.db import connect

    with connect(settings) as conn:
        aliases = sorted(registry.champions(conn))
    if alias is not None:
        if alias not in aliases:
            raise ConfigError(
                f"alias {alias!r} has no champion to check; expected one of: {', '.join(aliases) or '(none)'}"
            )
        aliases = [alias]
    return [c for a in aliases if (c := check_alias(settings, a, trigger=trigger)) is not None]

"""Each alias's held-out gate questions: fixed at the alias's first training, versioned in Postgres.

The gate must judge a candidate on questions its caller did not pick. So the held-out set is drawn once, at the
alias's first training, from the test split (by hash, ``split_dataset``) of the alias's own data (its approved
snapshot in the intake store; the run's data only when the alias has none), stored in ``gate_heldout_sets`` with a
version and a content hash, and asked by every later gate. A run's ``data`` can add training examples, never questions.
(A set drawn empty, from too few examples, is replaced once by the first non-empty draw from the alias's own data.)
A new version is made only by an explicit admin action (``tandem train --new-heldout``), drawn from the test split
of the data given then, and recorded with who asked; every verdict records the version it was judged on.

Training examples that the gate asks (same example, or the same final question, as in the held-out set, the QA
set or the general set) are dropped from training and reported: a memorised answer would pass the gate.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from components.errors import ConfigError
from components.evaluation.scoring import normalize
from components.settings import Settings
from components.training.data import Dataset, Example, dataset_version, load_dataset, split_dataset


@dataclass(frozen=True)
class HeldoutSet:
    alias: str
    version: int
    content_hash: str
    examples: list[Example]
    origin: str  # the data location it was drawn from
    reason: str  # "first training" or "--new-heldout by <who>"
    created_at: datetime

    def lineage(self) -> dict[str, Any]:
        """What a verdict records: which questions it was judged on."""
        return {
            "version": self.version,
            "hash": self.content_hash,
            "size": len(self.examples),
            "origin": self.origin,
            "reason": self.reason,
        }


def _record(e: Example) -> dict[str, Any]:
    return {"messages": [list(t) for t in e.messages], "origin": e.origin, "source": e.source, "plain": e.plain}


def _example(r: dict[str, Any]) -> Example:
    from components.training.data import example_digest

    turns = tuple((str(role), str(content)) for role, content in r["messages"])
    return Example(turns, str(r["origin"]), example_digest(turns), r.get("source"), bool(r.get("plain")))


def current(conn: psycopg.Connection, alias: str) -> HeldoutSet | None:
    """The alias's held-out set in force (its highest version), or None before its first training."""
    row = conn.execute(
        """SELECT version, content_hash, examples, origin, reason, created_at FROM gate_heldout_sets
            WHERE alias = %s ORDER BY version DESC LIMIT 1""",
        (alias,),
    ).fetchone()
    if row is None:
        return None
    examples = row[2] if isinstance(row[2], list) else json.loads(row[2])
    return HeldoutSet(alias, int(row[0]), str(row[1]), [_example(r) for r in examples], row[3], row[4], row[5])


def draw(examples: Sequence[Example], fraction: float) -> list[Example]:
    """The held-out examples of a dataset: its test split, by hash (stable, a function of content alone)."""
    return split_dataset(list(examples), fraction).test


def _save(conn: psycopg.Connection, alias: str, examples: list[Example], origin: str, reason: str) -> None:
    conn.execute(
        """INSERT INTO gate_heldout_sets (alias, version, content_hash, examples, size, origin, reason)
           VALUES (%s, COALESCE((SELECT max(version) FROM gate_heldout_sets WHERE alias = %s), 0) + 1,
                   %s, %s, %s, %s, %s)""",
        (
            alias,
            alias,
            dataset_version(e.digest for e in examples),
            Jsonb([_record(e) for e in examples]),
            len(examples),
            origin,
            reason,
        ),
    )


def _alias_data(conn: psycopg.Connection, settings: Settings, alias: str) -> Dataset:
    """The alias's own data: its approved snapshot in the intake store, landing files imported first."""
    from components.training.landing import alias_dataset

    return alias_dataset(settings, alias, conn)


def _own_data(conn: psycopg.Connection, settings: Settings, alias: str, data: str | None) -> Dataset:
    """The alias's own data; the run's ``data`` only when the alias has none (a new alias's first training)."""
    try:
        return _alias_data(conn, settings, alias)
    except ConfigError:
        if not data:
            raise
        return load_dataset(data)


def _refill(conn: psycopg.Connection, settings: Settings, alias: str) -> tuple[list[Example], str] | None:
    """A first non-empty draw from the alias's own data (never a run's), when the stored set is empty: an alias
    first trained on a handful of examples has no test split yet, and must not stay without one for good."""
    try:
        ds = _alias_data(conn, settings, alias)
    except ConfigError:
        return None
    examples = draw(ds.examples, settings.train_heldout_fraction)
    return (examples, ds.location) if examples else None


def ensure(conn: psycopg.Connection, settings: Settings, alias: str, data: str | None = None) -> HeldoutSet:
    """The alias's held-out set, drawn and stored now if this is its first training (idempotent, locked)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"heldout:{alias}",))
        found = current(conn, alias)
        if found is None:
            ds = _own_data(conn, settings, alias, data)
            _save(conn, alias, draw(ds.examples, settings.train_heldout_fraction), ds.location, "first training")
            found = current(conn, alias)
        elif not found.examples and (refill := _refill(conn, settings, alias)) is not None:
            _save(conn, alias, refill[0], refill[1], f"first non-empty draw (v{found.version} was empty)")
            found = current(conn, alias)
    assert found is not None
    return found


def renew(conn: psycopg.Connection, settings: Settings, alias: str, data: str | None, by: str) -> HeldoutSet:
    """The admin action `tandem train --new-heldout`: a new version drawn from the test split of ``data`` (default
    the alias's data). Unchanged content makes no new version."""
    ds = load_dataset(data) if data else _alias_data(conn, settings, alias)
    examples = draw(ds.examples, settings.train_heldout_fraction)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"heldout:{alias}",))
        found = current(conn, alias)
        if found is None or found.content_hash != dataset_version(e.digest for e in examples):
            _save(conn, alias, examples, ds.location, f"--new-heldout by {by}")
            found = current(conn, alias)
    assert found is not None
    return found


def _question(e: Example) -> str:
    users = [content for role, content in e.messages if role == "user"]
    return normalize(users[-1]) if users else ""


def qa_rows(path: str) -> list[Any]:
    """The parsed lines of a QA file (JSONL, any fsspec location): [] when it does not exist; a line that is not
    JSON raises ValueError. The gate's sets and the contamination check both read QA files through it."""
    import fsspec

    try:
        with fsspec.open(path, "r", encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        return []


def qa_questions(path: str | None) -> set[str]:
    """The normalised questions of a QA file (empty when there is none or it does not parse)."""
    if not path:
        return set()
    try:
        rows = qa_rows(path)
    except ValueError:
        return set()
    return {normalize(str(r["question"])) for r in rows if isinstance(r, dict) and r.get("question")}


def missing_gate_set(path: str) -> ConfigError:
    """The one-line refusal for a gate QA set that is named (TANDEM_GATE_QA_SET) but has no question to ask."""
    return ConfigError(
        f"gate QA set {path} (TANDEM_GATE_QA_SET) is missing or holds no question: expected a JSONL file of "
        '{"question", "answer"} lines'
    )


def drop_contaminated(
    settings: Settings, examples: Iterable[Example], held: HeldoutSet
) -> tuple[list[Example], list[str]]:
    """The examples the gate does not ask, and ``origin: why`` for each one dropped from training."""
    digests = {e.digest for e in held.examples}
    gate_asks = qa_questions(settings.gate_questions)
    if settings.gate_qa_set and not gate_asks:  # refused before training, not after it at the gate
        raise missing_gate_set(settings.gate_qa_set)
    asked = {
        "the held-out set": {_question(e) for e in held.examples} - {""},
        "the QA set": qa_questions(settings.qa_set),
        "the gate's QA set": gate_asks,
        "the general set": qa_questions(settings.general_set),
    }
    kept, dropped = [], []
    for e in examples:
        question = _question(e)
        if e.digest in digests:
            dropped.append(f"{e.origin}: in the held-out set v{held.version}")
            continue
        where = next((name for name, questions in asked.items() if question in questions), None)
        if where is not None:
            dropped.append(f"{e.origin}: its question is asked by the gate ({where})")
            continue
        kept.append(e)
    return kept, dropped

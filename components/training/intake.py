"""Domain data intake per alias: JSONL examples validated, deduplicated and stored in Postgres for review.

Every example that reaches Tandem (`tandem data add`, the landing location, a correction posted as feedback) is a
``domain_examples`` row (migration 0011), keyed by its content hash per alias, ``pending`` until a person approves
or rejects it (``review``), or approved at intake where the source is trusted (``--approve``, landing files with
TANDEM_INTAKE_AUTO_APPROVE). A line is validated by ``components.training.data`` (the rules training applies);
here a file is refused whole on any bad line, with ``file:line: why``, and nothing of it is stored. A line over
TANDEM_INTAKE_MAX_LINE_BYTES is refused without being read into memory. Duplicates, in the file or already stored
(whatever their status: a rejected example does not come back), are skipped and reported.

A training run reads a ``snapshot``: the ids approved at that moment, versioned per alias (a new version only when
the approved set changed), loaded as the pipeline's ``Dataset``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any

import fsspec
import psycopg
from psycopg.types.json import Jsonb

from components.errors import ConfigError
from components.settings import Settings
from components.training.data import (
    Dataset,
    Example,
    dataset_version,
    example_digest,
    parse_record,
    record_options,
)

ALIAS_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
MAX_REPORTED = 20  # problems or skipped lines listed in a report


class IntakeError(ConfigError):
    """A file refused: its first problem on one line (how many more), every problem in ``problems``."""

    def __init__(self, problems: list[str]) -> None:
        more = f" (and {len(problems) - 1} more bad lines)" if len(problems) > 1 else ""
        super().__init__(f"{problems[0]}{more}; nothing was stored")
        self.problems = problems


@dataclass(frozen=True)
class Line:
    """One valid line of a JSONL file."""

    where: str  # file:line
    turns: tuple[tuple[str, str], ...]
    source: str | None
    plain: bool
    lineno: int = 0  # in its file; 0 for an example that came from no file (a feedback correction)

    @property
    def digest(self) -> str:
        return example_digest(self.turns)

    def record(self) -> dict[str, Any]:
        return {
            "messages": [{"role": r, "content": c} for r, c in self.turns],
            "source": self.source,
            "rag": not self.plain,
        }


@dataclass
class AddReport:
    alias: str
    location: str
    added: list[int] = field(default_factory=list)  # ids of the new rows
    status: str = "pending"
    skipped: list[str] = field(default_factory=list)  # "file:line: duplicate of ..."

    def to_dict(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "location": self.location,
            "added": len(self.added),
            "ids": self.added,
            "status": self.status,
            "skipped": len(self.skipped),
            "skipped_lines": self.skipped[:MAX_REPORTED],
        }


@dataclass
class StoredExample:
    id: int
    alias: str
    status: str
    origin: str
    example: dict[str, Any]
    context: dict[str, Any] | None
    submitted_by: str | None
    reviewed_by: str | None
    reviewed_at: datetime | None
    review_note: str | None
    created_at: datetime

    @property
    def question(self) -> str:
        users = [m["content"] for m in self.example["messages"] if m["role"] == "user"]
        return str(users[-1]) if users else ""

    @property
    def answer(self) -> str:
        return str(self.example["messages"][-1]["content"])

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "question": self.question, "answer": self.answer}


@dataclass(frozen=True)
class Snapshot:
    alias: str
    version: int
    content_hash: str  # dataset_version of the example hashes: the pipeline's Dataset.version
    example_ids: list[int]
    created_at: datetime

    def lineage(self) -> dict[str, Any]:
        return {"alias": self.alias, "version": self.version, "hash": self.content_hash, "size": len(self.example_ids)}


@dataclass
class SnapshotDataset(Dataset):
    """The examples of an approved snapshot, as the pipeline reads them."""

    snapshot: Snapshot | None = None


def _lines(fh: IO[bytes], limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) of each line; None for a line over ``limit`` bytes, skipped in chunks, never held."""
    lineno = 0
    while raw := fh.readline(limit + 1):
        lineno += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = fh.readline(limit + 1)
            yield lineno, None
        else:
            yield lineno, raw


def read_jsonl(fh: IO[bytes], name: str, max_line_bytes: int) -> tuple[list[Line], list[str], list[str]]:
    """The valid lines of a JSONL stream, its problems and its duplicate lines, each as ``name:line: why``."""
    lines: list[Line] = []
    problems: list[str] = []
    duplicates: list[str] = []
    first: dict[str, int] = {}
    for lineno, raw in _lines(fh, max_line_bytes):
        where = f"{name}:{lineno}"
        if raw is None:
            problems.append(f"{where}: line longer than {max_line_bytes} bytes (TANDEM_INTAKE_MAX_LINE_BYTES)")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"{where}: not UTF-8 text")
            continue
        if not text.strip():
            continue
        try:
            record = json.loads(text)
            turns = parse_record(record)
            source, plain = record_options(record)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not JSON ({exc.msg})")
            continue
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        line = Line(where, turns, source, plain, lineno)
        if line.digest in first:
            duplicates.append(f"{where}: duplicate of line {first[line.digest]}")
            continue
        first[line.digest] = lineno
        lines.append(line)
    return lines, problems, duplicates


def read_file(location: str, max_line_bytes: int) -> tuple[list[Line], list[str]]:
    """The valid lines of a JSONL file (path or fsspec URL) and its duplicates; IntakeError on any bad line."""
    try:
        with fsspec.open(location, "rb") as fh:
            lines, problems, duplicates = read_jsonl(fh, location, max_line_bytes)
    except FileNotFoundError:
        raise ConfigError(f"{location} not found: expected a JSONL file") from None
    except IsADirectoryError:
        raise ConfigError(f"{location} is a folder: expected a JSONL file") from None
    if problems:
        raise IntakeError(problems)
    if not lines:
        raise ConfigError(f"{location} holds no examples: expected JSONL lines of messages or question/answer")
    return lines, duplicates


def known_aliases(conn: psycopg.Connection, settings: Settings) -> list[str]:
    """The aliases data may be added for: default_alias, TANDEM_ALIASES, and every alias in the adapter registry."""
    rows = conn.execute("SELECT DISTINCT alias FROM adapter_versions").fetchall()
    return sorted({settings.default_alias, *settings.aliases, *(r[0] for r in rows)})


def check_alias(conn: psycopg.Connection, settings: Settings, alias: str) -> None:
    known = known_aliases(conn, settings)
    if alias not in known:
        raise ConfigError(
            f"unknown alias {alias!r}: expected one of {', '.join(known)} (add it to TANDEM_ALIASES to accept data "
            "for a new alias)"
        )


def store(
    conn: psycopg.Connection,
    alias: str,
    lines: Sequence[Line],
    origin: str,
    *,
    submitted_by: str,
    approved_by: str | None = None,
    context: dict[str, Any] | None = None,
) -> tuple[list[int], list[str]]:
    """Insert the lines not yet stored for ``alias`` in one transaction (``origin``:line each; approved when
    ``approved_by`` is given); returns the new ids and the lines skipped as already stored. The lines travel by
    COPY into a temporary table, so a file of thousands of examples is three statements."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"intake:{alias}",))
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS intake_batch (n int, h text, e jsonb, o text) ON COMMIT DROP")
        conn.execute("TRUNCATE intake_batch")
        with conn.cursor().copy("COPY intake_batch (n, h, e, o) FROM STDIN") as copy:
            for n, x in enumerate(lines):
                where = f"{origin}:{x.lineno}" if x.lineno else origin
                copy.write_row((n, x.digest, json.dumps(x.record(), ensure_ascii=False), where))
        rows = conn.execute(
            """SELECT b.n, d.id, d.status FROM intake_batch b
                 JOIN domain_examples d ON d.alias = %s AND d.content_hash = b.h ORDER BY b.n""",
            (alias,),
        ).fetchall()
        skipped = [f"{lines[n].where}: already stored as #{id_} ({status})" for n, id_, status in rows]
        if len(rows) == len(lines):
            return [], skipped
        ids = conn.execute(
            """INSERT INTO domain_examples (alias, content_hash, example, origin, status, submitted_by, reviewed_by,
                                            reviewed_at, context)
               SELECT %(alias)s, b.h, b.e, b.o, %(status)s, %(by)s, %(approver)s,
                      CASE WHEN %(approver)s::text IS NOT NULL THEN now() END, %(context)s
                 FROM intake_batch b
                WHERE NOT EXISTS (SELECT 1 FROM domain_examples d WHERE d.alias = %(alias)s AND d.content_hash = b.h)
                ORDER BY b.n
            RETURNING id""",
            {
                "alias": alias,
                "status": "approved" if approved_by else "pending",
                "by": submitted_by,
                "approver": approved_by,
                "context": Jsonb(context) if context is not None else None,
            },
        ).fetchall()
    return sorted(int(r[0]) for r in ids), skipped


def add_examples(
    conn: psycopg.Connection,
    settings: Settings,
    alias: str,
    location: str,
    *,
    submitted_by: str,
    approve: bool = False,
) -> AddReport:
    """`tandem data add`: validate a JSONL file and store its new examples for a known alias, all or nothing;
    pending unless ``approve`` (then approved by ``submitted_by``). Commits."""
    check_alias(conn, settings, alias)
    lines, duplicates = read_file(location, settings.intake_max_line_bytes)
    ids, stored = store(
        conn, alias, lines, f"cli:{location}", submitted_by=submitted_by, approved_by=submitted_by if approve else None
    )
    conn.commit()
    return AddReport(alias, location, ids, "approved" if approve else "pending", duplicates + stored)


_SELECT = """SELECT id, alias, status, origin, example, context, submitted_by, reviewed_by, reviewed_at,
                    review_note, created_at FROM domain_examples"""


def list_examples(
    conn: psycopg.Connection, alias: str | None = None, status: str | None = None, limit: int | None = None
) -> list[StoredExample]:
    """Stored examples, oldest first, optionally of one alias and status."""
    rows = conn.execute(
        f"""{_SELECT} WHERE (%(alias)s::text IS NULL OR alias = %(alias)s)
               AND (%(status)s::text IS NULL OR status = %(status)s) ORDER BY id LIMIT %(limit)s""",
        {"alias": alias, "status": status, "limit": limit},
    ).fetchall()
    return [StoredExample(*r) for r in rows]


def pending(conn: psycopg.Connection, alias: str | None = None, limit: int | None = None) -> list[StoredExample]:
    return list_examples(conn, alias, "pending", limit)


@dataclass
class ReviewReport:
    decision: str
    by: str
    changed: dict[str, list[int]] = field(default_factory=dict)  # alias -> ids now approved or rejected
    skipped: list[str] = field(default_factory=list)  # "#id: already approved by ..."

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def review(
    conn: psycopg.Connection,
    ids: Sequence[int],
    decision: str,
    by: str,
    note: str | None = None,
) -> ReviewReport:
    """Approve pending examples, or reject pending or approved ones (recorded with ``by`` and ``note``); any other
    id is skipped and reported (a rejected example is never approved), an unknown id refuses the whole call.
    Commits."""
    if decision not in ("approve", "reject"):
        raise ConfigError(f"decision must be approve or reject (got {decision!r})")
    wanted = sorted({int(i) for i in ids})
    report = ReviewReport(decision, by)
    with conn.transaction():
        rows = conn.execute(
            "SELECT id, alias, status, reviewed_by FROM domain_examples WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
            (wanted,),
        ).fetchall()
        missing = sorted(set(wanted) - {r[0] for r in rows})
        if missing:
            raise ConfigError(f"no domain example with id {', '.join(map(str, missing))}: see `tandem data list`")
        # approving takes pending examples only (a rejected one never comes back); rejecting also withdraws an
        # approved one from the next snapshot
        open_ = ("pending",) if decision == "approve" else ("pending", "approved")
        todo = [r for r in rows if r[2] in open_]
        report.skipped = [
            f"#{r[0]}: already {r[2]}" + (f" by {r[3]}" if r[3] else "") for r in rows if r[2] not in open_
        ]
        if todo:
            conn.execute(
                """UPDATE domain_examples SET status = %s, reviewed_by = %s, reviewed_at = now(), review_note = %s
                    WHERE id = ANY(%s)""",
                ("approved" if decision == "approve" else "rejected", by, note, [r[0] for r in todo]),
            )
        for r in todo:
            report.changed.setdefault(r[1], []).append(int(r[0]))
    conn.commit()
    return report


def snapshot(conn: psycopg.Connection, alias: str) -> Snapshot:
    """The alias's approved examples as a versioned snapshot: the latest one when the approved set is unchanged,
    else a new version. ConfigError when nothing is approved. One transaction block (a savepoint inside the
    caller's transaction)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"snapshot:{alias}",))
        rows = conn.execute(
            "SELECT id, content_hash FROM domain_examples WHERE alias = %s AND status = 'approved' ORDER BY id",
            (alias,),
        ).fetchall()
        if not rows:
            raise ConfigError(
                f"domain data for alias {alias!r} not found: no approved examples in the store; add some with "
                f"`tandem data add --alias {alias} FILE` and approve them (`tandem data review`)"
            )
        ids, digest = [int(r[0]) for r in rows], dataset_version(r[1] for r in rows)
        latest = conn.execute(
            """SELECT version, content_hash, example_ids, created_at FROM domain_snapshots WHERE alias = %s
                ORDER BY version DESC LIMIT 1""",
            (alias,),
        ).fetchone()
        if latest is not None and latest[1] == digest and sorted(latest[2]) == ids:
            found = Snapshot(alias, int(latest[0]), digest, ids, latest[3])
        else:
            version = (int(latest[0]) if latest else 0) + 1
            (created,) = conn.execute(
                """INSERT INTO domain_snapshots (alias, version, content_hash, example_ids, size)
                   VALUES (%s, %s, %s, %s, %s) RETURNING created_at""",
                (alias, version, digest, ids, len(ids)),
            ).fetchone() or (None,)
            found = Snapshot(alias, version, digest, ids, created)
    return found


def load_snapshot(conn: psycopg.Connection, snap: Snapshot) -> SnapshotDataset:
    """A snapshot's examples as the pipeline's Dataset (its version is the snapshot's content hash)."""
    rows = conn.execute(
        "SELECT id, origin, example FROM domain_examples WHERE id = ANY(%s) ORDER BY id", (snap.example_ids,)
    ).fetchall()
    examples = []
    for id_, origin, example in rows:
        turns = tuple((str(m["role"]), str(m["content"])) for m in example["messages"])
        examples.append(
            Example(
                turns, f"#{id_} {origin}", example_digest(turns), example.get("source"), not example.get("rag", True)
            )
        )
    location = f"domain_snapshots:{snap.alias}:v{snap.version}"
    return SnapshotDataset(location=location, examples=examples, snapshot=snap)


def describe(ex: StoredExample) -> str:
    """What a reviewer reads (Markdown): the question, the answer given, the correction and the cited sources."""
    ctx = ex.context or {}
    parts = [f"**#{ex.id}** alias `{ex.alias}`, from `{ex.origin}`, by {ex.submitted_by or 'unknown'}"]
    parts.append(f"**Question:** {ctx.get('question') or ex.question}")
    if ctx.get("answer_given") is not None:
        version = f" (adapter v{ctx['version']})" if ctx.get("version") else ""
        parts.append(f"**Answer given{version}:** {ctx['answer_given']}")
        parts.append(f"**Correction:** {ctx.get('correction') or ex.answer}")
        if ctx.get("rating") is not None:
            parts.append(f"**Rating:** {ctx['rating']}")
        sources = ctx.get("sources") or []
        cited = [
            f"[{s.get('n')}] {s.get('path')}" + (f" > {s['heading']}" if s.get("heading") else "") for s in sources
        ]
        parts.append("**Cited sources:** " + ("; ".join(cited) if cited else "none"))
    else:
        parts.append(f"**Answer:** {ex.answer}")
        if ex.example.get("source"):
            parts.append(f"**Source:** {ex.example['source']}")
    return "\n\n".join(parts)

"""The held-out QA set: JSON Lines of ``{"id", "question", "answer", "source"}``, validated on read."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from components.errors import ConfigError

REQUIRED = ("id", "question", "answer", "source")


@dataclass(frozen=True)
class QAItem:
    """One held-out question; ``source`` is the document path relative to the documents root."""

    id: str
    question: str
    answer: str
    source: str


def load_qa(path: str | Path, limit: int | None = None) -> list[QAItem]:
    """Read and validate a QA file; any bad line fails the whole read with its file and line number.

    Unlike training data, a held-out set is small and hand-written: a silently skipped line would change the
    score's denominator, so it is an error. ``limit`` keeps the first N questions (file order).
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"QA set {file} not found; expected a JSONL file of {{{', '.join(REQUIRED)}}} lines")
    items: list[QAItem] = []
    seen: set[str] = set()
    for lineno, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected a JSON object with {', '.join(REQUIRED)}")
        missing = [k for k in REQUIRED if not isinstance(row.get(k), str | int) or not str(row[k]).strip()]
        if missing:
            raise ConfigError(f"{where}: missing or empty {', '.join(missing)}")
        item = QAItem(*(str(row[k]).strip() for k in REQUIRED))
        if item.id in seen:
            raise ConfigError(f"{where}: duplicate id {item.id!r}")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise ConfigError(f"QA set {file} has no questions")
    return items[:limit] if limit else items


def qa_fingerprint(items: list[QAItem]) -> str:
    """A short hash of the questions and answers, so scores from different QA sets are never compared."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.id, item.question, item.answer, item.source]).encode())
    return digest.hexdigest()[:16]

"""Domain training data: JSONL chat examples (or question/answer pairs) read from a folder, file or fsspec URL.

Each line is either ``{"messages": [{"role": ..., "content": ...}, ...]}`` ending with an assistant turn, or
``{"question": ..., "answer": ...}``, optionally with ``"source"`` (the document that holds the answer) and
``"rag": false`` (a plain example, trained without sources; see ``components.training.raft``). Bad lines are
reported as ``file:line: why`` and skipped. Examples are normalised (whitespace collapsed), deduplicated, and
hashed; the dataset version is the hash of the sorted example hashes, so it changes only when the set of
examples does. Every example falls into train, validation (early stopping) or test (the evaluation gate) by
its own hash, so the split is stable across runs and a new example never moves an old one.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec

from components.errors import ConfigError

ROLES = ("system", "user", "assistant")
_SPACE = re.compile(r"[ \t]+")


@dataclass(frozen=True)
class Example:
    messages: tuple[tuple[str, str], ...]  # (role, content), normalised
    origin: str  # file:line of its first occurrence
    digest: str
    source: str | None = None  # the document that holds the answer, when the example names it
    plain: bool = False  # "rag": false: trained without sources (vocabulary, format, tone)

    def as_messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The conversation up to (not including) the final assistant answer."""
        return self.as_messages()[:-1]

    @property
    def answer(self) -> str:
        return self.messages[-1][1]

    @property
    def bucket(self) -> float:
        """A number in [0, 1) fixed by the example's content: decides its split."""
        return int(self.digest[:12], 16) / float(1 << 48)


@dataclass
class Dataset:
    location: str
    examples: list[Example]
    problems: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    duplicates: int = 0

    @property
    def version(self) -> str:
        return dataset_version(e.digest for e in self.examples)

    @property
    def digests(self) -> set[str]:
        return {e.digest for e in self.examples}


@dataclass
class Split:
    train: list[Example]
    validation: list[Example]
    test: list[Example]


def _normalise(text: str) -> str:
    lines = [_SPACE.sub(" ", line).strip() for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip()


def parse_record(record: Any) -> tuple[tuple[str, str], ...]:
    """The normalised (role, content) turns of one JSONL record; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise ValueError('"messages" must be a non-empty list')
        turns = []
        for i, msg in enumerate(raw):
            if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
                raise ValueError(f"message {i} needs a role in {ROLES} and string content")
            content = _normalise(msg["content"])
            if not content:
                raise ValueError(f"message {i} has empty content")
            turns.append((msg["role"], content))
    elif "question" in record and "answer" in record:
        q, a = record["question"], record["answer"]
        if not isinstance(q, str) or not isinstance(a, str) or not q.strip() or not a.strip():
            raise ValueError('"question" and "answer" must be non-empty strings')
        turns = [("user", _normalise(q)), ("assistant", _normalise(a))]
    else:
        raise ValueError('expected {"messages": [...]} or {"question": ..., "answer": ...}')
    if turns[-1][0] != "assistant":
        raise ValueError("the last message must be the assistant's answer")
    if not any(role == "user" for role, _ in turns):
        raise ValueError("no user message")
    if any(role == "system" for role, _ in turns[1:]):
        raise ValueError("a system message may only come first")
    return tuple(turns)


def record_options(record: dict[str, Any]) -> tuple[str | None, bool]:
    """The optional ``source`` (a document path) and ``rag`` (false: a plain example) of one record."""
    source = record.get("source")
    if source is not None and (not isinstance(source, str) or not source.strip()):
        raise ValueError('"source" must be a document path (a non-empty string)')
    rag = record.get("rag", True)
    if not isinstance(rag, bool):
        raise ValueError('"rag" must be true or false')
    return (source.strip() if source else None), not rag


def example_digest(turns: tuple[tuple[str, str], ...]) -> str:
    return hashlib.sha256(json.dumps(turns, ensure_ascii=False).encode()).hexdigest()


def dataset_version(digests: Iterable[str]) -> str:
    """The hash of a set of examples: order and duplicates do not matter."""
    return hashlib.sha256("\n".join(sorted(set(digests))).encode()).hexdigest()[:16]


def _jsonl_files(location: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    fs, path = fsspec.core.url_to_fs(location)
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(".jsonl"))
    elif fs.exists(path):
        files = [path]
    else:
        raise ConfigError(f"training data {location} not found: expected a JSONL file or a folder of *.jsonl files")
    if not files:
        raise ConfigError(f"no *.jsonl files under {location}")
    return fs, files


def load_dataset(location: str) -> Dataset:
    """Read, validate and deduplicate every JSONL file at ``location`` (folder, file or fsspec URL)."""
    fs, files = _jsonl_files(location)
    ds = Dataset(location=location, examples=[], files=files)
    seen: set[str] = set()
    for path in files:
        with fs.open(path, "r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                    turns = parse_record(record)
                    source, plain = record_options(record)
                except json.JSONDecodeError as exc:
                    ds.problems.append(f"{where}: not JSON ({exc.msg})")
                    continue
                except ValueError as exc:
                    ds.problems.append(f"{where}: {exc}")
                    continue
                digest = example_digest(turns)
                if digest in seen:
                    ds.duplicates += 1
                    continue
                seen.add(digest)
                ds.examples.append(Example(turns, where, digest, source, plain))
    if not ds.examples:
        raise ConfigError(f"no valid examples in {location} ({len(ds.problems)} bad lines, first: {ds.problems[:1]})")
    return ds


def split_dataset(examples: list[Example], heldout_fraction: float) -> Split:
    """Test (gate) and validation (early stopping) each take ``heldout_fraction`` of the examples, by hash.

    With very little data, the example with the smallest hash is moved to validation so early stopping has
    something to measure; the choice is still a function of the content alone.
    """
    if not 0 <= heldout_fraction < 0.5:
        raise ConfigError(f"train_heldout_fraction must be in [0, 0.5) (got {heldout_fraction})")
    test = [e for e in examples if e.bucket < heldout_fraction]
    validation = [e for e in examples if heldout_fraction <= e.bucket < 2 * heldout_fraction]
    train = [e for e in examples if e.bucket >= 2 * heldout_fraction]
    if not validation and len(train) >= 2:
        first = min(train, key=lambda e: e.digest)
        train.remove(first)
        validation.append(first)
    return Split(train=train, validation=validation, test=test)


def data_location(settings: Any, alias: str) -> str:
    """The domain data of an alias: settings.train_data for the default alias, else domain_data_root/alias."""
    if alias == settings.default_alias:
        return str(settings.train_data)
    return f"{str(settings.domain_data_root).rstrip('/')}/{alias}"

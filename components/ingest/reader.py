"""Stage 1 of a sync: read, hash, skip unchanged, parse and chunk each listed document.

A small run does this in a thread of the syncing process. A large one does it in a child Python process
(:func:`read_in_child`): parsing and tokenising is Python that holds the GIL, and the embedding model needs
the GIL back after every one of its tensor operations, so beside it in one process the reader slows the
model by much more than its own CPU time. The child gets its job as one pickle on stdin and answers with
pickled batches on stdout; it dies with the parent (its next write fails) and is killed if the run stops.

This module imports nothing heavy (no torch, no database driver), so the child starts in a fraction of a
second.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from components.errors import ServiceError
from components.ingest.chunking import Chunk, chunk_text, load_tokenizer
from components.ingest.loaders import BadDocument, LoadedDocument, load_document
from components.ingest.sources import Source, SourceFile

log = logging.getLogger(__name__)
_BATCH = 8  # documents per message from the child: few messages, and the model's first window fills at once
_HEAD_DOCS = 32  # read in the parent while the child starts (about the model's first window of 64 chunks)

# What the index holds for a path: (content hash, chunking signature, has a document row).
Known = tuple[str | None, str | None, bool]
UNKNOWN: Known = (None, None, False)  # a path the index does not hold


@dataclass(frozen=True)
class ReadSpec:
    """Everything the reader needs besides the file list (picklable: it is the child's job)."""

    location: str
    tokenizer_path: str
    max_bytes: int
    chunk_tokens: int
    overlap: int
    chunking: str
    force: bool


@dataclass
class Prepared:
    """A document to embed and write."""

    file: SourceFile
    is_new: bool
    content_hash: str
    title: str
    metadata: dict[str, Any]
    chunks: list[Chunk]
    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))  # set by stage 2


@dataclass
class Failed:
    """A document that could not be indexed, and why (recorded in ingest_failures)."""

    path: str
    reason: str


@dataclass(frozen=True)
class Unchanged:
    """A document whose content and chunking are what the index holds: nothing to do."""

    path: str


Item = Prepared | Failed | Unchanged


def read_documents(
    spec: ReadSpec, files: list[SourceFile], known: dict[str, Known], src: Source | None = None
) -> Generator[Item, None, None]:
    """One item per file, in order."""
    src = src or Source(spec.location)
    tokenizer = load_tokenizer(spec.tokenizer_path)
    limit = spec.max_bytes
    for file in files:
        hash_, chunking, has_row = known.get(file.path, UNKNOWN)
        try:
            if file.size > limit:
                raise BadDocument(f"too large: {file.size} bytes, limit {limit} (TANDEM_INGEST_MAX_DOCUMENT_BYTES)")
            try:
                data = src.read_bytes(file.path)
            except OSError as exc:
                raise BadDocument(f"unreadable: {exc.strerror or exc}") from exc
            if len(data) > limit:
                raise BadDocument(f"too large: {len(data)} bytes, limit {limit} (TANDEM_INGEST_MAX_DOCUMENT_BYTES)")
            digest = hashlib.sha256(data).hexdigest()
            if not spec.force and hash_ == digest and chunking == spec.chunking:
                yield Unchanged(file.path)
                continue
            doc = load_document(file.path, data)
            chunks = chunk_document(doc, tokenizer, spec.chunk_tokens, spec.overlap)
            if not chunks:
                raise BadDocument("no text content")
            item: Item = Prepared(file, not has_row, digest, doc.title, doc.metadata, chunks)
        except BadDocument as exc:
            item = Failed(file.path, str(exc))
        except Exception as exc:  # a parser crashing on a malformed file must not stop the run
            log.warning("loading %s failed", file.path, exc_info=True)
            item = Failed(file.path, f"unreadable: {type(exc).__name__}: {str(exc)[:200]}")
        yield item


def chunk_document(doc: LoadedDocument, tokenizer: Any, max_tokens: int, overlap: int) -> list[Chunk]:
    """A loaded document's chunks: what the sync embeds (the benchmark times the model on the same texts)."""
    return chunk_text(
        doc.text, tokenizer=tokenizer, max_tokens=max_tokens, overlap=overlap, title=doc.title,
        body_start=doc.body_start,
    )  # fmt: skip


def read_in_child(
    spec: ReadSpec,
    files: list[SourceFile],
    known: dict[str, Known],
    stopped: Callable[[], bool],
    src: Source | None = None,
) -> Generator[Item, None, None]:
    """:func:`read_documents` run by a child process; the child is gone when this generator is closed.

    The first few files (at most an eighth of them, up to _HEAD_DOCS) are read here while the child starts,
    so its start-up (about 0.4 s) does not hold up the model's first window.
    """
    head = min(_HEAD_DOCS, len(files) // 8)
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the `components` package
    code = f"import sys; sys.path.insert(0, {root!r}); from components.ingest.reader import child_main; child_main()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    job = threading.Thread(target=_send_job, args=(proc.stdin, (spec, files[head:], known)), daemon=True)
    job.start()  # in a thread: a large job fills the pipe until the child, still starting, reads it
    try:
        yield from read_documents(spec, files[:head], known, src)
        job.join()
        while True:
            try:
                kind, payload = pickle.load(proc.stdout)  # noqa: S301 - our own child, over a private pipe
            except EOFError:
                if stopped():
                    return
                code_ = proc.wait()
                raise ServiceError(
                    f"the document reader process exited with code {code_} before it finished"
                    " (its error is in the log above)"
                ) from None
            if kind == "items":
                yield from payload
            elif kind == "error":
                raise ServiceError(f"the document reader process failed: {payload}")
            else:
                return
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        job.join()  # the kill broke its pipe, if it was still writing
        proc.stdout.close()


def _send_job(stdin: IO[bytes], job: tuple[Any, ...]) -> None:
    try:
        with contextlib.suppress(BrokenPipeError):  # a child that died at once is reported by the reader
            pickle.dump(job, stdin, protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        with contextlib.suppress(OSError):  # closed whatever happened: a child left waiting on stdin would hang
            stdin.close()


def child_main() -> None:
    """The child's side of :func:`read_in_child`: job on stdin, ``(kind, payload)`` pickles on stdout."""
    out: IO[bytes] = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print in a parser must not corrupt the stream: fd 1 now goes to stderr
    logging.basicConfig(level=logging.WARNING, format="tandem ingest reader: %(levelname)s %(message)s")
    try:
        spec, files, known = pickle.load(sys.stdin.buffer)  # noqa: S301 - from the parent that started us
        batch: list[Item] = []
        for item in read_documents(spec, files, known):
            batch.append(item)
            if len(batch) >= _BATCH:
                _send(out, ("items", batch))
                batch = []
        _send(out, ("items", batch))
        _send(out, ("end", None))
    except BrokenPipeError:  # the parent is gone or stopped reading: nothing left to do
        os._exit(0)
    except BaseException as exc:
        with contextlib.suppress(BrokenPipeError):
            _send(out, ("error", f"{type(exc).__name__}: {exc}"[:500]))
        raise SystemExit(1) from exc


def _send(out: IO[bytes], message: tuple[str, Any]) -> None:
    pickle.dump(message, out, protocol=pickle.HIGHEST_PROTOCOL)
    out.flush()

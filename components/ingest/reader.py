"""Stage 1 of a sync: read, hash, skip unchanged, parse and chunk each listed document.

Reading and hashing happen in a thread of the syncing process, so unchanged documents cost no parsing at
all. Parsing and chunking a changed document happens in a child process (:class:`ParseWorker`) whenever a
per-document limit is set (the default) or the run has many documents to parse: parsing and tokenising is
Python that holds the GIL, and the embedding model needs the GIL back after every one of its tensor
operations, so beside it in one process the parser slows the model by much more than its own CPU time.

The child parses one document at a time under the limits: a time limit (the parent kills it when a document
takes longer) and a memory limit (RLIMIT_AS, set once the child has loaded the tokenizer, to its size then
plus the allowance). A document over either is quarantined with the reason and a fresh child takes the next
one; a child that dies before it is ready fails the run. The child gets each document's bytes on stdin and
answers with a pickle on stdout; it dies with the parent (its stdin closes) and is killed when the run stops.

This module imports nothing heavy (no torch, no database driver), so the child starts in a fraction of a
second.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import time
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
_STARTUP_S = 120.0  # the most a fresh child may take to load the tokenizer and say it is ready
_POLL_S = 0.2  # how often a wait on the child checks whether the run was stopped

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
    timeout_s: float = 0.0  # per document parse; 0: none
    memory_mb: int = 0  # address space a document's parse may add to the idle child; 0: none

    @property
    def limited(self) -> bool:
        """Whether documents must be parsed in a child process (a thread can be neither timed out nor capped)."""
        return self.timeout_s > 0 or self.memory_mb > 0


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


Parse = Callable[[SourceFile, bytes, str, bool], "Item | None"]


def read_documents(
    spec: ReadSpec,
    files: list[SourceFile],
    known: dict[str, Known],
    src: Source | None = None,
    worker: ParseWorker | None = None,
) -> Generator[Item, None, None]:
    """One item per file, in order; changed documents are parsed by `worker`, or here when it is None.

    Ends early (without an item for the rest) when the worker reports that the run was stopped.
    """
    src = src or Source(spec.location)
    parse: Parse = worker.parse if worker is not None else _InThread(spec).parse
    limit = spec.max_bytes
    for file in files:
        if file.problem:
            yield Failed(file.path, file.problem)
            continue
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
        except BadDocument as exc:
            yield Failed(file.path, str(exc))
            continue
        digest = hashlib.sha256(data).hexdigest()
        if not spec.force and hash_ == digest and chunking == spec.chunking:
            yield Unchanged(file.path)
            continue
        item = parse(file, data, digest, not has_row)
        if item is None:  # the run was stopped
            return
        yield item


def parse_document(spec: ReadSpec, tokenizer: Any, path: str, data: bytes) -> tuple[str, dict[str, Any], list[Chunk]]:
    """(title, metadata, chunks) of one document; raises BadDocument with a one-line reason."""
    doc = load_document(path, data)
    chunks = chunk_document(doc, tokenizer, spec.chunk_tokens, spec.overlap)
    if not chunks:
        raise BadDocument("no text content")
    return doc.title, doc.metadata, chunks


def chunk_document(doc: LoadedDocument, tokenizer: Any, max_tokens: int, overlap: int) -> list[Chunk]:
    """A loaded document's chunks: what the sync embeds (the benchmark times the model on the same texts)."""
    return chunk_text(
        doc.text, tokenizer=tokenizer, max_tokens=max_tokens, overlap=overlap, title=doc.title,
        body_start=doc.body_start,
    )  # fmt: skip


def _reason(exc: BaseException, memory_mb: int) -> str:
    """The quarantine reason for an exception raised while parsing."""
    if isinstance(exc, BadDocument):
        return str(exc)
    if isinstance(exc, MemoryError):
        return f"over the memory limit: parsing needed more than {memory_mb} MiB (TANDEM_INGEST_DOCUMENT_MEMORY_MB)"
    if isinstance(exc, RecursionError):
        return "unreadable: nested too deeply to parse"
    return f"unreadable: {type(exc).__name__}: {str(exc)[:200]}"


class _InThread:
    """Parsing in the calling thread: only when no per-document limit is set."""

    def __init__(self, spec: ReadSpec) -> None:
        self.spec = spec
        self.tokenizer = load_tokenizer(spec.tokenizer_path)

    def parse(self, file: SourceFile, data: bytes, digest: str, is_new: bool) -> Item:
        try:
            title, metadata, chunks = parse_document(self.spec, self.tokenizer, file.path, data)
        except Exception as exc:  # a parser crashing on a malformed file must not stop the run
            if not isinstance(exc, BadDocument):
                log.warning("loading %s failed", file.path, exc_info=True)
            return Failed(file.path, _reason(exc, self.spec.memory_mb))
        return Prepared(file, is_new, digest, title, metadata, chunks)


class ParseWorker:
    """A child process that parses one document at a time under the spec's limits (see the module's doc).

    Reused from document to document; killed and replaced after a document that timed out, crashed it or ran
    out of memory (counted in ``restarts``). ``peak_mb`` is the largest resident size any child reported.
    """

    def __init__(self, spec: ReadSpec, stopped: Callable[[], bool] = lambda: False) -> None:
        self.spec = spec
        self.stopped = stopped
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = False
        self.peak_mb = 0.0
        self.restarts = 0

    def start(self) -> None:
        """Start a child now (it loads the tokenizer while the caller reads the first files)."""
        if self.proc is None:
            root = str(Path(__file__).resolve().parents[2])  # the folder holding the `components` package
            code = (
                f"import sys; sys.path.insert(0, {root!r}); "
                "from components.ingest.reader import child_main; child_main()"
            )
            # One tokenizer thread keeps its address space small; a Rust allocation failure aborts without a backtrace
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RUST_BACKTRACE": "0"}
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         env=env)  # fmt: skip
            self.ready = False
            with contextlib.suppress(BrokenPipeError):  # a child dead at once is reported by _ensure_ready
                self._send(self.spec)  # a few hundred bytes: fits the pipe, never blocks

    def parse(self, file: SourceFile, data: bytes, digest: str, is_new: bool) -> Item | None:
        """The document parsed by the child; None if the run was stopped while it worked."""
        for attempt in (1, 2):
            if not self._ensure_ready():
                return None
            try:
                self._send((file.path, data))
                break
            except (BrokenPipeError, ValueError):  # the idle child died (killed from outside): one fresh try
                self._discard()
                if attempt == 2:
                    raise ServiceError("the document reader process keeps dying before it reads a document") from None
        timeout = self.spec.timeout_s or None
        status, reply = self._receive(timeout)
        if status == "stopped":
            return None
        if status in ("timeout", "died"):
            self.restarts += 1
        if status == "timeout":
            self._discard()
            return Failed(file.path, f"timed out: parsing took over {self.spec.timeout_s:g} s "
                                     "(TANDEM_INGEST_DOCUMENT_TIMEOUT_S)")  # fmt: skip
        if status == "died":
            code = self._discard()
            return Failed(file.path, f"crashed the reader process ({_exit_text(code)})" + (
                f"; over the memory limit of {self.spec.memory_mb} MiB? (TANDEM_INGEST_DOCUMENT_MEMORY_MB)"
                if self.spec.memory_mb else ""))  # fmt: skip
        kind, payload, peak_mb, restart = reply
        self.peak_mb = max(self.peak_mb, peak_mb)
        if restart:  # after a MemoryError the child's heap is suspect: the next document gets a fresh one
            self.restarts += 1
            self._discard()
        if kind == "ok":
            title, metadata, chunks = payload
            return Prepared(file, is_new, digest, title, metadata, chunks)
        return Failed(file.path, payload)

    def close(self) -> None:
        self._discard()

    def _ensure_ready(self) -> bool:
        if self.proc is not None and self.ready:
            return True
        self.start()
        status, reply = self._receive(max(_STARTUP_S, self.spec.timeout_s))
        if status == "stopped":
            return False
        if status != "ok" or reply[0] != "ready":
            code = self._discard()
            raise ServiceError(
                f"the document reader process exited with code {code} before it finished"
                " (its error is in the log above)"
            )
        self.peak_mb = max(self.peak_mb, reply[2])
        self.ready = True
        return True

    def _send(self, message: Any) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        pickle.dump(message, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self.proc.stdin.flush()

    def _receive(self, timeout: float | None) -> tuple[str, Any]:
        """("ok", message), or ("timeout"|"died"|"stopped", None)."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        # One request, one reply: nothing is ever buffered past a reply, so select on the pipe is exact.
        while True:
            if self.stopped():
                self._discard()
                return "stopped", None
            wait = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
            if wait <= 0:
                return "timeout", None
            readable, _, _ = select.select([self.proc.stdout], [], [], wait)
            if readable:
                break
        try:
            return "ok", pickle.load(self.proc.stdout)  # noqa: S301 - our own child, over a private pipe
        except (EOFError, pickle.UnpicklingError):
            return "died", None

    def _discard(self) -> int | None:
        """Kill and reap the child, if any; its exit code."""
        proc, self.proc, self.ready = self.proc, None, False
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        code = proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()  # type: ignore[union-attr]
        return code


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def child_main() -> None:
    """The child's side of :class:`ParseWorker`: the spec, then (path, bytes) requests, one reply each."""
    out: IO[bytes] = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print in a parser must not corrupt the stream: fd 1 now goes to stderr
    logging.basicConfig(level=logging.WARNING, format="tandem ingest reader: %(levelname)s %(message)s")
    requests = sys.stdin.buffer
    try:
        spec: ReadSpec = pickle.load(requests)  # noqa: S301 - from the parent that started us
        tokenizer = load_tokenizer(spec.tokenizer_path)
        for name, sample in (("a.md", b"# A\n\nA b.\n"), ("a.html", b"<p>A b.</p>")):
            parse_document(spec, tokenizer, name, sample)  # import the parsers before measuring the idle size
        if spec.memory_mb:
            _limit_address_space(spec.memory_mb)
        _send(out, ("ready", None, _peak_mb(), False))
        while True:
            try:
                path, data = pickle.load(requests)  # noqa: S301
            except EOFError:  # the parent is done with us, or gone
                return
            try:
                reply: tuple[str, Any, float, bool] = ("ok", parse_document(spec, tokenizer, path, data), 0.0, False)
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                if not isinstance(exc, BadDocument | MemoryError | RecursionError):
                    log.warning("loading %s failed", path, exc_info=True)
                reply = ("bad", _reason(exc, spec.memory_mb), 0.0, isinstance(exc, MemoryError))
            _send(out, (reply[0], reply[1], _peak_mb(), reply[3]))
    except BrokenPipeError:  # the parent is gone or stopped reading: nothing left to do
        os._exit(0)


def _limit_address_space(memory_mb: int) -> None:
    """Cap this process's address space at its size now plus memory_mb (Linux; elsewhere a no-op)."""
    import resource

    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        log.warning("no /proc/self/status: the per-document memory limit is not applied here")
        return
    size_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmSize:"))
    limit = size_kb * 1024 + memory_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _peak_mb() -> float:
    """This process's peak resident size in MiB: VmHWM, since ru_maxrss counts the parent's size at the fork."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024, 1)  # bytes on macOS
    return round(next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024, 1)


def _send(out: IO[bytes], message: tuple[Any, ...]) -> None:
    pickle.dump(message, out, protocol=pickle.HIGHEST_PROTOCOL)
    out.flush()

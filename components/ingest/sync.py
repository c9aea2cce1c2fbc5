"""One sync run of a source into the index: the function the CLI, the DAG and the benchmark all call.

Three stages overlap so the embedding model, the ceiling on a CPU, never waits: a reader hashes, parses
and chunks documents (``reader.py``: parsing in a child process under per-document limits); the
calling thread embeds only the chunk texts not already embedded; a writer thread stores each window of
documents in one transaction. Unchanged documents (same content hash, same chunking, same embedding model)
are skipped before the model is even loaded.

Before anything is listed, the location must be under the allowed roots; before anything is written, a run
that would delete more than TANDEM_INGEST_MAX_DELETE_SHARE of the source's documents (or all of them) is
refused unless allow_mass_delete: an unmounted volume or a truncated listing must not empty the index.

The model pads every batch to its longest text, so it is fed windows of several hundred chunks, which it
sorts by length before batching: its padding then costs under 1 % instead of about 5 % with the small
groups a document-at-a-time pipeline gives it. The first window is small, so the model starts at once,
and once every document is read the windows halve, so the writes left after the model's last call are few.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import psycopg

from components.embedding import Embedder, configured_model_id, get_embedder, model_dim
from components.errors import ConfigError, ServiceError
from components.ingest import store
from components.ingest.chunking import chunking_signature
from components.ingest.reader import UNKNOWN, Failed, Known, ParseWorker, Prepared, ReadSpec, Unchanged, read_documents
from components.ingest.sources import Source, SourceFile, check_allowed
from components.models import embedding_model_path
from components.settings import Settings, get_settings

log = logging.getLogger(__name__)
_FIRST_WINDOW = 64  # chunks in the model's first call, and the smallest call at the end of the run
_WINDOW = 512  # chunks gathered across documents per call into the model, which sorts them by length
_PREFETCH_DOCS = 384  # prepared documents the reader may be ahead: enough to fill the next window at once
# A first fill builds the HNSW index in the writer while the model embeds its last documents: once every
# document is read and at most this many (or a 50th of the run) are left to write; they are indexed on insert.
_BUILD_AHEAD_DOCS = 96
_DONE = object()


@dataclass
class SyncReport:
    """What one run did; also the extra of the Airflow asset event and `tandem ingest --json`."""

    source: str
    model_id: str
    generation: int
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    failed: int = 0
    chunks_embedded: int = 0
    chunks_reused: int = 0
    chunks_written: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0
    activated: bool = False
    index_build_seconds: float = 0.0  # a first fill writes without the HNSW index and builds it once near the end
    reader: str = "thread"  # where documents were parsed: "process" (with limits, or a large run) or "thread"
    reader_peak_mb: float = 0.0  # the largest resident size a reader process reported (0: no process ran)
    reader_restarts: int = 0  # reader processes replaced after a document timed out, crashed or ran out of memory
    run_id: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    deleted_paths: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressFn = Callable[[int, int], None]


def sync_documents(
    location: str,
    *,
    force: bool = False,
    settings: Settings | None = None,
    embedder: Embedder | None = None,
    progress: ProgressFn | None = None,
    allow_mass_delete: bool = False,
) -> SyncReport:
    """Bring the index in line with the documents under `location` (a folder or an fsspec URL).

    force: re-chunk and re-embed every document, reusing nothing. Documents that fail to load (or to parse
    within the time and memory limits) are recorded in ingest_failures and reported; the run goes on. Safe to
    interrupt at any point. Raises ConfigError, with nothing read or written, for a location outside
    TANDEM_INGEST_ALLOWED_ROOTS, and for a mass deletion unless allow_mass_delete.
    """
    from components.db import connect

    settings = settings or get_settings()
    started = time.perf_counter()
    check_allowed(location, [*settings.ingest_allowed_roots, settings.docs_source])
    src = Source(location)
    model_path = embedding_model_path(settings)
    model_id = embedder.model_id if embedder else configured_model_id(settings)
    dim = embedder.dim if embedder else (model_dim(model_path) or get_embedder(settings).dim)
    chunking = chunking_signature(settings.ingest_chunk_tokens, settings.ingest_chunk_overlap)

    conn = connect(settings)
    if not store.lock_source(conn, src.name):
        conn.close()
        raise ServiceError(f"another ingest of {src.name!r} is running; wait for it to finish")
    try:
        files = src.list_files()
        _check_deletions(conn, src.name, files, settings.ingest_max_delete_share, allow_mass_delete)
        generation = store.ensure_generation(conn, model_id, dim)
        report = SyncReport(src.name, model_id, generation.id)
        report.run_id = store.start_run(conn, src.name, model_id)
        state = store.indexed_state(conn, src.name, generation.id)
        reuse = not force and store.generation_has_chunks(conn, generation.id)
        model_before = embedder.model_seconds if embedder else 0.0
        deferred = store.prepare_hnsw_index(conn, generation)
        run = _Run(settings, src, generation, chunking, conn, report, progress, len(files), build_index=deferred)
        run.execute(files, state, force=force, reuse=reuse, embedder=embedder)
        if deferred and not run.index_built:
            run.index_build_seconds += store.build_hnsw_index(conn, dim)
        report.index_build_seconds = round(run.index_build_seconds, 3)
        report.deleted_paths = store.delete_missing(conn, src.name, [f.path for f in files])
        report.deleted = len(report.deleted_paths)
        report.activated = store.activate_if_complete(conn, generation)
        if run.embedder is not None:
            report.model_seconds = round(run.embedder.model_seconds - model_before, 3)
        report.seconds = round(time.perf_counter() - started, 3)
        store.finish_run(conn, report.run_id, report.to_dict())
        return report
    finally:
        with contextlib.suppress(psycopg.Error):
            store.unlock_source(conn, src.name)
        conn.close()


def _check_deletions(
    conn: psycopg.Connection, source: str, files: list[SourceFile], max_share: float, allowed: bool
) -> None:
    """Refuse (ConfigError) a listing that would delete all, or more than max_share, of the source's documents."""
    indexed = store.document_paths(conn, source)
    gone = len(indexed - {f.path for f in files})
    if allowed or not gone or (gone < len(indexed) and gone <= max_share * len(indexed)):
        return
    what = f"all {len(indexed)}" if gone == len(indexed) else f"{gone} of the {len(indexed)}"
    raise ConfigError(
        f"refusing to delete {what} documents of {source!r} (the source lists {len(files)} files; the limit is "
        f"{max_share:.0%}, TANDEM_INGEST_MAX_DELETE_SHARE): check that it is mounted and complete, or pass "
        "--allow-mass-delete (DAG Param allow_mass_delete) if they really are gone"
    )


class _Run:
    def __init__(
        self,
        settings: Settings,
        src: Source,
        generation: store.Generation,
        chunking: str,
        conn: psycopg.Connection,
        report: SyncReport,
        progress: ProgressFn | None,
        total: int,
        *,
        build_index: bool = False,
    ) -> None:
        self.settings = settings
        self.src = src
        self.generation = generation
        self.chunking = chunking
        self.conn = conn
        self.report = report
        self.progress = progress
        self.total = total
        self.done = 0
        self.embedder: Embedder | None = None
        self._lock = threading.Lock()
        self.build_index = build_index  # the HNSW index was deferred: the writer builds it near the end
        self.index_built = False
        self.index_build_seconds = 0.0
        self.reader_done = threading.Event()
        self.produced = 0  # documents the reader handed on (prepared or failed); final once reader_done is set
        self.written = 0

    def _tick(self) -> None:
        with self._lock:
            self.done += 1
            if self.progress:
                self.progress(self.done, self.total)

    def execute(
        self,
        files: list[SourceFile],
        state: dict[str, store.IndexedState],
        *,
        force: bool,
        reuse: bool,
        embedder: Embedder | None,
    ) -> None:
        self.embedder = embedder
        prepared: queue.Queue[Any] = queue.Queue(maxsize=_PREFETCH_DOCS)
        to_write: queue.Queue[Any] = queue.Queue(maxsize=4)
        errors: list[BaseException] = []
        stop = threading.Event()
        reader = threading.Thread(
            target=self._guard, args=(self._read, errors, stop, prepared, files, state, force), daemon=True
        )
        writer = threading.Thread(target=self._guard, args=(self._write, errors, stop, to_write), daemon=True)
        reader.start()
        writer.start()
        try:
            for group in self._groups(prepared, stop):
                if errors:
                    break
                self._embed(group, reuse)
                _put(to_write, group, stop)
        except BaseException:
            stop.set()
            raise
        finally:
            _put(to_write, _DONE, stop)
            writer.join()
            stop.set()
            reader.join()
        if errors:
            raise errors[0]

    @staticmethod
    def _guard(fn: Callable[..., None], errors: list[BaseException], stop: threading.Event, *args: Any) -> None:
        try:
            fn(stop, *args)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    # Stage 1: read, hash, skip unchanged, parse and chunk (reader.py), handed on in order.
    def _read(
        self,
        stop: threading.Event,
        out: queue.Queue[Any],
        files: list[SourceFile],
        state: dict[str, store.IndexedState],
        force: bool,
    ) -> None:
        known: dict[str, Known] = {p: (s.content_hash, s.chunking, s.doc_id is not None) for p, s in state.items()}
        spec = ReadSpec(
            location=self.src.name,
            tokenizer_path=embedding_model_path(self.settings),
            max_bytes=self.settings.ingest_max_document_bytes,
            chunk_tokens=self.settings.ingest_chunk_tokens,
            overlap=self.settings.ingest_chunk_overlap,
            chunking=self.chunking,
            force=force,
            timeout_s=self.settings.ingest_document_timeout_s,
            memory_mb=self.settings.ingest_document_memory_mb,
        )
        to_read = sum(1 for f in files if force or known.get(f.path, UNKNOWN)[1] != self.chunking)
        # Limits need a process (a thread can be neither stopped nor capped). Without them, below the setting
        # the child's start-up (about half a second) is not worth it.
        in_child = spec.limited or to_read >= self.settings.ingest_reader_process_docs
        self.report.reader = "process" if in_child else "thread"
        worker = ParseWorker(spec, stop.is_set) if in_child else None
        if worker is not None and to_read:
            worker.start()  # it loads the tokenizer while the first files are read and hashed
        items = read_documents(spec, files, known, src=self.src, worker=worker)
        unchanged_failures: list[str] = []
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(self._close_worker, worker)
            cleanup.enter_context(contextlib.closing(items))
            for item in items:
                if stop.is_set():
                    return
                if isinstance(item, Unchanged):
                    self.report.unchanged += 1
                    unchanged_failures.append(item.path)
                    self._tick()
                    continue
                _put(out, item, stop)
                self.produced += 1
        self.reader_done.set()
        # An unchanged document that was once recorded as failed has loaded since: forget the failure.
        _put(out, ("clear", unchanged_failures), stop)
        _put(out, _DONE, stop)

    def _close_worker(self, worker: ParseWorker | None) -> None:
        if worker is not None:
            worker.close()
            self.report.reader_peak_mb = worker.peak_mb
            self.report.reader_restarts = worker.restarts

    def _groups(self, prepared: queue.Queue[Any], stop: threading.Event) -> Iterator[list[Any]]:
        """Documents gathered into windows of about _WINDOW chunks for the model (see the module's doc)."""
        group: list[Any] = []
        size, target = 0, _FIRST_WINDOW
        docs = chunks = 0
        while not stop.is_set():
            try:
                item = prepared.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is _DONE:
                break
            group.append(item)
            if isinstance(item, Prepared):
                size += len(item.chunks)
                docs, chunks = docs + 1, chunks + len(item.chunks)
            if self.reader_done.is_set():
                # Everything left is in this window or the queue: take half of it, so the last call is small.
                left = size + prepared.qsize() * chunks / max(docs, 1)
                target = min(target, max(_FIRST_WINDOW, int(left / 2)))
            if size >= target:
                yield group
                group, size, target = [], 0, _WINDOW
        if group:
            yield group

    # Stage 2: embed what is not embedded yet.
    def _embed(self, group: list[Any], reuse: bool) -> None:
        docs = [item for item in group if isinstance(item, Prepared)]
        hashes = {c.text_hash for d in docs for c in d.chunks}
        known = store.existing_embeddings(self.conn, self.generation.id, hashes) if reuse and hashes else {}
        todo: dict[str, str] = {}
        for d in docs:
            for c in d.chunks:
                if c.text_hash not in known:
                    todo.setdefault(c.text_hash, c.embed_text)
        if todo:
            if self.embedder is None:
                self.embedder = get_embedder(self.settings)
            vectors = self.embedder.encode(list(todo.values()), batch_size=self.settings.ingest_embed_batch)
            known.update(zip(todo.keys(), vectors, strict=True))
        self.report.chunks_embedded += len(todo)
        for d in docs:
            self.report.chunks_reused += sum(1 for c in d.chunks if c.text_hash not in todo)
            d.embeddings = np.stack([known[c.text_hash] for c in d.chunks])

    # Stage 3: each window's documents in one transaction (each document whole).
    def _write(self, stop: threading.Event, incoming: queue.Queue[Any]) -> None:
        from components.db import connect

        with connect(self.settings) as conn:
            while True:
                group = incoming.get()
                if group is _DONE or stop.is_set():
                    return
                self._write_group(conn, group)
                if self._time_to_build_index():
                    # The model is still embedding the last documents: the one bulk build runs beside it.
                    self.index_build_seconds += store.build_hnsw_index(conn, self.generation.dim)
                    self.index_built = True

    def _time_to_build_index(self) -> bool:
        if not self.build_index or self.index_built or not self.reader_done.is_set():
            return False
        left = self.produced - self.written
        return self.written * 2 >= self.produced and left <= max(_BUILD_AHEAD_DOCS, self.produced // 50)

    def _write_group(self, conn: psycopg.Connection, group: list[Any]) -> None:
        docs = [item for item in group if isinstance(item, Prepared)]
        store.write_documents(
            conn, self.src.name, self.generation,
            [store.DocumentWrite(path=item.file.path, title=item.title, content_hash=item.content_hash,
                                 size_bytes=item.file.size, modified_at=item.file.modified_at,
                                 metadata=item.metadata, chunks=item.chunks, embeddings=item.embeddings)
             for item in docs],
            self.chunking,
        )  # fmt: skip
        for item in docs:
            if item.is_new:
                self.report.added += 1
            else:
                self.report.updated += 1
            self.report.chunks_written += len(item.chunks)
        for item in group:
            if isinstance(item, tuple):
                store.clear_failure(conn, self.src.name, item[1])
                continue
            if isinstance(item, Failed):
                store.record_failure(conn, self.src.name, item.path, item.reason)
                self.report.failed += 1
                self.report.failures.append({"path": item.path, "reason": item.reason})
            self.written += 1
            self._tick()


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> None:
    while True:
        try:
            q.put(item, timeout=0.2)
            return
        except queue.Full:
            if stop.is_set():
                return

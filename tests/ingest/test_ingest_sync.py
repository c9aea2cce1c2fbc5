"""Sync runs against real Postgres and the real embedding model: change detection, atomicity, failures."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from components.db import connect
from components.errors import ServiceError
from components.ingest import reader, store, sync
from components.ingest.sync import sync_documents
from components.settings import Settings

from .conftest import write_corpus


def _chunks_by_path(settings: Settings) -> dict[str, list[tuple[int, str]]]:
    with connect(settings) as conn:
        rows = conn.execute(
            """SELECT d.path, c.ordinal, c.text_hash FROM chunks c JOIN documents d ON d.id = c.document_id
                JOIN embedding_generations g ON g.id = c.generation_id AND g.status = 'active'
                ORDER BY d.path, c.ordinal"""
        ).fetchall()
    out: dict[str, list[tuple[int, str]]] = {}
    for path, ordinal, text_hash in rows:
        out.setdefault(path, []).append((ordinal, text_hash))
    return out


def _assert_whole(settings: Settings) -> None:
    """Every document's chunk rows match what its generation record claims: nothing partial, nothing doubled."""
    with connect(settings) as conn:
        bad = conn.execute(
            """SELECT d.path, g.chunk_count, count(c.id) FROM documents d
                 JOIN document_generations g ON g.document_id = d.id
                 LEFT JOIN chunks c ON c.document_id = d.id AND c.generation_id = g.generation_id
                GROUP BY d.path, g.chunk_count HAVING g.chunk_count <> count(c.id)"""
        ).fetchall()
        orphans = conn.execute(
            """SELECT count(*) FROM chunks c WHERE NOT EXISTS (SELECT 1 FROM document_generations g
                WHERE g.document_id = c.document_id AND g.generation_id = c.generation_id)"""
        ).fetchone()
    assert bad == []
    assert orphans == (0,)


def _hnsw_index_exists(settings: Settings) -> bool:
    with connect(settings) as conn:
        row = conn.execute("SELECT count(*) FROM pg_indexes WHERE indexname = 'chunks_embedding_hnsw_384'").fetchone()
    return row == (1,)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _reader_children(parent: int) -> list[int]:
    """Live reader processes (``reader.read_in_child``) whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"child_main" in cmdline and _state(int(entry.name)) != "Z":
            found.append(int(entry.name))
    return found


NO_LIMITS = {"ingest_document_timeout_s": 0, "ingest_document_memory_mb": 0}  # what lets a thread parse


def test_reader_process_indexes_exactly_what_the_reader_thread_does(ingest_db: Settings, corpus: Path) -> None:
    in_child = sync_documents(str(corpus), settings=ingest_db.model_copy(update={"ingest_reader_process_docs": 0}))
    assert in_child.reader == "process" and (in_child.added, in_child.failed) == (4, 0)
    by_child = _chunks_by_path(ingest_db)
    with connect(ingest_db) as conn:
        spans = conn.execute("SELECT text, char_start, char_end, heading FROM chunks ORDER BY 1, 2").fetchall()
    again = sync_documents(str(corpus), settings=ingest_db.model_copy(update=NO_LIMITS), force=True)  # in a thread
    assert again.reader == "thread" and again.updated == 4 and again.chunks_embedded == in_child.chunks_embedded
    assert _chunks_by_path(ingest_db) == by_child
    with connect(ingest_db) as conn:
        assert conn.execute("SELECT text, char_start, char_end, heading FROM chunks ORDER BY 1, 2").fetchall() == spans
    assert _reader_children(os.getpid()) == []
    _assert_whole(ingest_db)


def test_reader_process_that_dies_stops_the_run_with_a_one_line_error(
    ingest_db: Settings, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = tmp_path / "python-that-dies"
    dead.write_text("#!/bin/sh\nkill -9 $$\n")  # what a parser crashing the interpreter looks like from outside
    dead.chmod(0o755)
    monkeypatch.setattr(reader.sys, "executable", str(dead))
    settings = ingest_db.model_copy(update={"ingest_reader_process_docs": 0})
    with pytest.raises(ServiceError) as failed:
        sync_documents(str(corpus), settings=settings)
    assert "the document reader process exited with code -9 before it finished" in str(failed.value)
    assert "\n" not in str(failed.value)
    with connect(ingest_db) as conn:
        assert conn.execute("SELECT count(*) FROM documents").fetchone() == (0,)
    monkeypatch.undo()
    assert sync_documents(str(corpus), settings=settings).added == 4  # the source's lock was released


def test_first_ingest_then_rerun_embeds_nothing(
    ingest_db: Settings, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = sync_documents(str(corpus), settings=ingest_db)
    assert (first.added, first.updated, first.unchanged, first.failed) == (4, 0, 0, 0)
    assert first.chunks_embedded > 0 and first.chunks_written >= first.chunks_embedded
    assert first.activated  # the first generation goes live when complete
    # A first fill writes without HNSW upkeep and builds the index once, before the generation goes live.
    assert first.index_build_seconds > 0 and _hnsw_index_exists(ingest_db)
    stored = _chunks_by_path(ingest_db)
    assert sorted(stored) == ["about/history.txt", "faq/fees.html", "procedures/berth-booking.md",
                              "procedures/hot-works.md"]  # fmt: skip
    with connect(ingest_db) as conn:
        rows = conn.execute(
            """SELECT c.text, c.char_start, c.char_end, c.heading, d.metadata FROM chunks c
                 JOIN documents d ON d.id = c.document_id WHERE d.path = 'procedures/berth-booking.md'
                ORDER BY c.ordinal"""
        ).fetchall()
    source_text = (corpus / "procedures/berth-booking.md").read_text()
    for text, start, end, _heading, _meta in rows:
        assert source_text[start:end] == text  # offsets cite the exact place in the file
    assert rows[0][3] == "Berth Booking > Scope"
    assert rows[0][4] == {"title": "Berth Booking", "owner": "Marine Operations"}
    _assert_whole(ingest_db)

    # Nothing changed: nothing embedded, and the model is not even asked for.
    def no_model(*_: Any, **__: Any) -> None:
        raise AssertionError("the embedding model was loaded for an unchanged corpus")

    monkeypatch.setattr(sync, "get_embedder", no_model)
    again = sync_documents(str(corpus), settings=ingest_db)
    assert (again.added, again.updated, again.unchanged, again.deleted, again.chunks_embedded) == (0, 0, 4, 0, 0)
    assert again.index_build_seconds == 0 and _hnsw_index_exists(ingest_db)  # a live index is never dropped
    assert _chunks_by_path(ingest_db) == stored


def test_edit_delete_add_change_exactly_those(ingest_db: Settings, corpus: Path) -> None:
    sync_documents(str(corpus), settings=ingest_db)
    before = _chunks_by_path(ingest_db)

    booking = corpus / "procedures/berth-booking.md"
    booking.write_text(booking.read_text().replace("21 consecutive days", "14 consecutive days"))
    (corpus / "about/history.txt").unlink()
    (corpus / "procedures/diving.md").write_text("# Diving\n\n## Permit\n\nDivers need a dive permit from the DCO.\n")

    report = sync_documents(str(corpus), settings=ingest_db)
    assert (report.added, report.updated, report.deleted, report.unchanged) == (1, 1, 1, 2)
    assert report.deleted_paths == ["about/history.txt"]
    # Only the edited section of the booking procedure and the new document were embedded.
    assert report.chunks_embedded == 2
    assert report.chunks_reused == len(before["procedures/berth-booking.md"]) - 1
    after = _chunks_by_path(ingest_db)
    assert "about/history.txt" not in after
    assert after["procedures/hot-works.md"] == before["procedures/hot-works.md"]
    assert after["faq/fees.html"] == before["faq/fees.html"]
    changed = [a != b for a, b in zip(after["procedures/berth-booking.md"], before["procedures/berth-booking.md"],
                                       strict=True)]  # fmt: skip
    assert changed.count(True) == 1
    _assert_whole(ingest_db)


@pytest.mark.parametrize("reader_process_docs", [1_000, 1], ids=["reader-thread", "reader-process"])
def test_run_failing_midway_then_rerun_leaves_no_partial_document(
    ingest_db: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader_process_docs: int
) -> None:
    ingest_db = ingest_db.model_copy(
        update={"ingest_reader_process_docs": reader_process_docs} | (NO_LIMITS if reader_process_docs > 1 else {})
    )
    docs = {f"doc-{i:02d}.md": f"# Doc {i}\n\n## A\n\nAlpha text {i}.\n\n## B\n\nBeta text {i}.\n" for i in range(12)}
    root = write_corpus(tmp_path / "many", docs)
    real_write = store.write_documents
    calls = {"n": 0}

    def crash_after_five(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("power cut")
        real_write(*args, **kwargs)

    monkeypatch.setattr(sync, "_FIRST_WINDOW", 1)  # one document per window and transaction
    monkeypatch.setattr(sync, "_WINDOW", 1)
    monkeypatch.setattr(store, "write_documents", crash_after_five)
    with pytest.raises(RuntimeError, match="power cut"):
        sync_documents(str(root), settings=ingest_db)
    assert _reader_children(os.getpid()) == []  # a reader process was killed and reaped with the run
    _assert_whole(ingest_db)
    with connect(ingest_db) as conn:
        written = conn.execute("SELECT count(*) FROM document_generations").fetchone()
    assert written == (5,)
    assert not _hnsw_index_exists(ingest_db)  # the first fill broke off before its one index build

    monkeypatch.setattr(store, "write_documents", real_write)
    rerun = sync_documents(str(root), settings=ingest_db)
    assert (rerun.added, rerun.unchanged, rerun.failed) == (7, 5, 0)
    assert rerun.reader == ("process" if reader_process_docs <= 7 else "thread")  # 7 documents left to read
    assert rerun.activated and rerun.index_build_seconds > 0 and _hnsw_index_exists(ingest_db)
    stored = _chunks_by_path(ingest_db)
    assert len(stored) == 12 and all(len(chunks) == 2 for chunks in stored.values())
    _assert_whole(ingest_db)


@pytest.mark.slow
def test_killed_process_then_rerun_completes(ingest_db: Settings, tmp_path: Path) -> None:
    docs = {f"d{i:03d}.md": f"# Doc {i}\n\n" + f"Paragraph {i} about berths and tides. " * 40 for i in range(60)}
    root = write_corpus(tmp_path / "killed", docs)
    # The reader runs in its own process here: it must not outlive the killed run.
    env = {**os.environ, "TANDEM_DATABASE_URL": ingest_db.database_url, "TANDEM_INGEST_READER_PROCESS_DOCS": "1",
           "TANDEM_INGEST_ALLOWED_ROOTS": str(tmp_path)}  # fmt: skip
    cmd = [sys.executable, "-m", "components.cli", "ingest", str(root), "--json"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    readers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            readers = readers or _reader_children(proc.pid)
            with connect(ingest_db) as conn:
                row = conn.execute("SELECT count(*) FROM document_generations").fetchone()
            done = row[0] if row else 0
            if done >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        assert len(readers) == 1, "the run did not start its reader process"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    deadline = time.monotonic() + 60
    while Path(f"/proc/{readers[0]}").exists() and _state(readers[0]) != "Z" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{readers[0]}").exists() or _state(readers[0]) == "Z", "the reader outlived its run"
    _assert_whole(ingest_db)
    rerun = sync_documents(str(root), settings=ingest_db)
    assert rerun.added + rerun.unchanged == 60 and rerun.unchanged >= done and rerun.failed == 0
    _assert_whole(ingest_db)
    assert len(_chunks_by_path(ingest_db)) == 60


@pytest.mark.parametrize("reader_process_docs", [1_000, 0], ids=["reader-thread", "reader-process"])
def test_bad_files_are_quarantined_with_reason_and_retried(
    ingest_db: Settings, corpus: Path, reader_process_docs: int
) -> None:
    (corpus / "empty.md").write_text("   \n")
    (corpus / "latin1.txt").write_bytes("Caf\xe9 au lait".encode("latin-1"))
    (corpus / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (corpus / "huge.txt").write_text("word " * 5000)
    settings = ingest_db.model_copy(
        update={"ingest_max_document_bytes": 20_000, "ingest_reader_process_docs": reader_process_docs}
        | (NO_LIMITS if reader_process_docs else {})
    )

    report = sync_documents(str(corpus), settings=settings)
    assert report.reader == ("process" if reader_process_docs == 0 else "thread")
    assert report.added == 4  # the good documents went in all the same
    reasons = {f["path"]: f["reason"] for f in report.failures}
    assert sorted(reasons) == ["broken.pdf", "empty.md", "huge.txt", "latin1.txt"]
    assert reasons["empty.md"] == "empty file"
    assert reasons["latin1.txt"].startswith("undecodable")
    assert reasons["huge.txt"].startswith("too large")
    assert reasons["broken.pdf"].startswith("unreadable")
    with connect(settings) as conn:
        assert store.failures(conn)[0]["attempts"] == 1

    (corpus / "latin1.txt").write_text("Café au lait, now in UTF-8.")
    retry = sync_documents(str(corpus), settings=settings)
    assert retry.added == 1 and retry.failed == 3
    with connect(settings) as conn:
        left = {f["path"]: f["attempts"] for f in store.failures(conn)}
    assert left == {"broken.pdf": 2, "empty.md": 2, "huge.txt": 2}


def _windows(items: int, *, reader_done: bool) -> list[int]:
    run = object.__new__(sync._Run)  # only the reader's flag matters to the window logic
    run.reader_done = threading.Event()
    if reader_done:
        run.reader_done.set()
    q: Any = sync.queue.Queue()
    for i in range(items):
        q.put(reader.Prepared(None, True, str(i), "", {}, [None, None]))  # type: ignore[arg-type,list-item]
    q.put(sync._DONE)
    stop = threading.Event()
    return [sum(len(d.chunks) for d in group) for group in run._groups(q, stop)]


def test_model_windows_start_small_grow_for_sorting_and_halve_once_everything_is_read() -> None:
    assert _windows(300, reader_done=False) == [64, 512, 24]
    tail = _windows(300, reader_done=True)
    assert tail[0] == 64 and sum(tail) == 600 and len(tail) <= 8
    assert all(a >= b for a, b in itertools.pairwise(tail[1:])) and tail[-1] <= 64


def test_first_fill_builds_its_index_before_the_last_writes_which_go_into_it(
    ingest_db: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = {f"doc-{i:02d}.md": f"# Doc {i}\n\n## A\n\nAlpha text {i}.\n\n## B\n\nBeta text {i}.\n" for i in range(12)}
    root = write_corpus(tmp_path / "many", docs)
    monkeypatch.setattr(sync, "_FIRST_WINDOW", 4)
    monkeypatch.setattr(sync, "_WINDOW", 8)
    writes: list[str] = []
    built_after: list[int] = []
    real_write, real_build = store.write_documents, store.build_hnsw_index

    def counting_write(conn: Any, source: str, generation: Any, docs: list[Any], chunking: str) -> None:
        real_write(conn, source, generation, docs, chunking)
        writes.extend(doc.path for doc in docs)

    def recording_build(conn: Any, dim: int) -> float:
        built_after.append(len(writes))
        return real_build(conn, dim)

    monkeypatch.setattr(store, "write_documents", counting_write)
    monkeypatch.setattr(store, "build_hnsw_index", recording_build)
    report = sync_documents(str(root), settings=ingest_db)
    assert (report.added, report.chunks_written) == (12, 24) and report.index_build_seconds > 0
    assert len(built_after) == 1 and 6 <= built_after[0] < 12  # built by the writer, with documents still to write

    with connect(ingest_db) as conn:
        probe = conn.execute("SELECT embedding::text FROM chunks LIMIT 1").fetchone()
        assert probe is not None
        conn.execute("SET enable_seqscan = off")
        query = ("SELECT id FROM chunks WHERE dim = 384 "
                 "ORDER BY embedding::vector(384) <=> %s::vector(384) LIMIT 100")  # fmt: skip
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + query, probe).fetchall())
        found = conn.execute(query, probe).fetchall()
    assert "chunks_embedding_hnsw_384" in plan
    assert len(found) == 24  # the chunks written after the build went into the index on insert

"""A bad listing or a bad file cannot lose the index (issue 14, item 4), against real Postgres and the real model:
the mass-delete guard, the allowed roots, two concurrent `tandem ingest` runs, and hostile files parsed under
the reader process's time and memory limits."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.db import connect
from components.errors import ConfigError
from components.ingest import store
from components.ingest.sync import sync_documents
from components.settings import Settings

from .conftest import write_corpus
from .test_ingest_sync import _assert_whole, _chunks_by_path


def _runs(settings: Settings) -> int:
    with connect(settings) as conn:
        row = conn.execute("SELECT count(*) FROM ingest_runs").fetchone()
    return int(row[0]) if row else 0


def _cli(settings: Settings, *args: str, roots: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TANDEM_DATABASE_URL": settings.database_url, "TANDEM_INGEST_ALLOWED_ROOTS": roots}
    return subprocess.run([sys.executable, "-m", "components.cli", "ingest", *args], env=env, capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip


def test_a_run_deleting_most_of_a_source_is_refused_unless_allowed(ingest_db: Settings, corpus: Path) -> None:
    sync_documents(str(corpus), settings=ingest_db)
    before, runs = _chunks_by_path(ingest_db), _runs(ingest_db)
    for rel in ("procedures/berth-booking.md", "procedures/hot-works.md", "about/history.txt"):
        (corpus / rel).unlink()  # 3 of 4 gone: 75 % is over the default 50 %

    with pytest.raises(ConfigError) as refused:
        sync_documents(str(corpus), settings=ingest_db)
    message = str(refused.value)
    assert "refusing to delete 3 of the 4 documents" in message and "--allow-mass-delete" in message
    assert "\n" not in message
    assert _chunks_by_path(ingest_db) == before and _runs(ingest_db) == runs  # nothing written, not even a run

    allowed = sync_documents(str(corpus), settings=ingest_db, allow_mass_delete=True)
    assert allowed.deleted == 3 and sorted(_chunks_by_path(ingest_db)) == ["faq/fees.html"]
    _assert_whole(ingest_db)


def test_an_empty_listing_is_refused_by_the_cli_then_allowed_by_its_flag(ingest_db: Settings, tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "docs", {"only.md": "# Only\n\nThe one document of this source.\n"})
    sync_documents(str(root), settings=ingest_db)  # a single document: deleting it is deleting all
    before = _chunks_by_path(ingest_db)
    (root / "only.md").unlink()  # what an unmounted volume lists: nothing

    refused = _cli(ingest_db, str(root), roots=str(tmp_path))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: refusing to delete all 1 documents of {str(root)!r} (the source lists 0 files; the limit is 50%, "
        "TANDEM_INGEST_MAX_DELETE_SHARE): check that it is mounted and complete, or pass --allow-mass-delete "
        "(DAG Param allow_mass_delete) if they really are gone"
    ]
    assert _chunks_by_path(ingest_db) == before

    allowed = _cli(ingest_db, str(root), "--allow-mass-delete", "--json", roots=str(tmp_path))
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert _chunks_by_path(ingest_db) == {}


def test_sources_outside_the_allowed_roots_are_refused_before_they_are_listed(
    ingest_db: Settings, corpus: Path, tmp_path: Path
) -> None:
    with socket.socket() as server:  # an "internal" HTTP service: it must never see a connection
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.setblocking(False)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/x"
        (tmp_path / "etc-link").symlink_to("/etc")  # inside the allowed root, resolving outside it
        for location in ("/etc", url, "http://127.0.0.1:1/x", str(tmp_path / "etc-link"), f"{corpus}/../../../etc"):
            with pytest.raises(ConfigError, match=r"TANDEM_INGEST_ALLOWED_ROOTS|segments"):
                sync_documents(location, settings=ingest_db)
        with pytest.raises(BlockingIOError):
            server.accept()
    assert _runs(ingest_db) == 0

    for location in ("/etc", "http://127.0.0.1:1/x"):
        done = _cli(ingest_db, location, roots=str(tmp_path))
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "is not under an allowed" in lines[0] and "TANDEM_INGEST_ALLOWED_ROOTS" in lines[0]
    assert _runs(ingest_db) == 0
    # A URL prefix allows what is under it, at a "/" boundary only.
    prefixed = ingest_db.model_copy(update={"ingest_allowed_roots": ["http://127.0.0.1:1/docs"]})
    with pytest.raises(ConfigError, match="not under an allowed URL prefix"):
        sync_documents("http://127.0.0.1:1/docs-private", settings=prefixed)


@pytest.mark.slow
def test_a_second_concurrent_cli_run_on_one_source_fails_cleanly(ingest_db: Settings, tmp_path: Path) -> None:
    docs = {f"d{i:03d}.md": f"# Doc {i}\n\n" + f"Paragraph {i} about berths and tides. " * 40 for i in range(80)}
    root = write_corpus(tmp_path / "docs", docs)
    env = {**os.environ, "TANDEM_DATABASE_URL": ingest_db.database_url, "TANDEM_INGEST_ALLOWED_ROOTS": str(tmp_path)}
    first = subprocess.Popen([sys.executable, "-m", "components.cli", "ingest", str(root), "--json"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while _runs(ingest_db) == 0 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the run row is written once the source's lock is held
        assert first.poll() is None, "the first run ended before the second could start"
        second = _cli(ingest_db, str(root), roots=str(tmp_path))
        assert first.poll() is None, "the first run ended before the second was refused: the test proved nothing"
    finally:
        _, first_err = first.communicate(timeout=300)
    assert second.returncode == 3
    assert second.stderr.strip().splitlines() == [
        f"error: another ingest of {str(root)!r} is running; wait for it to finish"
    ]
    assert first.returncode == 0, first_err[-2000:]
    assert _runs(ingest_db) == 1  # the refused run wrote nothing
    assert len(_chunks_by_path(ingest_db)) == 80
    _assert_whole(ingest_db)


def endless_pdf(pages: int, lines: int) -> bytes:
    """A valid PDF whose text extraction takes minutes: many pages that all share one long content stream."""
    content = b"BT /F1 12 Tf 72 720 Td " + b"(harbour tide berth) Tj 0 -1 Td " * lines + b"ET"
    page = (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            b"/Contents 4 0 R >>")  # fmt: skip
    kids = b" ".join(b"%d 0 R" % (5 + i) for i in range(pages))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % pages,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        *[page] * pages,
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def _alias_bomb() -> str:
    """Billion laughs: nine levels of nine aliases each, 9**9 strings once expanded."""
    lines = ["lol0: &lol0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, 10):
        lines.append(f"lol{level}: &lol{level} [" + ", ".join([f"*lol{level - 1}"] * 9) + "]")
    return "---\n" + "\n".join(lines) + "\n---\n\n# Bomb\n\nText.\n"


HOSTILE_TIMEOUT_S = 8.0
HOSTILE_MEMORY_MB = 256


@pytest.mark.slow
def test_hostile_files_are_quarantined_with_their_reason_and_the_run_finishes(
    ingest_db: Settings, corpus: Path
) -> None:
    (corpus / "nul.md").write_bytes(b"# Nul\n\nText with a \x00 in it.\n")
    (corpus / "nul.txt").write_bytes(b"plain\x00text\n")
    (corpus / "nul.html").write_bytes(b"<p>markup \x00 here</p>")
    (corpus / "utf16.md").write_bytes("# Wide\n\nCustoms clearance closes at noon.\n".encode("utf-16"))
    (corpus / os.fsdecode(b"caf\xe9.md")).write_text("# Latin-1 name\n\nThe name is not UTF-8.\n")
    (corpus / "alias-bomb.md").write_text(_alias_bomb())
    (corpus / "heading.md").write_text("# x" + " " * 300_000 + "y\n\nBody under a pathological heading.\n")
    (corpus / "endless.pdf").write_bytes(endless_pdf(20_000, 400))  # parsing runs past the time limit
    (corpus / "token-bomb.txt").write_bytes(b"word " * 800_000)  # the tokenizer's ~500 MiB: over the allowance
    settings = ingest_db.model_copy(update={"ingest_document_timeout_s": HOSTILE_TIMEOUT_S,
                                            "ingest_document_memory_mb": HOSTILE_MEMORY_MB})  # fmt: skip

    report = sync_documents(str(corpus), settings=settings)
    reasons = {f["path"]: f["reason"] for f in report.failures}
    assert reasons.keys() == {"nul.md", "nul.txt", "nul.html", "caf\\xe9.md", "alias-bomb.md", "endless.pdf",
                              "token-bomb.txt"}  # fmt: skip
    assert reasons["nul.md"] == "contains NUL bytes (first at byte 19): a binary file, not text"
    assert reasons["nul.txt"].startswith("contains NUL bytes") and reasons["nul.html"].startswith("contains NUL")
    assert reasons["caf\\xe9.md"] == "file name is not valid UTF-8: rename the file"
    assert reasons["alias-bomb.md"] == "invalid front matter: YAML aliases (*name) are refused"
    assert (
        reasons["endless.pdf"]
        == f"timed out: parsing took over {HOSTILE_TIMEOUT_S:g} s (TANDEM_INGEST_DOCUMENT_TIMEOUT_S)"
    )
    assert reasons["token-bomb.txt"].startswith("crashed the reader process (killed by SIGABRT)")
    assert f"memory limit of {HOSTILE_MEMORY_MB} MiB" in reasons["token-bomb.txt"]
    # The rest of the run: the four good documents, the UTF-16 file (decoded by its byte-order mark) and the
    # heading line, which linear-time parsing reads well within the limit.
    assert report.added == 6 and report.failed == 7 and report.activated
    stored = _chunks_by_path(settings)
    assert {"utf16.md", "heading.md", "procedures/berth-booking.md"} <= stored.keys()
    with connect(settings) as conn:
        text = conn.execute("SELECT c.text FROM chunks c JOIN documents d ON d.id = c.document_id "
                            "WHERE d.path = 'utf16.md'").fetchone()  # fmt: skip
        recorded = {f["path"]: f["reason"] for f in store.failures(conn)}
    assert text == ("Customs clearance closes at noon.",)
    assert recorded == reasons  # quarantined in Postgres with the same reasons
    # Memory stayed bounded: no reader process grew past its idle size plus the allowance.
    assert report.reader == "process" and report.reader_restarts == 2  # killed on the PDF, aborted on the bomb
    assert 0 < report.reader_peak_mb < 250 + HOSTILE_MEMORY_MB
    _assert_whole(settings)

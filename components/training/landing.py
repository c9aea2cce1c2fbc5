"""Each alias's landing location: JSONL files dropped there are imported into the intake store, once each.

The location is TANDEM_DOMAIN_DATA_URL (any fsspec URL) with ``{alias}`` replaced, or one subfolder per alias;
unset, it is the alias's data location of ``components.training.data.data_location`` (the sample's train folder
for the default alias, TANDEM_DOMAIN_DATA_ROOT/<alias> for the others), so data kept there before the store
existed trains as it did. A file is remembered by the hash of its bytes (``domain_landing_files``): an imported
one is not read again, a refused one (a bad line, nothing of it stored) not until its content changes. Imported
examples are approved when TANDEM_INTAKE_AUTO_APPROVE is on (whoever may write the landing location is trusted
as `tandem data add --approve` is), pending review otherwise.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import fsspec
import psycopg

from components.db import connect
from components.errors import ConfigError
from components.settings import Settings
from components.training.data import data_location
from components.training.intake import (
    SnapshotDataset,
    load_snapshot,
    read_file,
    snapshot,
    store,
)

log = logging.getLogger(__name__)


@dataclass
class LandingReport:
    alias: str
    location: str
    imported: list[dict[str, Any]] = field(default_factory=list)  # {"url", "added", "skipped"} per new file
    refused: list[str] = field(default_factory=list)  # one line per refused file: its first problem
    added: int = 0
    approved: int = 0  # of ``added``

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def landing_url(settings: Settings, alias: str) -> str:
    """Where ``alias``'s files land: TANDEM_DOMAIN_DATA_URL ("{alias}" replaced, or /<alias> appended), or the
    alias's data location when that is unset."""
    url = settings.domain_data_url.strip()
    if not url:
        return data_location(settings, alias)
    return url.replace("{alias}", alias) if "{alias}" in url else f"{url.rstrip('/')}/{alias}"


def landing_files(location: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The *.jsonl files at ``location`` (a file or a folder, searched recursively); none when it does not exist."""
    try:
        fs, path = fsspec.core.url_to_fs(location)
    except (ValueError, ImportError) as exc:
        raise ConfigError(
            f"landing location {location} is not a usable fsspec URL ({exc}); see TANDEM_DOMAIN_DATA_URL"
        ) from None
    if fs.isdir(path):
        return fs, sorted(p for p in fs.find(path) if p.endswith(".jsonl"))
    return fs, [path] if fs.exists(path) else []


def _file_hash(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def import_landing(
    conn: psycopg.Connection,
    settings: Settings,
    alias: str,
    *,
    by: str = "landing",
    approve: bool | None = None,
) -> LandingReport:
    """Import the alias's landing files not seen before, each file all or nothing; refused files are reported and
    remembered, never half stored. ``approve`` defaults to TANDEM_INTAKE_AUTO_APPROVE. Each file is one
    transaction block (a savepoint when the caller holds a transaction)."""
    approve = settings.intake_auto_approve if approve is None else approve
    location = landing_url(settings, alias)
    report = LandingReport(alias, location)
    fs, paths = landing_files(location)
    for path in paths:
        url = fs.unstrip_protocol(path)
        content_hash = _file_hash(fs, path)
        with conn.transaction():
            seen = conn.execute(
                "SELECT 1 FROM domain_landing_files WHERE alias = %s AND content_hash = %s", (alias, content_hash)
            ).fetchone()
        if seen:
            continue
        try:
            lines, duplicates = read_file(url, settings.intake_max_line_bytes)
        except ConfigError as exc:  # IntakeError (bad lines) or a file of no examples: remembered as refused
            report.refused.append(str(exc))
            log.error("landing file refused: %s", exc)
            with conn.transaction():
                _remember(conn, alias, content_hash, url, "refused", 0, 0, str(exc))
            continue
        with conn.transaction():
            ids, stored = store(
                conn, alias, lines, f"landing:{url}", submitted_by=by, approved_by=by if approve else None
            )
            _remember(conn, alias, content_hash, url, "imported", len(ids), len(duplicates) + len(stored), None)
        report.imported.append({"url": url, "added": len(ids), "skipped": len(duplicates) + len(stored)})
        report.added += len(ids)
        report.approved += len(ids) if approve else 0
    return report


def _remember(
    conn: psycopg.Connection, alias: str, content_hash: str, url: str, status: str, added: int, skipped: int,
    error: str | None,
) -> None:  # fmt: skip
    conn.execute(
        """INSERT INTO domain_landing_files (alias, content_hash, url, status, added, skipped, error)
           VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (alias, content_hash) DO NOTHING""",
        (alias, content_hash, url, status, added, skipped, error),
    )


def alias_dataset(settings: Settings, alias: str, conn: psycopg.Connection | None = None) -> SnapshotDataset:
    """What the pipeline trains ``alias`` on: its landing files imported first, then its approved snapshot (a new
    version only when the approved set changed). Refused landing files are in ``problems``."""
    if conn is None:
        with connect(settings) as own:
            return alias_dataset(settings, alias, own)
    try:
        landing = import_landing(conn, settings, alias, by="pipeline")
    except OSError as exc:  # an unreachable landing location must not stop training on what is stored
        log.warning("landing location of %s not read (%s): training on the stored examples", alias, exc)
        problems = [f"{landing_url(settings, alias)}: not read ({exc})"]
    else:
        problems = landing.refused
    ds = load_snapshot(conn, snapshot(conn, alias))
    ds.problems = problems
    return ds

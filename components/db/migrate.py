"""Versioned SQL migrations: ``migrations/NNNN_name.sql`` applied in order, each once, recorded in a table."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from components.errors import ConfigError, ServiceError
from components.settings import Settings

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_LOCK_ID = 0x7A4D_0001  # advisory lock: two processes migrating at once take turns


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(folder: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise ConfigError(f"migration file {path.name!r} must be named NNNN_lowercase_name.sql")
        found.append(Migration(match.group(1), path.stem, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ConfigError(f"two migrations share a version number in {folder}")
    return found


def _require_pgvector(conn: psycopg.Connection) -> None:
    row = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone()
    if row is None:
        info = conn.info
        raise ServiceError(
            f"Postgres at {info.host}:{info.port} has no pgvector extension available: install pgvector on that "
            "server (e.g. the postgresql-NN-pgvector package) or unset TANDEM_DATABASE_URL to use the embedded one"
        )


def migrate(settings: Settings | None = None, conn: psycopg.Connection | None = None) -> list[str]:
    """Apply the pending migrations; returns the names applied (empty when the schema is current)."""
    from components.db.postgres import connect

    own = conn is None
    conn = conn or connect(settings, vector=False)
    applied: list[str] = []
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
            _require_pgvector(conn)
            conn.execute(
                """CREATE TABLE IF NOT EXISTS tandem_schema_migrations (
                       version text PRIMARY KEY,
                       name text NOT NULL,
                       checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done: dict[str, str] = dict(
                conn.execute("SELECT version, checksum FROM tandem_schema_migrations").fetchall()
            )
            for migration in load_migrations():
                if migration.version in done:
                    if done[migration.version] != migration.checksum:
                        raise ConfigError(
                            f"migration {migration.name} changed after it was applied; add a new migration instead"
                        )
                    continue
                conn.execute(migration.sql.encode())
                conn.execute(
                    "INSERT INTO tandem_schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum),
                )
                applied.append(migration.name)
    finally:
        if own:
            conn.close()
    return applied

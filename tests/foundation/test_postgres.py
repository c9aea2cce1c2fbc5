"""Embedded Postgres with pgvector: starts, migrates once, and refuses a server without pgvector."""

from urllib.parse import quote

import psycopg
import pytest

from components.db import connect, migrate
from components.db.migrate import load_migrations
from components.errors import ServiceError
from components.settings import Settings


def test_embedded_server_has_pgvector(db: psycopg.Connection) -> None:
    version = db.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    assert version is not None
    distance = db.execute("SELECT '[1,0]'::vector <=> '[0,1]'::vector").fetchone()
    assert distance == (1.0,)


def test_migrations_are_recorded_and_idempotent(pg_url: str, db: psycopg.Connection) -> None:
    assert migrate() == []  # the fixture already applied everything
    rows = db.execute("SELECT version FROM tandem_schema_migrations ORDER BY version").fetchall()
    assert [r[0] for r in rows] == [m.version for m in load_migrations()]
    assert migrate() == []


def test_server_without_pgvector_gets_a_clear_error(pg_url: str, db: psycopg.Connection) -> None:
    # A real server on which `vector` is not available: shadow pg_available_extensions for this session only.
    db.execute("CREATE SCHEMA IF NOT EXISTS no_vector")
    db.execute(
        "CREATE OR REPLACE VIEW no_vector.pg_available_extensions AS "
        "SELECT * FROM pg_catalog.pg_available_extensions WHERE name <> 'vector'"
    )
    db.commit()
    sep = "&" if "?" in pg_url else "?"
    url = f"{pg_url}{sep}options={quote('-c search_path=no_vector,pg_catalog')}"
    with pytest.raises(ServiceError, match="no pgvector extension available"):
        migrate(Settings(database_url=url))


def test_unreachable_database_is_a_one_line_error() -> None:
    settings = Settings(database_url="postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    with pytest.raises(ServiceError, match="cannot connect to Postgres") as info:
        connect(settings)
    assert "\n" not in str(info.value)

"""Ingestion fixtures: a private database per test (so corpora here never show up in other areas' retrieval,
and generation switches stay local), small corpora written into tmp_path, and the Airflow metadata DB."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from components.settings import Settings

DOCS = {
    "procedures/berth-booking.md": """---
title: Berth Booking
owner: Marine Operations
---
# Berth Booking

## Scope

This procedure covers booking a berth at the Heron Berths on Fennick Pier.

## Making a booking

The agent submits Form B-12 to the control desk at least 72 hours before arrival.
The control desk confirms by email with a booking reference.

## Length of stay

A vessel may stay on a Heron Berth for up to 21 consecutive days.
""",
    "procedures/hot-works.md": """---
title: Hot Works Permit
owner: Safety
---
# Hot Works Permit

## When a permit is needed

Welding, cutting and grinding on any quay need a hot works permit from the Duty Control Officer.

## Fire watch

A fire watch stays for 60 minutes after the work ends.
""",
    "about/history.txt": "The harbour opened in 1871.\n\nThe lock gates were rebuilt in 1962 after a storm.\n",
    "faq/fees.html": """<html><head><title>Fees FAQ</title><meta name="owner" content="Finance"></head>
<body><h1>Fees FAQ</h1><h2>Why harbour credits?</h2><p>Every fee is set in harbour credits (HC).</p>
<h2>Discounts</h2><ul><li>Frequent callers get 10 percent off.</li></ul><script>var x = 1;</script></body></html>""",
}


def write_corpus(root: Path, docs: dict[str, str] | None = None) -> Path:
    for rel, text in (docs or DOCS).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "docs")


@pytest.fixture
def ingest_db(pg_url: str, tmp_path: Path) -> Iterator[Settings]:
    """Settings pointing at a fresh, migrated database on the session's Postgres server; the test's tmp_path
    is the one allowed ingest root."""
    from components.db import migrate
    from components.embedding import get_embedder

    name = f"ingest_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    url = psycopg.conninfo.make_conninfo(pg_url, dbname=name)
    settings = Settings(database_url=url, ingest_allowed_roots=[str(tmp_path)])
    migrate(settings)
    get_embedder(settings)  # loaded once per session (cached), so tests compare runs, not model loads
    yield settings
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """`airflow db migrate` once into the session's AIRFLOW_HOME (set by the root conftest)."""
    home = Path(os.environ["AIRFLOW_HOME"])
    if (home / "airflow.db").exists():
        return
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, timeout=300)

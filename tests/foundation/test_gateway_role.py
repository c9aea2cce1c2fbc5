"""The gateway's Postgres role (migration 0006): it reads the index and the registry, switches champions, and
is refused everything else; the gateway app really connects as it; without its URL an external setup fails closed.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from components import registry
from components.db import migrate
from components.db.gateway_role import GATEWAY_ROLE, gateway_database_url, set_gateway_password
from components.errors import ConfigError
from components.settings import Settings


@dataclass
class Databases:
    owner: str  # the schema owner (the embedded server's superuser)
    gateway: str  # the same database as tandem_gateway


def _count(conn: psycopg.Connection, table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture(scope="module")
def dbs(pg_url: str) -> Iterator[Databases]:
    """A fresh, migrated database on the session's server with one document, one chunk and two versions."""
    name = f"gwrole_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    owner = make_conninfo(pg_url, dbname=name)
    migrate(Settings(database_url=owner))
    with psycopg.connect(owner) as conn:
        gen = conn.execute(
            "INSERT INTO embedding_generations (model_id, dim, status) VALUES ('t:2', 2, 'active') RETURNING id"
        ).fetchone()
        doc = conn.execute(
            "INSERT INTO documents (source, path, title, content_hash, size_bytes) "
            "VALUES ('src', 'a.md', 'A', 'h', 5) RETURNING id"
        ).fetchone()
        assert gen and doc
        conn.execute(
            "INSERT INTO chunks (chunk_id, document_id, generation_id, ordinal, text, text_hash, char_start, "
            "char_end, token_count, dim, embedding) VALUES ('c1', %s, %s, 0, 'hello', 'th', 0, 5, 1, 2, '[1,0]')",
            (doc[0], gen[0]),
        )
        for _ in range(2):
            registry.register_candidate(
                conn,
                alias="rolecheck",
                base_model="m",
                dataset_version="d",
                dataset_size=1,
                hyperparameters={},
                metrics={},
                artifact_uri="/adapters/rolecheck",
                lora_rank=8,
            )
        conn.commit()
    yield Databases(owner, make_conninfo(owner, user=GATEWAY_ROLE))
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_the_role_exists_with_no_power_over_the_server(dbs: Databases) -> None:
    with psycopg.connect(dbs.owner) as conn:
        row = conn.execute(
            "SELECT rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls FROM pg_roles WHERE rolname = %s",
            (GATEWAY_ROLE,),
        ).fetchone()
    assert row == (True, False, False, False, False)


def test_the_gateway_role_reads_the_index_and_the_registry(dbs: Databases) -> None:
    with psycopg.connect(dbs.gateway) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (GATEWAY_ROLE,)
        assert _count(conn, "chunks") == 1
        assert _count(conn, "documents") == 1
        assert [v.version for v in registry.list_versions(conn, "rolecheck")] == [1, 2]


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM chunks",
        "TRUNCATE chunks",
        "DROP TABLE chunks",
        "UPDATE documents SET title = 'x'",
        "DELETE FROM documents",
        "INSERT INTO embedding_generations (model_id, dim) VALUES ('evil', 2)",
        "UPDATE adapter_versions SET artifact_uri = '/tmp/evil'",
        "DELETE FROM adapter_versions",
        "INSERT INTO adapter_versions (alias, version, base_model, dataset_version, dataset_size, artifact_uri, "
        "lora_rank) VALUES ('rolecheck', 9, 'm', 'd', 1, '/tmp/evil', 8)",
        "CREATE TABLE gateway_scratch (a int)",
        "ALTER TABLE chunks ADD COLUMN evil text",
    ],
)
def test_everything_else_is_refused_and_nothing_is_lost(dbs: Databases, statement: str) -> None:
    with psycopg.connect(dbs.owner) as owner:
        before = {t: _count(owner, t) for t in ("chunks", "documents", "adapter_versions", "embedding_generations")}
        uri = owner.execute("SELECT artifact_uri FROM adapter_versions WHERE version = 1").fetchone()
    with psycopg.connect(dbs.gateway) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)
    with psycopg.connect(dbs.owner) as owner:
        assert {t: _count(owner, t) for t in before} == before
        assert owner.execute("SELECT artifact_uri FROM adapter_versions WHERE version = 1").fetchone() == uri
        assert owner.execute("SELECT to_regclass('gateway_scratch')").fetchone() == (None,)


def test_the_gateway_role_can_switch_the_champion(dbs: Databases) -> None:
    """What promote and rollback through the admin API write: registry.set_champion, as the gateway role."""
    with psycopg.connect(dbs.gateway) as conn:
        registry.set_champion(conn, "rolecheck", 1, reason="role test")
        registry.set_champion(conn, "rolecheck", 2, reason="role test")
        conn.commit()
    with psycopg.connect(dbs.owner) as owner:
        champion = registry.get_champion(owner, "rolecheck")
    assert champion is not None and champion.version == 2


def test_the_password_is_set_from_the_gateway_url(dbs: Databases) -> None:
    """`python -m components.db.gateway_role` (the deployments' init step) gives the role its password."""
    password = secrets.token_urlsafe(24)
    url = make_conninfo(dbs.gateway, password=password)
    try:
        assert set_gateway_password(Settings(database_url=dbs.owner, gateway_database_url=url)) is True
        with psycopg.connect(dbs.owner) as owner:
            stored = owner.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (GATEWAY_ROLE,)).fetchone()
        assert stored is not None and str(stored[0]).startswith("SCRAM-SHA-256$")
        assert password not in str(stored[0])
        # no password in the URL (peer/trust/certificates) or another user: nothing to set
        assert set_gateway_password(Settings(database_url=dbs.owner, gateway_database_url=dbs.gateway)) is False
        assert set_gateway_password(Settings(database_url=dbs.owner, gateway_database_url=dbs.owner)) is False
    finally:
        with psycopg.connect(dbs.owner, autocommit=True) as owner:
            owner.execute(f"ALTER ROLE {GATEWAY_ROLE} PASSWORD NULL")


def test_an_external_database_without_a_gateway_url_fails_closed() -> None:
    settings = Settings(database_url="postgresql://tandem:pw@db.invalid:5432/tandem")
    with pytest.raises(ConfigError, match="TANDEM_GATEWAY_DATABASE_URL is not set") as info:
        gateway_database_url(settings)
    assert "\n" not in str(info.value)
    explicit = settings.model_copy(update={"gateway_database_url": "postgresql://tandem_gateway:pw@db:5432/t"})
    assert gateway_database_url(explicit) == "postgresql://tandem_gateway:pw@db:5432/t"


def _app_settings(**update: object) -> Settings:
    from tests.conftest import free_port

    return Settings(
        api_keys=[f"role-client:{secrets.token_urlsafe(24)}"],
        admin_api_keys=[f"role-admin:{secrets.token_urlsafe(24)}"],
        vllm_api_key=secrets.token_urlsafe(24),
        vllm_urls=[f"http://127.0.0.1:{free_port()}"],  # nothing listens: the app must start without vLLM
        query_embed_runtime="torch",
        **update,  # type: ignore[arg-type]
    )


def test_the_gateway_app_connects_as_the_gateway_role(pg_url: str) -> None:
    from serving.app import create_app

    app = create_app(_app_settings())

    async def users() -> tuple[str, str]:
        async with app.router.lifespan_context(app):
            db = app.state.gateway.adapters.db
            user = await db.run(lambda conn: conn.execute("SELECT current_user").fetchone()[0])
            session = await db.run(lambda conn: conn.execute("SELECT session_user").fetchone()[0])
            return user, session

    assert asyncio.run(users()) == (GATEWAY_ROLE, GATEWAY_ROLE)


def test_the_gateway_app_refuses_to_start_on_the_owners_url() -> None:
    from serving.app import create_app

    app = create_app(_app_settings(database_url="postgresql://tandem:pw@127.0.0.1:1/tandem"))

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pass

    with pytest.raises(ConfigError, match="TANDEM_GATEWAY_DATABASE_URL"):
        asyncio.run(start())

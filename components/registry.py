"""The adapter registry in Postgres: every LoRA version with its lineage, and which one is each alias's champion.

A version is served by vLLM under its own name (``served_name``), never reloaded in place under an old one.
Status moves: candidate -> champion | rejected | failed; champion -> retired (when another is promoted) or
rolled_back (when a rollback leaves it: rollbacks walk back the lineage and never return to it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from components.errors import ConfigError

STATUSES = ("candidate", "champion", "rejected", "retired", "failed", "rolled_back")


@dataclass
class AdapterVersion:
    id: int
    alias: str
    version: int
    base_model: str
    dataset_version: str
    dataset_size: int
    hyperparameters: dict[str, Any]
    metrics: dict[str, Any]
    artifact_uri: str
    lora_rank: int
    status: str
    reason: str | None
    parent_version: int | None
    created_at: datetime
    updated_at: datetime
    promoted_at: datetime | None
    promoted_by: str | None = None  # "key:<admin key name>" or "cli:<user>" (migration 0005)
    changed_by: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def served_name(self) -> str:
        return served_name(self.alias, self.version)


def served_name(alias: str, version: int) -> str:
    """The name a version is loaded under in vLLM: one per version, so no stale prefix cache is ever hit."""
    return f"{alias}-v{version}"


_COLUMNS = (
    "id, alias, version, base_model, dataset_version, dataset_size, hyperparameters, metrics, artifact_uri, "
    "lora_rank, status, reason, parent_version, created_at, updated_at, promoted_at, promoted_by, changed_by"
)


def register_candidate(
    conn: psycopg.Connection,
    *,
    alias: str,
    base_model: str,
    dataset_version: str,
    dataset_size: int,
    hyperparameters: dict[str, Any],
    metrics: dict[str, Any],
    artifact_uri: str,
    lora_rank: int,
) -> AdapterVersion:
    """Record a new version (next number for the alias) as a candidate, with its parent = current champion."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"adapter:{alias}",))
        champion = get_champion(conn, alias)
        with conn.cursor(row_factory=class_row(AdapterVersion)) as cur:
            cur.execute(
                f"""INSERT INTO adapter_versions (alias, version, base_model, dataset_version, dataset_size,
                        hyperparameters, metrics, artifact_uri, lora_rank, status, parent_version)
                    VALUES (%s, COALESCE((SELECT max(version) FROM adapter_versions WHERE alias = %s), 0) + 1,
                            %s, %s, %s, %s, %s, %s, %s, 'candidate', %s)
                    RETURNING {_COLUMNS}""",
                (
                    alias,
                    alias,
                    base_model,
                    dataset_version,
                    dataset_size,
                    Jsonb(hyperparameters),
                    Jsonb(metrics),
                    artifact_uri,
                    lora_rank,
                    champion.version if champion else None,
                ),
            )
            row = cur.fetchone()
    assert row is not None
    return row


def get_version(conn: psycopg.Connection, alias: str, version: int) -> AdapterVersion:
    with conn.cursor(row_factory=class_row(AdapterVersion)) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM adapter_versions WHERE alias = %s AND version = %s", (alias, version))
        row = cur.fetchone()
    if row is None:
        raise ConfigError(f"adapter {alias} version {version} is not in the registry (see `tandem adapters`)")
    return row


def get_champion(conn: psycopg.Connection, alias: str) -> AdapterVersion | None:
    with conn.cursor(row_factory=class_row(AdapterVersion)) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM adapter_versions WHERE alias = %s AND status = 'champion'", (alias,))
        return cur.fetchone()


def champions(conn: psycopg.Connection) -> dict[str, AdapterVersion]:
    """The desired state the gateway's reconciler serves: alias -> its champion."""
    with conn.cursor(row_factory=class_row(AdapterVersion)) as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM adapter_versions WHERE status = 'champion' ORDER BY alias")
        return {row.alias: row for row in cur.fetchall()}


def list_versions(conn: psycopg.Connection, alias: str | None = None) -> list[AdapterVersion]:
    with conn.cursor(row_factory=class_row(AdapterVersion)) as cur:
        if alias:
            cur.execute(f"SELECT {_COLUMNS} FROM adapter_versions WHERE alias = %s ORDER BY version", (alias,))
        else:
            cur.execute(f"SELECT {_COLUMNS} FROM adapter_versions ORDER BY alias, version")
        return cur.fetchall()


def set_status(
    conn: psycopg.Connection,
    alias: str,
    version: int,
    status: str,
    reason: str | None = None,
    metrics: dict[str, Any] | None = None,
    actor: str | None = None,
) -> None:
    """Mark a version rejected/failed/candidate (not champion: use set_champion), merging metrics in.

    ``actor`` (who did it, e.g. "key:<name>", "cli:<user>") is recorded in ``changed_by`` when given."""
    if status not in STATUSES or status == "champion":
        raise ConfigError(f"status must be one of candidate, rejected, retired, failed (got {status!r})")
    with conn.transaction():
        conn.execute(
            """UPDATE adapter_versions SET status = %s, reason = COALESCE(%s, reason),
                   metrics = metrics || %s, changed_by = COALESCE(%s, changed_by), updated_at = now()
               WHERE alias = %s AND version = %s""",
            (status, reason, Jsonb(metrics or {}), actor, alias, version),
        )


def set_champion(
    conn: psycopg.Connection,
    alias: str,
    version: int,
    reason: str | None = None,
    actor: str | None = None,
    rollback: bool = False,
) -> AdapterVersion:
    """Atomically make ``version`` the alias's champion and retire the previous one; ``actor`` (who did it)
    goes to the new champion's ``promoted_by`` and both versions' ``changed_by``."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"adapter:{alias}",))
        target = get_version(conn, alias, version)
        if target.status in ("failed",):
            raise ConfigError(f"adapter {alias} v{version} failed ({target.reason}); it cannot be promoted")
        conn.execute(
            """UPDATE adapter_versions SET status = %s, changed_by = COALESCE(%s, changed_by),
                   reason = COALESCE(%s, reason), updated_at = now()
               WHERE alias = %s AND status = 'champion' AND version <> %s""",
            # a rollback marks the champion it leaves, so no later rollback returns to it (rollback_target)
            (
                "rolled_back" if rollback else "retired",
                actor,
                f"rolled back to v{version}" if rollback else None,
                alias,
                version,
            ),
        )
        conn.execute(
            """UPDATE adapter_versions SET status = 'champion', reason = COALESCE(%s, reason),
                   promoted_at = now(), promoted_by = %s, changed_by = COALESCE(%s, changed_by), updated_at = now()
               WHERE alias = %s AND version = %s""",
            (reason, actor, actor, alias, version),
        )
    return get_version(conn, alias, version)


def rollback_target(conn: psycopg.Connection, alias: str) -> AdapterVersion:
    """The version a rollback returns to: the most recently promoted retired version. A version a rollback left
    is 'rolled_back', not 'retired', so a second rollback goes one further back instead of returning to it."""
    with conn.cursor(row_factory=class_row(AdapterVersion)) as cur:
        cur.execute(
            f"""SELECT {_COLUMNS} FROM adapter_versions WHERE alias = %s AND status = 'retired'
                 AND promoted_at IS NOT NULL ORDER BY promoted_at DESC LIMIT 1""",
            (alias,),
        )
        row = cur.fetchone()
    if row is None:
        raise ConfigError(
            f"alias {alias!r} has no earlier champion to roll back to (versions rolled back from are skipped); "
            "promote a version by hand with `tandem promote`"
        )
    return row

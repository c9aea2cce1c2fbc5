"""The adapter registry in Postgres: every LoRA version with its lineage, and which one is each alias's champion.

A version is served by vLLM under its own name (``served_name``), never reloaded in place under an old one.
Status moves: candidate -> champion | rejected | failed; champion -> retired (when another is promoted) or
rolled_back (when a rollback leaves it: rollbacks walk back the lineage and never return to it).

One fleet agrees through this table: every switch of an alias (promote, rollback, stage) runs under the alias's
advisory lock (``lock_alias``) wherever it starts, and its commit sends ``pg_notify('tandem_registry', ...)``,
which every gateway LISTENs for (serving/registry_listener.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from components.errors import ConfigError

STATUSES = ("candidate", "champion", "rejected", "retired", "failed", "rolled_back")
NOTIFY_CHANNEL = "tandem_registry"
# Advisory lock classes (the first int of a two-int key; the second is hashtext of the alias or replica URL)
ALIAS_LOCK = 0x7A4D_0101  # one switch of an alias at a time, fleet-wide (transaction-scoped)
REPLICA_LOCK = 0x7A4D_0102  # one gateway's reconciler acts on a replica at a time (session-scoped)
DEFAULT_LOCK_WAIT_S = 30.0


class AliasBusyError(ConfigError):
    """Another promotion, rollback or stage of the alias held its lock for longer than the wait."""


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
    staged_at: datetime | None = None  # loaded ahead of its promotion on every replica (migration 0014)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def served_name(self) -> str:
        return served_name(self.alias, self.version)


def served_name(alias: str, version: int) -> str:
    """The name a version is loaded under in vLLM: one per version, so no stale prefix cache is ever hit."""
    return f"{alias}-v{version}"


_COLUMNS = (
    "id, alias, version, base_model, dataset_version, dataset_size, hyperparameters, metrics, artifact_uri, "
    "lora_rank, status, reason, parent_version, created_at, updated_at, promoted_at, promoted_by, changed_by, staged_at"
)


def lock_alias(conn: psycopg.Connection, alias: str, wait_s: float = DEFAULT_LOCK_WAIT_S) -> None:
    """Take ``alias``'s fleet-wide lock until the current transaction ends, waiting at most ``wait_s`` seconds.

    Raises AliasBusyError (nothing changed) when another promotion, rollback or stage of the alias holds it longer.
    Call inside ``conn.transaction()``.
    """
    conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{max(int(wait_s * 1000), 1)}ms",))
    try:
        with conn.transaction():  # a savepoint: a timed-out wait leaves the outer transaction usable
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (ALIAS_LOCK, alias))
    except (pg_errors.LockNotAvailable, pg_errors.QueryCanceled) as exc:
        raise AliasBusyError(
            f"another promotion, rollback or stage of {alias!r} is running (waited {wait_s:g} s for its lock); "
            "retry when it has finished"
        ) from exc
    conn.execute("SELECT set_config('lock_timeout', '0', true)")


def notify(conn: psycopg.Connection, alias: str, version: int, event: str) -> None:
    """Tell every gateway (LISTEN tandem_registry) about a switch; delivered when the transaction commits."""
    payload = json.dumps({"alias": alias, "version": version, "event": event})
    conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, payload))


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
        lock_alias(conn, alias)
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


def staged(conn: psycopg.Connection) -> dict[str, AdapterVersion]:
    """alias -> its staged candidate (at most one per alias): loaded on every replica ahead of its promotion."""
    with conn.cursor(row_factory=class_row(AdapterVersion)) as cur:
        cur.execute(
            f"""SELECT {_COLUMNS} FROM adapter_versions WHERE status = 'candidate' AND staged_at IS NOT NULL
                ORDER BY alias, staged_at"""
        )
        return {row.alias: row for row in cur.fetchall()}


def set_staged(conn: psycopg.Connection, alias: str, version: int) -> None:
    """Record ``version`` as the alias's staged candidate (clearing any other) and notify the gateways.

    Call in a transaction that holds ``lock_alias``."""
    conn.execute(
        "UPDATE adapter_versions SET staged_at = CASE WHEN version = %s THEN now() END "
        "WHERE alias = %s AND (version = %s OR staged_at IS NOT NULL)",
        (version, alias, version),
    )
    notify(conn, alias, version, "stage")


def db_now(conn: psycopg.Connection) -> datetime:
    """The database's clock: every gateway measures the drain grace against it, never against its own."""
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    value: datetime = row[0]
    return value


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
    lock_wait_s: float = DEFAULT_LOCK_WAIT_S,
) -> AdapterVersion:
    """Atomically make ``version`` the alias's champion and retire the previous one; ``actor`` (who did it)
    goes to the new champion's ``promoted_by`` and both versions' ``changed_by``.

    Runs under the alias's lock (already held when the caller took it in an outer transaction) and notifies
    every gateway at commit: this commit is the switch."""
    with conn.transaction():
        lock_alias(conn, alias, lock_wait_s)
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
        notify(conn, alias, version, "rollback" if rollback else "promote")
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

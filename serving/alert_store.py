"""Alertmanager's webhook notifications, kept in Postgres (table alert_notifications, migration 0010).

Every gateway replica writes to and reads from the same table, so the dashboards page shows the same alerts
whichever replica serves it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from pydantic import BaseModel, Field

from serving.schemas import Text  # refuses NUL (Postgres text and jsonb cannot hold it) with a 400

KEEP_DAYS = 30


class WebhookAlert(BaseModel):
    status: str = Field(pattern="^(firing|resolved)$")
    labels: dict[Text, Text]
    annotations: dict[Text, Text] = Field(default_factory=dict)
    startsAt: datetime | None = None  # noqa: N815 - Alertmanager's field names
    endsAt: datetime | None = None  # noqa: N815
    fingerprint: Text = Field(min_length=1, max_length=64)


class WebhookPayload(BaseModel):
    """Alertmanager's webhook body (version 4); fields Tandem does not keep are ignored."""

    version: str = "4"
    receiver: Text = Field(min_length=1, max_length=200)
    status: str = Field(pattern="^(firing|resolved)$")
    alerts: list[WebhookAlert] = Field(max_length=1000)


def _when(value: datetime | None) -> datetime | None:
    # Alertmanager sends year 1 for "not ended yet".
    return value if value is not None and value.year >= 1970 else None


def store(conn: psycopg.Connection, payload: WebhookPayload) -> int:
    """Insert one row per alert and prune old rows, in one transaction; returns the rows stored."""
    rows = [
        (
            payload.receiver,
            a.status,
            a.labels.get("alertname", ""),
            a.labels.get("severity", ""),
            a.fingerprint,
            _when(a.startsAt),
            _when(a.endsAt),
            Jsonb(a.labels),
            Jsonb(a.annotations),
        )
        for a in payload.alerts
    ]
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO alert_notifications
                   (receiver, status, alertname, severity, fingerprint, starts_at, ends_at, labels, annotations)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)""",
            rows,
        )
        cur.execute(
            "DELETE FROM alert_notifications WHERE received_at < now() - make_interval(days => %s)", (KEEP_DAYS,)
        )
    return len(rows)


def recent(conn: psycopg.Connection, limit: int = 50) -> dict[str, Any]:
    """The newest notifications, and each alert's latest state (firing first)."""
    cols = "alertname, status, severity, fingerprint, starts_at, ends_at, received_at, labels, annotations"
    with conn.cursor() as cur:
        cur.execute(f"SELECT {cols} FROM alert_notifications ORDER BY received_at DESC, id DESC LIMIT %s", (limit,))
        names = [d.name for d in cur.description or []]
        history = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        cur.execute(
            f"""SELECT {cols} FROM (
                    SELECT DISTINCT ON (fingerprint) {cols} FROM alert_notifications
                    ORDER BY fingerprint, received_at DESC, id DESC) latest
                ORDER BY status = 'firing' DESC, received_at DESC LIMIT %s""",
            (limit,),
        )
        current = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    return {"current": [_plain(r) for r in current], "history": [_plain(r) for r in history]}


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.astimezone(UTC).isoformat() if isinstance(v, datetime) else v for k, v in row.items()}

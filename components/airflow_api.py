"""Airflow's REST API, as far as Tandem needs it: announce new domain data as an asset event.

The DAGs are scheduled on one asset URI per kind, with the alias in each event's extra (dags/retrain_adapter.py
says why). Where the DAGs themselves are not the source of an event (`tandem data add` on a laptop), this
module posts the event: ``POST /api/v2/assets/events`` with the asset's id, looked up by its URI, and a JWT from
``POST /auth/token``. No credentials means no call: an anonymous request is never tried.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx

from components.errors import ConfigError, ServiceError
from components.settings import Settings

# The assets of the retraining chain; the DAG files declare these same URIs.
DOMAIN_DATA_URI = "tandem://data/domain"  # extra: {"alias": ..., ...}; schedules retrain_adapter
PROMOTED_URI = "tandem://adapters/promoted"  # extra: {"alias", "version", "served_name"}; schedules evaluate_hybrid
EVALUATED_URI = "tandem://adapters/evaluated"  # extra: {"alias", "adapter_version", "run_id"}
ALIAS_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # as the registry's CHECK
GENERATED_LOGINS = "simple_auth_manager_passwords.json.generated"
TIMEOUT_S = 120.0  # Airflow standalone on SQLite answers slowly while its own processes write
EVENT_RETRIES = 2  # more tries of an asset event that Airflow answered 5xx (post_asset_event)


class AirflowUnreachableError(ServiceError):
    """Airflow's API server did not answer: the caller may warn and go on (the next poll picks the data up)."""


def _local(settings: Settings) -> bool:
    return not settings.airflow_url.strip()


def _password(settings: Settings) -> str:
    """The configured password, or for the local standalone the one its simple auth manager generated."""
    if settings.airflow_password:
        return settings.airflow_password
    path = settings.airflow_home / GENERATED_LOGINS
    if not _local(settings):
        raise ConfigError(
            f"no credentials for Airflow at {settings.airflow_api_url}: set TANDEM_AIRFLOW_TOKEN, or "
            "TANDEM_AIRFLOW_USERNAME and TANDEM_AIRFLOW_PASSWORD"
        )
    try:
        users = json.loads(path.read_text())
    except OSError:
        raise ConfigError(
            f"no Airflow credentials: {path} is missing (the local Airflow writes it when `tandem up` starts it); "
            "or set TANDEM_AIRFLOW_PASSWORD or TANDEM_AIRFLOW_TOKEN"
        ) from None
    except ValueError:
        raise ConfigError(f"{path} is not JSON; expected Airflow's generated {{user: password}} file") from None
    password = users.get(settings.airflow_username) if isinstance(users, dict) else None
    if not isinstance(password, str) or not password:
        raise ConfigError(
            f"{path} has no password for user {settings.airflow_username!r}; set TANDEM_AIRFLOW_USERNAME to one "
            "of its users, or TANDEM_AIRFLOW_PASSWORD"
        )
    return password


def _call(client: httpx.Client, method: str, path: str, retries: int = 0, **kwargs: Any) -> httpx.Response:
    """One API call; ``retries`` more tries (1 s, 2 s, ... apart) where Airflow answers 5xx."""
    for attempt in range(retries + 1):
        try:
            resp = client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise AirflowUnreachableError(
                f"Airflow at {client.base_url} is not reachable ({type(exc).__name__}); is it up? (`tandem up`)"
            ) from None
        if resp.status_code < 500 or attempt == retries:
            break
        time.sleep(1.0 + attempt)
    if resp.status_code in (401, 403):
        raise ConfigError(f"Airflow at {client.base_url} refused the credentials ({resp.status_code} on {path})")
    if resp.status_code >= 400:
        detail = resp.text.strip().replace("\n", " ")[:300]
        raise ServiceError(f"Airflow answered {resp.status_code} to {method} {path}: {detail}")
    return resp


def client(settings: Settings) -> httpx.Client:
    """An HTTP client for Airflow's API with a bearer token (TANDEM_AIRFLOW_TOKEN, or one issued for the user)."""
    base = settings.airflow_api_url
    token = settings.airflow_token
    if not token:
        password = _password(settings)
        with httpx.Client(base_url=base, timeout=TIMEOUT_S) as anon:
            resp = _call(
                anon, "POST", "/auth/token", json={"username": settings.airflow_username, "password": password}
            )
        token = resp.json().get("access_token", "")
        if not token:
            raise ServiceError(f"Airflow at {base} issued no access_token from /auth/token")
    return httpx.Client(base_url=base, timeout=TIMEOUT_S, headers={"Authorization": f"Bearer {token}"})


def asset_id(http: httpx.Client, uri: str) -> int:
    """The id Airflow gave the asset with this URI (it exists once a DAG file that declares it was parsed)."""
    found = _call(http, "GET", "/api/v2/assets", params={"uri_pattern": uri, "limit": 100}).json()
    for asset in found.get("assets", []):
        if asset.get("uri") == uri:
            return int(asset["id"])
    raise ServiceError(f"Airflow knows no asset {uri}: are the Tandem DAGs in its dags folder and parsed?")


def post_asset_event(settings: Settings, uri: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Create an event on the asset ``uri`` with ``extra``; returns Airflow's record of it (id, timestamp)."""
    with client(settings) as http:
        body = {"asset_id": asset_id(http, uri), "extra": extra}
        # Airflow on SQLite (standalone) answers 500 "Database error" when its scheduler holds the database; the
        # request's transaction is rolled back then, so nothing was created and a second try is safe
        event: dict[str, Any] = _call(http, "POST", "/api/v2/assets/events", retries=EVENT_RETRIES, json=body).json()
    return event


def announce_domain_data(settings: Settings, alias: str, extra: dict[str, Any]) -> None:
    """Tell Airflow that ``alias`` has new approved domain data: an event on DOMAIN_DATA_URI with the alias in its
    extra, which starts dags/retrain_adapter.py for that alias. Raises AirflowUnreachableError when Airflow is down."""
    if not alias:
        raise ConfigError("announce_domain_data needs an alias")
    post_asset_event(settings, DOMAIN_DATA_URI, {**extra, "alias": alias})


def event_aliases(extras: list[dict[str, Any]], fallback: str) -> tuple[list[str], list[str]]:
    """The aliases a run is for, from its triggering events' extras: each once, in the events' order; an event
    that names no alias counts for ``fallback`` (the default alias). The second list says which extras were
    left out and why (an alias that is not a valid name): an event is posted by anyone the API lets in."""
    aliases: list[str] = []
    skipped: list[str] = []
    for extra in extras:
        alias = (extra or {}).get("alias", fallback)
        if not isinstance(alias, str) or not ALIAS_PATTERN.fullmatch(alias):
            skipped.append(f"event extra {json.dumps(extra)[:200]}: alias {alias!r} is not [a-z0-9][a-z0-9_-]*")
        elif alias not in aliases:
            aliases.append(alias)
    return aliases, skipped

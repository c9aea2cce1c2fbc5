"""Bearer API keys with names, failing closed: no key configured means every request is refused.

Client endpoints (/v1) take a client or an admin key; the admin API takes only an admin key. Keys are read once
at start-up (``load_keys``: TANDEM_API_KEYS / TANDEM_ADMIN_API_KEYS, else the key file `tandem up` writes), kept
as SHA-256 digests and compared in constant time. The matching key's name goes to ``request.state.key_name``,
for per-key limits and for the registry's record of who changed what.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from components.keys import ApiKey, digest, gateway_keys
from components.settings import Settings
from serving import metrics as m
from serving.errors import ApiError

log = logging.getLogger("serving")

_bearer = HTTPBearer(
    auto_error=False, description="a key from TANDEM_API_KEYS (admin API: TANDEM_ADMIN_API_KEYS), or `tandem up`'s"
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


@dataclass(frozen=True)
class GatewayKeys:
    client: list[ApiKey]
    admin: list[ApiKey]


def load_keys(settings: Settings) -> GatewayKeys:
    """Parse the configured keys; a bad or placeholder entry raises a one-line KeyConfigError (start-up fails)."""
    client, admin = gateway_keys(settings)
    if not client and not admin:
        log.warning("no API keys configured: /v1 and the admin API refuse every request until keys are set")
    elif not admin:
        log.warning("no admin key configured: the admin API refuses every request")
    return GatewayKeys(client, admin)


def _find(secret: str, keys: list[ApiKey]) -> ApiKey | None:
    # Check every key, whatever matched first, so the time taken does not tell which key (or none) matched.
    wanted = digest(secret)
    found = None
    for key in keys:
        if hmac.compare_digest(wanted, key.digest) and found is None:
            found = key
    return found


def _keys(request: Request) -> GatewayKeys:
    keys: GatewayKeys = request.app.state.keys
    return keys


def require_api_key(request: Request, credentials: Credentials) -> None:
    """Client endpoints: a client or admin key; refused when none is configured at all."""
    keys = _keys(request)
    accepted = keys.client + keys.admin
    if not accepted:
        m.REJECTED.labels(reason="no_keys_configured").inc()
        raise ApiError(
            403,
            "this gateway has no API keys configured, so it refuses every request: set TANDEM_API_KEYS "
            "(name:secret) or start it with `tandem up`",
            code="no_keys_configured",
        )
    if credentials is None:
        m.REJECTED.labels(reason="no_api_key").inc()
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer KEY'", code="missing_api_key")
    key = _find(credentials.credentials, accepted)
    if key is None:
        m.REJECTED.labels(reason="bad_api_key").inc()
        raise ApiError(401, "invalid API key", code="invalid_api_key")
    request.state.key_name = key.name


def require_admin_key(request: Request, credentials: Credentials) -> None:
    """The admin API: an admin key only; refused when no admin key is configured."""
    keys = _keys(request)
    if not keys.admin:
        m.REJECTED.labels(reason="admin_disabled").inc()
        raise ApiError(
            403,
            "the admin API is off: no admin key is configured; set TANDEM_ADMIN_API_KEYS (name:secret) "
            "or start the gateway with `tandem up`",
            code="admin_disabled",
        )
    if credentials is None:
        m.REJECTED.labels(reason="no_admin_key").inc()
        raise ApiError(401, "missing admin key: send 'Authorization: Bearer ADMIN_KEY'", code="missing_api_key")
    key = _find(credentials.credentials, keys.admin)
    if key is None:
        m.REJECTED.labels(reason="bad_admin_key").inc()
        if _find(credentials.credentials, keys.client) is not None:
            raise ApiError(403, "this key is not an admin key (TANDEM_ADMIN_API_KEYS)", code="not_admin")
        raise ApiError(401, "invalid admin key", code="invalid_api_key")
    request.state.key_name = key.name


def actor(request: Request) -> str:
    """Who did an admin action, as the registry records it: ``key:<name>``."""
    return f"key:{getattr(request.state, 'key_name', 'unknown')}"

"""Bearer API keys: required on /v1 once any key is set; admin endpoints need an admin key when any is set."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from components.settings import Settings
from serving import metrics as m
from serving.errors import ApiError

_bearer = HTTPBearer(auto_error=False, description="an API key from TANDEM_API_KEYS (admin: TANDEM_ADMIN_API_KEYS)")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _matches(token: str, keys: list[str]) -> bool:
    # Compare against every key with a constant-time compare, so timing does not reveal a prefix.
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def require_api_key(request: Request, credentials: Credentials) -> None:
    settings = _settings(request)
    keys = settings.api_keys + settings.admin_api_keys
    if not settings.api_keys:  # open until a user key is set (admin keys alone guard only the admin API)
        return
    if credentials is None:
        m.REJECTED.labels(reason="no_api_key").inc()
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer KEY'", code="missing_api_key")
    if not _matches(credentials.credentials, keys):
        m.REJECTED.labels(reason="bad_api_key").inc()
        raise ApiError(401, "invalid API key", code="invalid_api_key")


def require_admin_key(request: Request, credentials: Credentials) -> None:
    settings = _settings(request)
    if not settings.admin_api_keys:
        return
    if credentials is None:
        m.REJECTED.labels(reason="no_admin_key").inc()
        raise ApiError(401, "missing admin key: send 'Authorization: Bearer ADMIN_KEY'", code="missing_api_key")
    if not _matches(credentials.credentials, settings.admin_api_keys):
        m.REJECTED.labels(reason="bad_admin_key").inc()
        raise ApiError(403, "this key is not an admin key (TANDEM_ADMIN_API_KEYS)", code="not_admin")

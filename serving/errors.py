"""OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}``, one-line messages."""

from __future__ import annotations

from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.adapters import AdapterError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error answered to the client as it is."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": " ".join(message.split()),
            "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    if first.get("type") == "extra_forbidden":  # a field outside the allowlist (serving/schemas.py)
        return f"unsupported parameter '{param}'{more}", param
    return f"{param or 'body'}: {first.get('msg', 'invalid')}{more}", param


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into the OpenAI shape."""

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(AdapterError)
    async def _adapter(request: Request, exc: AdapterError) -> JSONResponse:
        return error_response(exc.status, exc.message, "model" if exc.status == 404 else None, exc.code)

    @app.exception_handler(psycopg.OperationalError)
    async def _database(request: Request, exc: psycopg.OperationalError) -> JSONResponse:
        # Postgres down, slow (statement_timeout) or no pooled connection in time: a clear 503, never a 500
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return error_response(503, f"database unavailable: {first}", code="database_unavailable")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        code = "unsupported_parameter" if message.startswith("unsupported parameter") else "invalid_value"
        return error_response(400, message, param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

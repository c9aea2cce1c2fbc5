"""Start vLLM's OpenAI server with its API key guarding every route except health and metrics.

vLLM's own key check (``--api-key`` / ``VLLM_API_KEY``) only covers paths under /v1, /v2, /inference and
/cohere. The installed vLLM also serves, without the key, ``/invocations`` (SageMaker: chat and completions),
``/adapters`` (SageMaker: load and unload LoRA adapters from any path), ``/tokenize``, ``/pooling`` and others.
Run as ``python -m components.stack.vllm_server ARGS`` (the arguments of vLLM's api_server), this swaps vLLM's
middleware class for one that checks the key on every path but ``OPEN_PATHS`` before vLLM builds its app.

It patches the one API-server process (vLLM's default); with ``--api-server-count`` above 1 the extra processes
keep vLLM's narrower check. Where vLLM's module has moved, it warns and leaves vLLM's check as it is.
"""

from __future__ import annotations

import logging
import runpy
from typing import Any

log = logging.getLogger("tandem.vllm_server")

# Liveness, readiness and metrics stay open: probes and Prometheus scrape them without a key.
OPEN_PATHS = ("/health", "/ping", "/metrics", "/version")


def is_open(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in OPEN_PATHS)


def guard_every_route() -> bool:
    """Make vLLM's key middleware guard every path but OPEN_PATHS; False when vLLM's module is not found."""
    try:
        from starlette.datastructures import Headers
        from starlette.responses import JSONResponse
        from vllm.entrypoints.serve.middleware import authenticate
    except ImportError as exc:
        log.warning("vLLM's key middleware not found (%s): only vLLM's own prefixes are guarded", exc)
        return False
    upstream = authenticate.AuthenticationMiddleware

    class GuardEveryRoute(upstream):  # type: ignore[misc, valid-type]
        def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
            if scope["type"] in ("http", "websocket") and scope.get("method") != "OPTIONS":
                path = scope["path"].removeprefix(scope.get("root_path", ""))
                if not is_open(path) and not self.verify_token(Headers(scope=scope)):
                    return JSONResponse(content={"error": "Unauthorized"}, status_code=401)(scope, receive, send)
            return self.app(scope, receive, send)

    authenticate.AuthenticationMiddleware = GuardEveryRoute  # type: ignore[misc]
    return True


def main() -> None:
    guard_every_route()
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

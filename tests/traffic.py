"""Gateway traffic for the tests that read metrics back (dashboards, the dashboards page): what their panels draw."""

from __future__ import annotations

from typing import Any


def one_round(client: Any, ask: dict[str, Any], query: str) -> None:
    """A chat completion, the same streamed to its end, and a retrieval-only request; each must succeed.

    ``client`` is an ``httpx.Client`` on the gateway with a client key."""
    client.post("/v1/chat/completions", json=ask).raise_for_status()
    with client.stream("POST", "/v1/chat/completions", json={**ask, "stream": True}) as resp:
        resp.raise_for_status()
        for _ in resp.iter_lines():
            pass
    client.post("/v1/retrieve", json={"query": query, "top_k": 3}).raise_for_status()

"""Small HTTP health probes (stdlib only, so `tandem status` stays fast)."""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """True when ``url`` answers with a 2xx status; False for anything else, a reply that is not HTTP included.

    A probe of a loopback port in the ephemeral range that nobody listens on yet can connect to itself (TCP
    simultaneous open): it then reads its own request back, and http.client raises BadStatusLine, which is
    neither a URLError nor an OSError. That is "not up yet", not a reason to stop waiting.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - our own loopback URLs
            return 200 <= resp.status < 300
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
        return False

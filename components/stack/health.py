"""Small HTTP health probes (stdlib only, so `tandem status` stays fast)."""

from __future__ import annotations

import urllib.error
import urllib.request


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """True when ``url`` answers with a 2xx status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - our own loopback URLs
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False

"""API keys with names: parsing ``name:secret`` entries, the local key file, and the secrets clients send.

Keys come from ``TANDEM_API_KEYS`` / ``TANDEM_ADMIN_API_KEYS`` (comma-separated ``name:secret`` entries) and
``TANDEM_VLLM_API_KEY``; where one is unset, from the key file ``tandem up`` writes under the state directory
the first time (mode 0600, like Airflow's simple auth manager writes its passwords). Only digests of the
gateway's keys are kept in memory; the name is what admin actions are recorded with.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from components.errors import ConfigError
from components.settings import Settings

KEY_FILE_NAME = "keys.json"
MIN_SECRET_CHARS = 16
LOCAL_CLIENT_NAME = "local-client"
LOCAL_ADMIN_NAME = "local-admin"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
# Secrets copied from examples and docs: refused wherever a key is configured.
_PLACEHOLDER_PREFIXES = ("change-me", "changeme", "change_me", "replace-me", "replaceme", "replace_me", "placeholder")
_PLACEHOLDER_WORDS = ("secret", "password", "example", "your-key", "your_key", "dummy")

Kind = Literal["client", "admin", "vllm"]


class KeyConfigError(ConfigError):
    """A key entry, setting or key file that cannot be used (bad form, placeholder, too short, unreadable)."""


@dataclass(frozen=True)
class ApiKey:
    """A configured key: its name (for audit and per-key limits) and the SHA-256 digest of its secret."""

    name: str
    digest: bytes

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(self.digest, digest(secret))


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def placeholder_reason(secret: str) -> str | None:
    """Why ``secret`` cannot be a real key (empty, too short, a placeholder), or None when it can."""
    if not secret.strip():
        return "the secret is empty"
    if len(secret) < MIN_SECRET_CHARS:
        return f"the secret has {len(secret)} characters, at least {MIN_SECRET_CHARS} are needed"
    low = secret.lower()
    if low.startswith(_PLACEHOLDER_PREFIXES) or any(w in low for w in _PLACEHOLDER_WORDS) or len(set(secret)) < 6:
        return "the secret is a placeholder"
    return None


def split_entry(entry: str) -> tuple[str, str]:
    """``name:secret`` -> (name, secret), or KeyConfigError naming the entry by its name only (never the secret)."""
    name, sep, secret = entry.strip().partition(":")
    shown = name if sep else "(no name)"
    if not sep:
        raise KeyConfigError("API key entry without a name: expected 'name:secret' (e.g. 'alice:<32 random chars>')")
    if not _NAME.fullmatch(name):
        raise KeyConfigError(f"API key name {name!r}: expected 1-64 of letters, digits, '_', '.', '@', '-'")
    reason = placeholder_reason(secret)
    if reason:
        raise KeyConfigError(
            f"API key {shown!r}: {reason}; make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return name, secret


def parse_keys(entries: list[str]) -> list[ApiKey]:
    """Parse ``name:secret`` entries into hashed keys; a bad, placeholder or duplicate entry raises KeyConfigError."""
    keys: list[ApiKey] = []
    for entry in entries:
        name, secret = split_entry(entry)
        if any(k.name == name for k in keys):
            raise KeyConfigError(f"API key name {name!r} is configured twice: each key needs its own name")
        keys.append(ApiKey(name, digest(secret)))
    return keys


# ---- the local key file ----------------------------------------------------------------------------------------


def key_file(settings: Settings) -> Path:
    return settings.state_dir / KEY_FILE_NAME


@dataclass(frozen=True)
class LocalKeys:
    """The key file's content: a client key and an admin key as ``name:secret``, and vLLM's secret."""

    client: str
    admin: str
    vllm: str

    def entry(self, kind: Kind) -> str:
        return {"client": self.client, "admin": self.admin, "vllm": self.vllm}[kind]


def read_key_file(settings: Settings) -> LocalKeys | None:
    """The key file under the state directory, or None when there is none.

    Refused (KeyConfigError) when others can read it or it is not the file ``tandem up`` writes.
    """
    path = key_file(settings)
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise KeyConfigError(f"key file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}): chmod 600 it")
    try:
        data = json.loads(path.read_text())
        found = LocalKeys(client=data["client"], admin=data["admin"], vllm=data["vllm"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KeyConfigError(
            f"key file {path} is unreadable ({exc!r}): delete it and run `tandem up` to make a new one"
        ) from exc
    for entry in (found.client, found.admin):
        split_entry(entry)
    if placeholder_reason(found.vllm):
        raise KeyConfigError(f"key file {path}: the vllm secret is unusable: delete the file and run `tandem up`")
    return found


def ensure_key_file(settings: Settings) -> tuple[Path, bool]:
    """Create the key file with new random keys unless it exists; (path, created). Mode 0600, written whole."""
    path = key_file(settings)
    if read_key_file(settings) is not None:
        return path, False
    keys = LocalKeys(
        client=f"{LOCAL_CLIENT_NAME}:{secrets.token_urlsafe(32)}",
        admin=f"{LOCAL_ADMIN_NAME}:{secrets.token_urlsafe(32)}",
        vllm=secrets.token_urlsafe(32),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"client": keys.client, "admin": keys.admin, "vllm": keys.vllm}, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails when another `tandem up` made it first: theirs is kept
            created = True
        except FileExistsError:
            created = False
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    read_key_file(settings)  # the file now there (ours or the other's) must be usable
    return path, created


# ---- what the gateway accepts and what clients send ------------------------------------------------------------


def _entries(settings: Settings, kind: Literal["client", "admin"]) -> list[str]:
    configured = settings.api_keys if kind == "client" else settings.admin_api_keys
    if configured:
        return list(configured)
    local = read_key_file(settings)
    return [local.entry(kind)] if local else []


def gateway_keys(settings: Settings) -> tuple[list[ApiKey], list[ApiKey]]:
    """(client keys, admin keys) the gateway accepts: each from its setting, else from the key file; hashed.

    Raises KeyConfigError with a one-line reason for a bad or placeholder entry, or a name used for two keys.
    """
    client = parse_keys(_entries(settings, "client"))
    admin = parse_keys(_entries(settings, "admin"))
    both = {k.name for k in client} & {k.name for k in admin}
    if both:
        raise KeyConfigError(
            f"API key name {sorted(both)[0]!r} is both a client and an admin key: give each its own name"
        )
    return client, admin


def _first_secret(entries: list[str]) -> str | None:
    return split_entry(entries[0])[1] if entries else None


def client_secret(settings: Settings) -> str | None:
    """The secret a local client sends to /v1: TANDEM_API_KEYS, else the key file, else an admin key; or None."""
    return _first_secret(_entries(settings, "client")) or admin_secret(settings)


def admin_secret(settings: Settings) -> str | None:
    """The secret a local client sends to the admin API: TANDEM_ADMIN_API_KEYS, else the key file; or None."""
    return _first_secret(_entries(settings, "admin"))


def vllm_secret(settings: Settings) -> str | None:
    """The key the gateway and training send to vLLM: TANDEM_VLLM_API_KEY, else the key file's; or None."""
    if settings.vllm_api_key:
        reason = placeholder_reason(settings.vllm_api_key)
        if reason:
            raise KeyConfigError(f"TANDEM_VLLM_API_KEY: {reason}")
        return settings.vllm_api_key
    local = read_key_file(settings)
    return local.vllm if local else None


def bearer(secret: str | None) -> dict[str, str]:
    """The Authorization header for ``secret`` ({} for None)."""
    return {"Authorization": f"Bearer {secret}"} if secret else {}

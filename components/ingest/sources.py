"""Where documents come from: a local folder (recursive) or any fsspec URL (s3://, gs://, ... once installed).

A document's key is its path relative to the source root, with forward slashes. Only locations under the
allowed roots (TANDEM_INGEST_ALLOWED_ROOTS) are opened: :func:`check_allowed` runs before anything is listed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.errors import ConfigError

SUPPORTED_SUFFIXES = (".md", ".markdown", ".txt", ".text", ".html", ".htm", ".pdf")


@dataclass(frozen=True)
class SourceFile:
    """One file found in a source: its key, size and modification time (from the listing, nothing read yet)."""

    path: str
    size: int
    modified_at: datetime | None
    problem: str = ""  # set when the listing alone shows the file cannot be indexed (quarantined unread)


class Source:
    """A folder-like root opened through fsspec; ``name`` is the id stored with every document."""

    def __init__(self, location: str) -> None:
        import fsspec

        location = location.strip()
        if not location:
            raise ConfigError("ingest source is empty: give a folder or an fsspec URL such as s3://bucket/docs")
        is_url = "://" in location
        try:
            self.fs: Any
            self.fs, root = fsspec.core.url_to_fs(location)
        except (ImportError, ValueError) as exc:
            raise ConfigError(
                f"cannot open source {location!r} ({exc}); install the fsspec filesystem for that URL scheme"
            ) from exc
        if not is_url:
            root = str(Path(root).resolve())
        self.root: str = root.rstrip("/") or "/"
        # The id kept with each document: the URL as given, or the folder as given (relative stays relative,
        # so a repo checked out elsewhere keeps the same ids).
        self.name: str = location.rstrip("/") if is_url else str(Path(location))
        try:
            is_dir = self.fs.isdir(self.root)
        except OSError as exc:
            raise ConfigError(f"cannot read source {location!r}: {exc}") from exc
        if not is_dir:
            raise ConfigError(f"ingest source {location!r} is not a folder: give a directory or a prefix URL")

    def list_files(self) -> list[SourceFile]:
        """Every supported file under the root, sorted by key; hidden files and folders are skipped."""
        found = self.fs.find(self.root, detail=True)
        files = []
        for full, info in found.items():
            if info.get("type", "file") != "file":
                continue
            key = self._key(full)
            if any(part.startswith(".") for part in key.split("/")):
                continue
            if not key.lower().endswith(SUPPORTED_SUFFIXES):
                continue
            problem = ""
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:  # a local name in another encoding: Postgres cannot store it as text
                key = os.fsencode(key).decode("utf-8", "backslashreplace")
                problem = "file name is not valid UTF-8: rename the file"
            files.append(SourceFile(key, int(info.get("size") or 0), _mtime(info), problem))
        return sorted(files, key=lambda f: f.path)

    def read_bytes(self, key: str) -> bytes:
        data: bytes = self.fs.cat_file(f"{self.root}/{key}")
        return data

    def _key(self, full: str) -> str:
        root = self.fs._strip_protocol(self.root).rstrip("/")
        full = self.fs._strip_protocol(full)
        return full[len(root) :].lstrip("/") if full.startswith(root) else full


def check_allowed(location: str, roots: Iterable[str]) -> None:
    """Refuse a source that is not under one of `roots` (local folders, or URL prefixes such as s3://bucket/docs).

    Local paths and file:// URLs are compared after resolving symlinks; any other URL must start with an
    allowed prefix at a "/" boundary, without "." or ".." segments or fsspec "::" chaining the prefix lacks.
    Nothing is opened: an internal http:// address is refused before any request is made.
    """
    location = location.strip()
    local_roots: list[Path] = []
    url_roots: list[str] = []
    for root in roots:
        root = root.strip()
        if not root:
            continue
        if "://" in root and not root.lower().startswith("file://"):
            url_roots.append(root.rstrip("/"))
        else:
            local_roots.append(_resolve_local(root))
    hint = "add its folder or URL prefix to TANDEM_INGEST_ALLOWED_ROOTS (comma-separated)"
    is_url = "://" in location and not location.lower().startswith("file://")
    if is_url:
        rest = location.split("://", 1)[1]
        if any(segment in (".", "..") for segment in rest.split("/")):
            raise ConfigError(f"ingest source {location!r} has '.' or '..' segments: give the plain URL")
        for prefix in url_roots:
            if (location == prefix or location.startswith(prefix + "/")) and ("::" not in location or "::" in prefix):
                return
        raise ConfigError(f"ingest source {location!r} is not under an allowed URL prefix: {hint}")
    if "::" in location:
        raise ConfigError(f"ingest source {location!r} chains filesystems ('::'): give a folder or a plain URL")
    path = _resolve_local(location)
    if any(path == root or path.is_relative_to(root) for root in local_roots):
        return
    raise ConfigError(f"ingest source {location!r} (resolved to {str(path)!r}) is not under an allowed root: {hint}")


def _resolve_local(location: str) -> Path:
    """A plain path or file:// URL as the absolute path it names, every symlink resolved."""
    if location.lower().startswith("file://"):
        location = location[len("file://") :]
    return Path(os.path.expanduser(location)).resolve()


def _mtime(info: dict[str, Any]) -> datetime | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        if isinstance(value, int | float):
            return datetime.fromtimestamp(value, UTC)
        try:
            return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            continue
    return None

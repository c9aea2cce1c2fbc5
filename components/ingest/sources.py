"""Where documents come from: a local folder (recursive) or any fsspec URL (s3://, gs://, ... once installed).

A document's key is its path relative to the source root, with forward slashes.
"""

from __future__ import annotations

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
            files.append(SourceFile(key, int(info.get("size") or 0), _mtime(info)))
        return sorted(files, key=lambda f: f.path)

    def read_bytes(self, key: str) -> bytes:
        data: bytes = self.fs.cat_file(f"{self.root}/{key}")
        return data

    def _key(self, full: str) -> str:
        root = self.fs._strip_protocol(self.root).rstrip("/")
        full = self.fs._strip_protocol(full)
        return full[len(root) :].lstrip("/") if full.startswith(root) else full


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

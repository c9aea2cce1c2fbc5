"""Document ingestion: sources, loaders, chunking, change detection and storage into pgvector.

Entry point: :func:`components.ingest.sync.sync_documents` (used by `tandem ingest` and the DAG). It is
imported on first use, so the document reader's child process (``reader.py``) loads no model or driver code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from components.ingest.sync import SyncReport, sync_documents

__all__ = ["SyncReport", "sync_documents"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from components.ingest import sync

        return getattr(sync, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

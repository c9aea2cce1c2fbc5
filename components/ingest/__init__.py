"""Document ingestion: sources, loaders, chunking, change detection and storage into pgvector.

Entry point: :func:`components.ingest.sync.sync_documents` (used by `tandem ingest` and the DAG).
"""

from components.ingest.sync import SyncReport, sync_documents

__all__ = ["SyncReport", "sync_documents"]

"""DAG `ingest_documents`: sync the document source into the index on a schedule, then mark the index asset.

All the work is `components.ingest.sync_documents` (the same function `tandem ingest` runs). Other DAGs can
be scheduled on DOCUMENT_INDEX; each event's extra is the sync report.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Asset, Param, dag, task

from components.settings import get_settings

DOCUMENT_INDEX = Asset(name="document_index", uri="tandem://index/documents")
_settings = get_settings()


@dag(
    dag_id="ingest_documents",
    schedule=_settings.ingest_schedule,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1), "retry_exponential_backoff": True},
    params={
        "source": Param(_settings.docs_source, type="string", description="folder or fsspec URL to sync"),
        "force": Param(False, type="boolean", description="re-chunk and re-embed every document"),
        "allow_mass_delete": Param(
            False,
            type="boolean",
            description="let this run delete all, or more than TANDEM_INGEST_MAX_DELETE_SHARE, of the source",
        ),
    },
    tags=["tandem", "retrieval"],
    doc_md=__doc__,
)
def ingest_documents() -> None:
    @task(outlets=[DOCUMENT_INDEX])
    def sync(params: dict[str, Any] | None = None, outlet_events: Any = None) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException

        from components.db import migrate
        from components.errors import ConfigError
        from components.ingest import sync_documents

        params = params or {}
        migrate()
        try:
            report = sync_documents(
                str(params.get("source") or get_settings().docs_source), force=bool(params.get("force")),
                allow_mass_delete=bool(params.get("allow_mass_delete")),
            )  # fmt: skip
        except ConfigError as exc:  # a refused source or mass deletion: retrying cannot help
            raise AirflowFailException(str(exc)) from exc
        data = report.to_dict()
        outlet_events[DOCUMENT_INDEX].extra = {k: v for k, v in data.items() if k != "failures"} | {
            "failures": data["failures"][:50]
        }
        return data

    sync()


ingest_documents()

"""check_staleness: after the document index changes, check each alias's champion against the new documents.

Runs on every event of the document index asset (dags/ingest_documents.py). The work is
components.evaluation.staleness.check_all, the same function `tandem staleness check` runs: the questions about
documents changed since the champion was trained are asked through the hybrid, adapter and base+RAG arms, and a
champion whose hybrid answers score below base+RAG is flagged (and rolled back with TANDEM_AUTO_ROLLBACK=true).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Asset, Param, dag, task

# The asset dags/ingest_documents.py updates (same name and URI: the same asset to the scheduler).
DOCUMENT_INDEX = Asset(name="document_index", uri="tandem://index/documents")


@dag(
    dag_id="check_staleness",
    schedule=DOCUMENT_INDEX,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=2)},
    params={"alias": Param(None, type=["null", "string"], description="only this alias (default: every champion)")},
    tags=["tandem", "evaluation"],
    doc_md=__doc__,
)
def check_staleness() -> None:
    @task
    def check(params: dict[str, Any] | None = None, dag_run: Any = None) -> list[dict[str, Any]]:
        """Every champion (or the `alias` Param's) against the documents as they are now; one row per check."""
        from components.db import migrate
        from components.evaluation.staleness import check_all
        from components.settings import get_settings

        migrate()
        run_type = getattr(dag_run, "run_type", None) or "manual"
        run_type = getattr(run_type, "value", run_type)  # DagRunType enum -> "asset_triggered", "manual", ...
        checks = check_all(get_settings(), (params or {}).get("alias"), trigger=f"dag:{run_type}")
        keep = ("alias", "adapter_version", "questions", "scores", "stale", "reason", "rolled_back_to", "check_id")
        return [{k: v for k, v in c.to_dict().items() if k in keep} for c in checks]

    check()


check_staleness()

"""DAG ingest_documents: parses with no errors and nothing heavy, runs end to end with dag.test()."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from components.settings import Settings

DAG_FILE = Path(__file__).resolve().parents[2] / "dags" / "ingest_documents.py"
HEAVY = ("torch", "transformers", "sentence_transformers", "vllm", "peft")


def test_dag_file_imports_nothing_heavy() -> None:
    code = (
        f"import runpy, sys; runpy.run_path({str(DAG_FILE)!r}); "
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert [line for line in out.stdout.splitlines() if line.startswith("HEAVY=")] == ["HEAVY="]


def test_dagbag_has_no_errors_and_wires_schedule_params_retries() -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}
    dag = bag.dags["ingest_documents"]
    assert "0 * * * *" in repr(dag.timetable)  # settings.ingest_schedule, default @hourly
    assert set(dag.params) == {"source", "force", "allow_mass_delete"}
    task = dag.get_task("sync")
    assert task.retries == 2
    assert [o.uri for o in task.outlets] == ["tandem://index/documents"]


@pytest.mark.slow
def test_dag_runs_end_to_end_and_updates_the_asset(
    airflow_db: None, ingest_db: Settings, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from components.settings import get_settings

    monkeypatch.setenv("TANDEM_DATABASE_URL", ingest_db.database_url)
    monkeypatch.setenv("TANDEM_INGEST_ALLOWED_ROOTS", str(corpus))
    get_settings.cache_clear()
    try:
        dag = DagBag(dag_folder=str(DAG_FILE)).dags["ingest_documents"]
        run: Any = dag.test(run_conf={"source": str(corpus), "force": False})
    finally:
        get_settings.cache_clear()
    assert str(getattr(run.state, "value", run.state)) == "success"
    with create_session() as session:
        events = session.scalars(
            select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.uri == "tandem://index/documents").order_by(AssetEvent.id)
        ).all()  # fmt: skip
        extra = events[-1].extra
    assert extra["added"] == 4 and extra["failed"] == 0 and extra["source"] == str(corpus)

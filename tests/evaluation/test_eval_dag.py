"""DAG evaluate_hybrid: parses cleanly without heavy imports, is scheduled on cron or promotion, and runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DAG_FILE = REPO / "dags" / "evaluate_hybrid.py"
HEAVY = ("torch", "transformers", "peft", "sentence_transformers", "vllm", "openai", "matplotlib")


def test_dag_file_imports_nothing_heavy() -> None:
    code = (
        f"import runpy, sys; runpy.run_path({str(DAG_FILE)!r}); "
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert [line for line in out.stdout.splitlines() if line.startswith("HEAVY=")] == ["HEAVY="]


def test_dagbag_is_clean_and_schedule_combines_cron_and_promotion() -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import AssetOrTimeSchedule

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}
    dag = bag.dags.get("evaluate_hybrid")
    assert dag is not None
    assert isinstance(dag.timetable, AssetOrTimeSchedule)
    # The exact asset the retraining DAG updates when it promotes a version (of any alias, named in the extra).
    assert dag.timetable.asset_condition.uri == "tandem://adapters/promoted"
    assert sorted(t.task_id for t in dag.tasks) == ["evaluate", "preflight", "resolve_aliases"]
    assert [o.uri for o in dag.get_task("evaluate").outlets] == ["tandem://adapters/evaluated"]


@pytest.mark.vllm
@pytest.mark.slow
def test_dag_runs_against_the_stack(airflow_db: None, eval_gateway: str, eval_adapter: int) -> None:
    from airflow.dag_processing.dagbag import DagBag

    from components.db import connect

    from .conftest import EVAL_ALIAS

    with connect() as conn:
        before = conn.execute("SELECT coalesce(max(id), 0) FROM evaluation_runs").fetchone()
    dag = DagBag(dag_folder=str(DAG_FILE)).dags["evaluate_hybrid"]
    run: Any = dag.test(run_conf={"alias": EVAL_ALIAS, "limit": 1})
    assert str(getattr(run.state, "value", run.state)) == "success"
    with connect() as conn:
        rows = conn.execute(
            "SELECT alias, adapter_version, questions, trigger FROM evaluation_runs WHERE id > %s", (before[0],)
        ).fetchall()
    assert rows == [(EVAL_ALIAS, eval_adapter, 1, "dag:manual")]

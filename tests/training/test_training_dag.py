"""The retrain_adapter DAG: parses cleanly without heavy imports, and a real `dag.test()` run trains a sweep."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from components import registry
from components.db import connect

from .conftest import FACTS, write_examples

REPO = Path(__file__).resolve().parents[2]
DAG_FILE = REPO / "dags" / "retrain_adapter.py"


def test_dagbag_is_clean_and_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(DAG_FILE)!r})\n"
        "assert not bag.import_errors, bag.import_errors\n"
        "dag = bag.dags['retrain_adapter']\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'vllm', 'sentence_transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(sorted(t.task_id for t in dag.tasks))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'resolve_aliases'" in out.stdout and "'check_new_data'" in out.stdout and "'train'" in out.stdout
    assert "'promote_or_reject'" in out.stdout and "'announce_promotion'" in out.stdout


@pytest.mark.slow
@pytest.mark.vllm
def test_dag_test_runs_a_sweep_and_gates_the_best(
    airflow_db: None, train_env: Path, pg_url: str, vllm_server: str
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    write_examples(train_env / "domain" / "sweep", FACTS)
    dag = DagBag(dag_folder=str(DAG_FILE)).dags["retrain_adapter"]
    run = dag.test(run_conf={"alias": "sweep", "force": True, "sweep_learning_rates": [1e-4, 3e-4], "max_steps": 1})
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "success", states
    assert states["check_new_data"] == "success" and states["pick_best"] == "success"
    trains = [ti for ti in run.get_task_instances() if ti.task_id == "train"]
    assert sorted(ti.map_index for ti in trains) == [0, 1] and all(ti.state == "success" for ti in trains)
    assert states["announce_promotion"] in ("success", "skipped")  # runs only when the gate promoted
    with connect() as conn:
        (version,) = registry.list_versions(conn, "sweep")
    sweep = version.hyperparameters["sweep"]
    assert [s["config"]["learning_rate"] for s in sweep] == [1e-4, 3e-4]
    best = min(sweep, key=lambda s: s["best_val_loss"])
    assert version.hyperparameters["learning_rate"] == best["config"]["learning_rate"]
    assert "gate" in version.metrics and version.status in ("champion", "rejected")
    assert (version.status == "champion") == (states["announce_promotion"] == "success")

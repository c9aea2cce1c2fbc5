"""`tandem up --only airflow`: Airflow standalone with the project's dags/, its metadata under the state dir, a
working admin login, both pipeline DAGs listed without import errors and with their Params, and a DAG run through
the scheduler seen by Prometheus with its dag_id (the airflow-exporter plugin in the API server)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

EXPECTED_PARAMS = {
    "ingest_documents": {"source", "force", "allow_mass_delete"},
    "retrain_adapter": {"alias", "data", "force"},
}


@pytest.fixture(scope="module")
def airflow(pg_url: str) -> Iterator[tuple[Any, httpx.Client]]:
    """Airflow standalone beside the session's Postgres (its tasks write the index there)."""
    from components.settings import get_settings
    from components.stack import manager

    get_settings.cache_clear()
    settings = get_settings()
    started = [s.name for s in manager.status(settings, ["airflow"]) if s.state == "down"]
    # Only the run a test triggers: unpausing a DAG must not also start its scheduled run (as in test_browser).
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE", "False")
        manager.up(settings, only=["airflow"])
    try:
        base = f"http://{settings.host}:{settings.airflow_port}"
        passwords = settings.airflow_home / "simple_auth_manager_passwords.json.generated"
        password = json.loads(passwords.read_text())["admin"]
        token = httpx.post(f"{base}/auth/token", json={"username": "admin", "password": password}, timeout=30)
        token.raise_for_status()
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            yield settings, client
    finally:
        manager.down(settings, only=started)


def _wait_for_dags(client: httpx.Client, wanted: set[str], timeout_s: float = 120.0) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + timeout_s
    dags: dict[str, Any] = {}
    while time.monotonic() < deadline:
        dags = {d["dag_id"]: d for d in client.get("/api/v2/dags").json()["dags"]}
        errors = client.get("/api/v2/importErrors").json()["import_errors"]
        assert not errors, [(e["filename"], e["stack_trace"].strip().splitlines()[-1]) for e in errors]
        if wanted <= set(dags):
            return dags
        time.sleep(3)
    raise AssertionError(f"DAGs {sorted(wanted - set(dags))} not parsed within {timeout_s:.0f} s")


def test_metadata_and_login_live_under_the_state_dir(airflow: tuple[Any, httpx.Client]) -> None:
    from components.stack.airflow import admin_login

    settings, client = airflow
    assert (settings.airflow_home / "airflow.db").exists()
    assert admin_login(settings).startswith("user admin, password ")
    health = client.get("/api/v2/monitor/health").json()
    assert health["metadatabase"]["status"] == "healthy"
    assert health["scheduler"]["status"] == "healthy"


def test_both_dags_are_listed_with_their_params(airflow: tuple[Any, httpx.Client]) -> None:
    _, client = airflow
    dags = _wait_for_dags(client, set(EXPECTED_PARAMS))
    for dag_id, params in EXPECTED_PARAMS.items():
        assert str(dags[dag_id]["fileloc"]).endswith(f"dags/{dag_id}.py")
        details = client.get(f"/api/v2/dags/{dag_id}/details").json()
        assert params <= set(details["params"]), f"{dag_id} params: {sorted(details['params'])}"


def _prometheus_value(url: str, query: str) -> float | None:
    result = httpx.get(f"{url}/api/v1/query", params={"query": query}, timeout=10).json()["data"]["result"]
    return max(float(r["value"][1]) for r in result) if result else None


def test_a_dag_run_through_the_scheduler_reaches_prometheus_with_its_dag_id(
    airflow: tuple[Any, httpx.Client],
) -> None:
    import time

    from components.stack import manager
    from tests.infra.test_dashboards import airflow_panel_queries

    settings, client = airflow
    dag_id = "ingest_documents"
    _wait_for_dags(client, {dag_id})
    client.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
    run = client.post(f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None})
    run.raise_for_status()
    run_id = run.json()["dag_run_id"]
    deadline = time.monotonic() + 300
    state = "queued"
    while state not in ("success", "failed") and time.monotonic() < deadline:
        time.sleep(3)
        state = client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json()["state"]
    assert state == "success", f"run {run_id} ended {state}"

    started = [s.name for s in manager.status(settings, ["prometheus"]) if s.state == "down"]
    manager.up(settings, only=["prometheus"])
    try:
        url = f"http://{settings.host}:{settings.prometheus_port}"
        runs = f'airflow_dag_status{{job="airflow", dag_id="{dag_id}", status="success"}}'
        tasks = f'airflow_task_status{{job="airflow", dag_id="{dag_id}", task_id="sync", status="success"}}'
        deadline = time.monotonic() + 60
        while _prometheus_value(url, runs) is None and time.monotonic() < deadline:
            time.sleep(2)
        assert (_prometheus_value(url, runs) or 0) >= 1, f"Prometheus has no {runs}"
        assert (_prometheus_value(url, tasks) or 0) >= 1, f"Prometheus has no {tasks}"
        # The pipelines dashboard's Airflow panels draw this run (the running-duration panel is empty between runs).
        empty = [
            f"{title}: {expr}"
            for title, expr in airflow_panel_queries()
            if title != "Running DAG runs: seconds since start" and _prometheus_value(url, expr) is None
        ]
        assert not empty, "\n".join(empty)
    finally:
        manager.down(settings, only=started)

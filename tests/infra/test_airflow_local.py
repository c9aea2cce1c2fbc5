"""`tandem up --only airflow`: Airflow standalone with the project's dags/, its metadata under the state dir, a
working admin login, and both pipeline DAGs listed without import errors and with their Params."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

EXPECTED_PARAMS = {
    "ingest_documents": {"source", "force"},
    "retrain_adapter": {"alias", "data", "force"},
}


@pytest.fixture(scope="module")
def airflow() -> Iterator[tuple[Any, httpx.Client]]:
    from components.settings import get_settings
    from components.stack import manager

    get_settings.cache_clear()
    settings = get_settings()
    started = [s.name for s in manager.status(settings, ["airflow"]) if s.state == "down"]
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

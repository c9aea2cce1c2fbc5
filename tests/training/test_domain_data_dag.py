"""The domain_data DAGs: they parse without heavy imports; the intake DAG imports each alias's landing files and
announces the alias in the asset event's extra; the review DAG waits for a person in Airflow's human-in-the-loop
tasks, answered here through Airflow's REST API (`PATCH .../taskInstances/review/{map_index}/hitlDetails` on a real
API server sharing the metadata database with `dag.test()`), and only what was approved reaches the snapshot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from components.db import connect
from components.settings import Settings, get_settings
from components.training import intake
from tests.conftest import free_port

from .conftest import FACTS, chat_line

REPO = Path(__file__).resolve().parents[2]
DAG_FILE = REPO / "dags" / "domain_data.py"
DOMAIN_DATA_URI = "tandem://data/domain"


@pytest.fixture
def env(pg_url: str, airflow_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    monkeypatch.setenv("TANDEM_ALIASES", "dag-landed,dag-reviewed")
    monkeypatch.setenv("TANDEM_DOMAIN_DATA_URL", str(tmp_path / "landing"))
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


def _dags() -> dict[str, Any]:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert not bag.import_errors, bag.import_errors
    return bag.dags


def _events(run_id: str) -> list[dict[str, Any]]:
    """The domain-data asset events a run emitted, as Airflow recorded them."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(AssetEvent)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .where(AssetModel.uri == DOMAIN_DATA_URI, AssetEvent.source_run_id == run_id)
        ).all()
        return [dict(r.extra) for r in rows]


def test_both_dags_parse_and_import_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(DAG_FILE)!r})\n"
        "assert not bag.import_errors, bag.import_errors\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'vllm', 'sentence_transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(sorted((d.dag_id, t.task_id) for d in bag.dags.values() for t in d.tasks))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "('domain_data_intake', 'import_landing')" in out.stdout
    assert "('review_domain_data', 'review')" in out.stdout and "('review_domain_data', 'announce')" in out.stdout


@pytest.mark.slow
def test_intake_dag_imports_the_landing_files_once_and_announces_the_alias(env: Settings, tmp_path: Path) -> None:
    folder = tmp_path / "landing" / "dag-landed"
    folder.mkdir(parents=True)
    (folder / "new.jsonl").write_text("".join(chat_line(q, a) + "\n" for q, a in FACTS[:3]))
    dag = _dags()["domain_data_intake"]

    run = dag.test()
    tis = {(ti.task_id, ti.rendered_map_index or ti.map_index): ti.state for ti in run.get_task_instances()}
    assert run.state == "success", tis
    assert tis[("import_landing", "dag-landed")] == "success"
    assert tis[("import_landing", env.default_alias)] == "skipped"  # no files there: no event
    assert _events(run.run_id) == [{"alias": "dag-landed", "source": "landing", "approved": 3}]
    with connect() as conn:
        assert [r.status for r in intake.list_examples(conn, "dag-landed")] == ["approved"] * 3

    again = dag.test()  # the file is remembered by its content: nothing new, no event
    states = {ti.rendered_map_index or ti.map_index: ti.state for ti in again.get_task_instances()}
    assert states["dag-landed"] == "skipped" and _events(again.run_id) == []


@pytest.fixture
def api_server(env: Settings) -> Iterator[httpx.Client]:
    """Airflow's API server on the session's metadata database, with a reviewer user (simple auth manager)."""
    port = free_port()
    home = Path(os.environ["AIRFLOW_HOME"])
    log = open(home / "api-server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow", "api-server", "-H", "127.0.0.1", "-p", str(port), "-w", "1"],
        env={
            **os.environ,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "reviewer:admin",
            "AIRFLOW__API__PORT": str(port),
        },
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (home / "api-server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/api/v2/monitor/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the API server did not answer within 180 s"
            time.sleep(2)
        password = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())["reviewer"]
        token = httpx.post(f"{base}/auth/token", json={"username": "reviewer", "password": password}, timeout=30)
        token.raise_for_status()
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            yield client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _answer(client: httpx.Client, decide: dict[int, str], errors: list[str]) -> None:
    """A person at the Required Actions page, through the REST API: answer each review task of the run as it
    appears; on any failure the run is failed so `dag.test()` stops waiting."""
    run_id = None
    try:
        deadline = time.monotonic() + 240
        answered: set[int] = set()
        while len(answered) < len(decide):
            assert time.monotonic() < deadline, f"only {len(answered)} of {len(decide)} review tasks answered"
            time.sleep(1)
            found = client.get("/api/v2/dags/review_domain_data/dagRuns/~/hitlDetails")
            found.raise_for_status()
            for detail in found.json()["hitl_details"]:
                ti = detail["task_instance"]
                run_id = ti["dag_run_id"]
                example_id = int(detail["subject"].split("#", 1)[1].split(":", 1)[0])
                if detail["response_received"] or example_id in answered:
                    continue
                assert detail["options"] == ["Approve", "Reject"] and "**Question:**" in detail["body"]
                path = f"/api/v2/dags/review_domain_data/dagRuns/{run_id}/taskInstances/review/{ti['map_index']}"
                body = {"chosen_options": [decide[example_id]], "params_input": {"note": "checked by hand"}}
                client.patch(f"{path}/hitlDetails", json=body).raise_for_status()
                answered.add(example_id)
    except Exception as exc:  # reported by the test, after the run is stopped
        errors.append(f"{type(exc).__name__}: {exc}")
        if run_id is not None:
            client.patch(f"/api/v2/dags/review_domain_data/dagRuns/{run_id}", json={"state": "failed"})


@pytest.mark.slow
def test_review_dag_waits_for_a_person_and_only_approved_examples_reach_the_snapshot(
    env: Settings, api_server: httpx.Client
) -> None:
    context = {
        "question": FACTS[0][0],
        "answer_given": "It is 12 knots [1].",
        "correction": FACTS[0][1],
        "sources": [{"n": 1, "path": "rules/speed.md", "heading": "Quays", "chunk_id": 7}],
        "rating": -1,
        "alias": "dag-reviewed",
        "version": 1,
    }
    good = intake.Line("feedback", (("user", FACTS[0][0]), ("assistant", FACTS[0][1])), None, False)
    bad = intake.Line("feedback", (("user", FACTS[1][0]), ("assistant", "Nobody issues them.")), None, False)
    with connect() as conn:
        (good_id,), _ = intake.store(
            conn, "dag-reviewed", [good], "feedback:r1", submitted_by="key:app", context=context
        )
        (bad_id,), _ = intake.store(conn, "dag-reviewed", [bad], "feedback:r2", submitted_by="key:app", context=context)
        conn.commit()

    errors: list[str] = []
    responder = threading.Thread(
        target=_answer, args=(api_server, {good_id: "Approve", bad_id: "Reject"}, errors), daemon=True
    )
    responder.start()
    run = _dags()["review_domain_data"].test(run_conf={"alias": "dag-reviewed"})
    responder.join(timeout=30)
    assert not errors, errors
    states = {(ti.task_id, ti.map_index): ti.state for ti in run.get_task_instances()}
    assert run.state == "success", states
    assert states[("review", 0)] == states[("review", 1)] == "success"

    with connect() as conn:
        rows = {r.id: r for r in intake.list_examples(conn, "dag-reviewed")}
        snap = intake.snapshot(conn, "dag-reviewed")
    assert rows[good_id].status == "approved" and rows[bad_id].status == "rejected"
    assert rows[good_id].reviewed_by == rows[bad_id].reviewed_by == "airflow:reviewer"
    assert rows[bad_id].review_note == "checked by hand"
    assert snap.example_ids == [good_id]
    assert _events(run.run_id) == [{"alias": "dag-reviewed", "source": "review", "approved": 1}]

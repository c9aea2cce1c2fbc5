"""New data to a new adapter in the real Airflow scheduler: `tandem data add --approve` for alias A posts the
domain-data asset event -> retrain_adapter starts by it (no manual trigger), trains A, the gate decides, A is
promoted -> evaluate_hybrid starts by the promoted asset and stores an evaluation of A. Alias B, added while A's
run is under way, gets its own runs and leaves A's champion as it was.

Real Airflow standalone (scheduler, dag-processor, API server), real vLLM, real Postgres, the gateway as a
process on the session's port (the scheduler's tasks run in other processes). Tiny training: 2 steps at a
learning rate so small that the candidate answers as the base model does, so the gate sees a tie and promotes
(a tie promotes: components/training/gate.py) and the chain always reaches the evaluation.

With TANDEM_BENCH_INTAKE_CHAIN_OUT set, the timings of both chains (event, scheduler wait, training, gate,
promotion, first answer of the new adapter through the gateway) are written there as JSON; they are measured
here, never asserted (docs/training.md "New data to a new adapter").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(1500)]

ALIAS_A, ALIAS_B = "chain-a", "chain-b"
DAGS = ("retrain_adapter", "evaluate_hybrid")
# Facts of two made-up domains, one per alias; none is in any index (trained as written).
FACTS = {
    ALIAS_A: [(f"What is the code of depot {n}?", f"The code of depot {n} is D-{n * 7}.") for n in range(1, 11)],
    ALIAS_B: [(f"Who runs workshop {n}?", f"Workshop {n} is run by team {chr(64 + n)}.") for n in range(1, 11)],
}


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chain_env(tmp_path_factory: pytest.TempPathFactory, base_model_dir: str) -> Iterator[Path]:
    """Settings for tiny trainings and short evaluations, in the environment the Airflow processes inherit."""
    root = tmp_path_factory.mktemp("chain")
    docs = root / "docs"
    docs.mkdir()
    (docs / "depots.md").write_text("# Depots\n\n" + "\n".join(a for _, a in FACTS[ALIAS_A]) + "\n")
    qa = [{"id": f"q{i}", "question": q, "answer": a.split(" is ")[-1].rstrip("."), "source": "depots.md"}
          for i, (q, a) in enumerate(FACTS[ALIAS_A][:3])]  # fmt: skip
    general = [{"id": f"g{i}", "question": f"What is the capital of {c}?", "answer": a}
               for i, (c, a) in enumerate([("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome")])]  # fmt: skip
    env = {
        "TANDEM_QA_SET": str(_jsonl(root / "qa.jsonl", qa)),
        "TANDEM_GATE_QA_SET": str(
            _jsonl(root / "gate.jsonl", [{**r, "question": f"Please answer: {r['question']}"} for r in qa])
        ),
        "TANDEM_GENERAL_SET": str(_jsonl(root / "general.jsonl", general)),
        "TANDEM_ALIASES": f"{ALIAS_A},{ALIAS_B}",
        "TANDEM_TRAIN_MAX_STEPS": "2",
        "TANDEM_TRAIN_BATCH_SIZE": "4",
        "TANDEM_TRAIN_MAX_SEQ_LEN": "256",
        "TANDEM_TRAIN_LEARNING_RATE": "1e-7",
        "TANDEM_LORA_R": "8",
        "TANDEM_LORA_ALPHA": "16",
        "TANDEM_MIN_NEW_EXAMPLES": "4",
        "TANDEM_GATE_MAX_QUESTIONS": "3",
        "TANDEM_GATE_MAX_TOKENS": "16",
        "TANDEM_EVAL_MAX_TOKENS": "16",
        "TANDEM_ADAPTER_STORE": f"file://{root / 'store'}",
        "TANDEM_TRAIN_WITH_SOURCES": "false",
        "TANDEM_DOMAIN_DATA_ROOT": str(root / "domain"),
        # only the asset events start runs: no cron run on unpausing
        "TANDEM_RETRAIN_SCHEDULE": "",
        "TANDEM_EVAL_SCHEDULE": "",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        from components.settings import get_settings

        get_settings.cache_clear()
        yield root
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def stack(chain_env: Path, pg_url: str, vllm_server: str) -> Iterator[tuple[Any, httpx.Client]]:
    """The gateway and Airflow standalone (started here unless already up), and a client for Airflow's API."""
    from components import airflow_api
    from components.ingest.sync import sync_documents
    from components.settings import get_settings
    from components.stack import manager

    settings = get_settings()
    docs = str(chain_env / "docs")  # the QA set's source, so the evaluation's retrieval arms have an index
    sync_documents(docs, settings=settings.model_copy(update={"ingest_allowed_roots": [docs]}))
    started = [s.name for s in manager.status(settings, ["gateway", "airflow"]) if s.state == "down"]
    manager.up(settings, only=["gateway", "airflow"])
    try:
        with airflow_api.client(settings) as client:
            yield settings, client
    finally:
        manager.down(settings, only=started)


def _wait(what: str, probe: Any, timeout_s: float, every_s: float = 1.0) -> Any:
    """probe() until it returns something truthy; fails naming ``what`` after timeout_s (waiting, not timing)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(every_s)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s")


def _asset_events(api: httpx.Client, asset: int) -> list[dict[str, Any]]:
    """The asset's events, newest first.

    Airflow 3.3.2 answers 500 here while a run that one of the events created is queued and has no start date
    yet (apache/airflow#71360, fixed after 3.3.2): wait for that run to start; any other failure fails the test.
    """

    def probe() -> tuple[list[dict[str, Any]]] | None:
        resp = api.get("/api/v2/assets/events", params={"asset_id": asset, "order_by": "-timestamp"})
        if resp.status_code == 500:
            return None
        resp.raise_for_status()
        return (resp.json()["asset_events"],)

    (events,) = _wait(
        f"the events of asset {asset} (Airflow answers 500 while a run they created is queued)", probe, 120
    )
    return events


def _runs(api: httpx.Client, dag_id: str) -> list[dict[str, Any]]:
    resp = api.get(f"/api/v2/dags/{dag_id}/dagRuns", params={"order_by": "run_after", "limit": 100})
    resp.raise_for_status()
    runs: list[dict[str, Any]] = resp.json()["dag_runs"]
    return runs


def _new_run(api: httpx.Client, dag_id: str, seen: set[str], timeout_s: float) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        return next((r for r in _runs(api, dag_id) if r["dag_run_id"] not in seen), None)

    run: dict[str, Any] = _wait(f"a new run of {dag_id}", probe, timeout_s)
    return run


def _finished(api: httpx.Client, dag_id: str, run_id: str, timeout_s: float) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        run = api.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json()
        return run if run["state"] in ("success", "failed") else None

    run: dict[str, Any] = _wait(f"{dag_id} run {run_id} to finish", probe, timeout_s, every_s=2.0)
    if run["state"] != "success":
        tis = api.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
        states = {f"{t['task_id']}[{t['map_index']}]": t["state"] for t in tis}
        raise AssertionError(f"{dag_id} run {run_id} ended {run['state']}: {states}")
    return run


def _consumed_aliases(api: httpx.Client, dag_id: str, run_id: str) -> list[str]:
    events = api.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/upstreamAssetEvents").json()["asset_events"]
    return [e["extra"].get("alias") for e in events]


def _task_times(api: httpx.Client, dag_id: str, run_id: str) -> dict[str, tuple[datetime, datetime]]:
    """Per task, the first start and the last end over its mapped instances."""
    tis = api.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
    out: dict[str, tuple[datetime, datetime]] = {}
    for ti in tis:
        if not ti["start_date"] or not ti["end_date"]:
            continue
        start, end = _ts(ti["start_date"]), _ts(ti["end_date"])
        if ti["task_id"] in out:
            start, end = min(start, out[ti["task_id"]][0]), max(end, out[ti["task_id"]][1])
        out[ti["task_id"]] = (start, end)
    return out


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _add_data(alias: str, folder: Path) -> tuple[dict[str, Any], datetime]:
    """`tandem data add --approve` of the alias's examples; returns its JSON report and when it was started."""
    path = folder / f"{alias}.jsonl"
    _jsonl(path, [{"question": q, "answer": a} for q, a in FACTS[alias]])
    started = datetime.now(UTC)
    cmd = [sys.executable, "-m", "components.cli", "data", "add", "--alias", alias, "--approve", "--json", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, check=False, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-1500:]
    report: dict[str, Any] = json.loads(out.stdout)
    return report, started


def _answers_with(settings: Any, alias: str, version: int) -> datetime:
    """Ask the gateway with the alias until the answer comes from ``version``; when it first did."""
    from openai import OpenAI

    from components.keys import client_secret

    llm = OpenAI(base_url=settings.gateway_url + "/v1", api_key=client_secret(settings), max_retries=0)

    def probe() -> datetime | None:
        resp = llm.chat.completions.create(
            model=alias, messages=[{"role": "user", "content": "Hello?"}], max_tokens=4, extra_body={"rag": False}
        )
        info = (resp.model_extra or {}).get("tandem", {})
        return datetime.now(UTC) if info.get("adapter_version") == version and not info.get("fallback") else None

    answered: datetime = _wait(f"the gateway answering with {alias} v{version}", probe, 120, every_s=0.5)
    return answered


def _split(
    api: httpx.Client, added: datetime, event: dict[str, Any], run: dict[str, Any], answered: datetime
) -> dict[str, float]:
    """The chain's timings in seconds: from `tandem data add` to the new adapter answering, and its parts."""
    tasks = _task_times(api, "retrain_adapter", run["dag_run_id"])
    ev, start = _ts(event["timestamp"]), _ts(run["start_date"])
    secs = {
        "add_to_event": ev - added,
        "scheduler_wait": start - ev,  # event -> run start
        "checks": tasks["plan_sweep"][1] - start,  # resolve_aliases, check_new_data, plan_sweep
        "training": tasks["train"][1] - tasks["train"][0],
        "register": tasks["pick_best"][1] - tasks["pick_best"][0],
        "gate": tasks["evaluate_gate"][1] - tasks["evaluate_gate"][0],
        "promotion": tasks["promote_or_reject"][1] - tasks["promote_or_reject"][0],
        "promoted_to_answer": answered - tasks["promote_or_reject"][1],
        "total_add_to_answer": answered - added,
    }
    return {k: round(v.total_seconds(), 1) for k, v in secs.items()}


def test_new_data_retrains_promotes_and_evaluates_its_alias_in_the_scheduler(
    stack: tuple[Any, httpx.Client], chain_env: Path
) -> None:
    from components import registry
    from components.airflow_api import DOMAIN_DATA_URI, PROMOTED_URI, asset_id
    from components.db import connect

    settings, api = stack
    _wait("both DAGs parsed", lambda: set(DAGS) <= {d["dag_id"] for d in api.get("/api/v2/dags").json()["dags"]}, 180)
    errors = api.get("/api/v2/importErrors").json()["import_errors"]
    assert not [e for e in errors if Path(e["filename"]).stem in DAGS], errors
    for dag_id in DAGS:
        api.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
    seen = {r["dag_run_id"] for dag_id in DAGS for r in _runs(api, dag_id)}
    data_asset = asset_id(api, DOMAIN_DATA_URI)

    def last_event() -> dict[str, Any]:
        return _asset_events(api, data_asset)[0]

    # A: the examples go in approved and the CLI announces them; the scheduler starts A's run from that event.
    report_a, added_a = _add_data(ALIAS_A, chain_env)
    assert report_a["added"] == len(FACTS[ALIAS_A]) and report_a["announced"], report_a["warning"]
    event_a = last_event()
    assert event_a["extra"]["alias"] == ALIAS_A
    run_a = _new_run(api, "retrain_adapter", seen, 300)
    assert run_a["run_type"] == "asset_triggered"  # nobody triggered it by hand
    seen.add(run_a["dag_run_id"])

    # B arrives while A's run is under way: its event waits for a run of its own (max_active_runs=1).
    report_b, added_b = _add_data(ALIAS_B, chain_env)
    assert report_b["announced"], report_b["warning"]
    event_b = last_event()
    assert event_b["extra"]["alias"] == ALIAS_B

    run_a = _finished(api, "retrain_adapter", run_a["dag_run_id"], 600)
    assert _consumed_aliases(api, "retrain_adapter", run_a["dag_run_id"]) == [ALIAS_A]
    with connect() as conn:
        (version_a,) = registry.list_versions(conn, ALIAS_A)
        champion_a = registry.get_champion(conn, ALIAS_A)
    assert "gate" in version_a.metrics  # the gate decided, and on a tie promoted
    assert champion_a is not None and champion_a.version == version_a.version
    answered_a = _answers_with(settings, ALIAS_A, version_a.version)

    # The promotion's event names A and its version; evaluate_hybrid runs on it and evaluates A.
    promoted = _asset_events(api, asset_id(api, PROMOTED_URI))
    assert [(e["extra"]["alias"], e["extra"]["version"]) for e in promoted][:1] == [(ALIAS_A, version_a.version)]
    eval_a = _new_run(api, "evaluate_hybrid", seen, 300)
    seen.add(eval_a["dag_run_id"])
    assert eval_a["run_type"] == "asset_triggered"

    # B's own run: trains, gates and promotes B only.
    run_b = _new_run(api, "retrain_adapter", seen, 600)
    seen.add(run_b["dag_run_id"])
    assert run_b["run_type"] == "asset_triggered"
    run_b = _finished(api, "retrain_adapter", run_b["dag_run_id"], 600)
    assert _consumed_aliases(api, "retrain_adapter", run_b["dag_run_id"]) == [ALIAS_B]
    with connect() as conn:
        (version_b,) = registry.list_versions(conn, ALIAS_B)
        champion_b = registry.get_champion(conn, ALIAS_B)
    assert champion_b is not None and champion_b.version == version_b.version
    answered_b = _answers_with(settings, ALIAS_B, version_b.version)
    out = os.environ.get("TANDEM_BENCH_INTAKE_CHAIN_OUT")
    if out:
        result = {
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "what": "tandem data add --approve -> asset event -> retrain_adapter in the scheduler -> gate -> "
            "promotion -> first answer of the new adapter through the gateway (2 training steps, 3 gate questions)",
            ALIAS_A: _split(api, added_a, event_a, run_a, answered_a),
            f"{ALIAS_B} (queued behind {ALIAS_A}'s run)": _split(api, added_b, event_b, run_b, answered_b),
        }
        Path(out).write_text(json.dumps(result, indent=2) + "\n")

    _finished(api, "evaluate_hybrid", eval_a["dag_run_id"], 600)
    assert _consumed_aliases(api, "evaluate_hybrid", eval_a["dag_run_id"]) == [ALIAS_A]
    eval_b = _new_run(api, "evaluate_hybrid", seen, 300)
    _finished(api, "evaluate_hybrid", eval_b["dag_run_id"], 600)
    assert _consumed_aliases(api, "evaluate_hybrid", eval_b["dag_run_id"]) == [ALIAS_B]

    with connect() as conn:
        rows = conn.execute(
            "SELECT alias, adapter_version, trigger FROM evaluation_runs WHERE alias = ANY(%s) ORDER BY id",
            ([ALIAS_A, ALIAS_B],),
        ).fetchall()
        after_a = registry.list_versions(conn, ALIAS_A)
        champion_after = registry.get_champion(conn, ALIAS_A)
    assert rows == [
        (ALIAS_A, version_a.version, "dag:asset_triggered"),
        (ALIAS_B, version_b.version, "dag:asset_triggered"),
    ]
    # B's chain left A alone: no new version of A, the same champion, promoted at the same moment.
    assert [v.version for v in after_a] == [version_a.version]
    assert champion_after is not None and champion_after.version == champion_a.version
    assert champion_after.promoted_at == champion_a.promoted_at

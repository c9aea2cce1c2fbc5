"""A person's path through the local stack, in headless Chromium (Debian's), on one stack started once for the
module (gateway, Airflow standalone, Prometheus, Alertmanager, the exporters):

- sign into the Airflow UI, trigger ingest_documents with a Param, see the run succeed; then ask the playground a
  question and see cited sources;
- the dashboards page: after chat, retrieval and one ingest DAG run through Airflow's scheduler, every panel of
  every board that should have data draws a non-empty series from the live Prometheus through the gateway, none
  shows an error, and the page reads with the same key as the playground (#key=... in the URL, kept in
  localStorage); without it nothing is shown. A broken dashboards file and a panel type the page does not draw
  show their error in place while the rest draws.

Screenshots of every step are kept in artifacts/e2e/ (ignored by git); the gateway board's also in bench/results/
for the README. One module, not two: each stack start costs an Airflow standalone start on 2 cores.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.routers.dashboards import load_boards
from tests.traffic import one_round

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "artifacts" / "e2e"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS = ["procedures/berth-booking.md", "faq/berth-booking-faq.md"]
QUESTION = "How do I book a berth?"

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def stack(vllm_server: str, pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Gateway, Airflow standalone (the project's dags/), Prometheus, Alertmanager and the exporters beside the
    session's vLLM and Postgres; stopped again at the module's end (only what this fixture started)."""
    from components.settings import get_settings
    from components.stack import manager

    get_settings.cache_clear()
    settings = get_settings()
    wanted = ["gateway", "gpu-exporter", "airflow", "alertmanager", "postgres-exporter", "prometheus"]
    started = [s.name for s in manager.status(settings, wanted) if s.state == "down"]
    # Only the runs these tests trigger: unpausing a DAG must not also start its scheduled run of the whole corpus
    # (max_active_runs=1 would queue ours behind it).
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE", "False")
        # the Param names a folder of this test's; ingestion refuses anything outside its allowed roots
        env.setenv("TANDEM_INGEST_ALLOWED_ROOTS", f"{REPO_ROOT / 'data'},{tmp_path_factory.getbasetemp()}")
        manager.up(settings, only=wanted)
    try:
        yield settings
    finally:
        manager.down(settings, only=started)


@pytest.fixture
def docs_folder(tmp_path: Path) -> Path:
    """A small source for the Param: two of the sample documents."""
    for rel in DOCS:
        target = tmp_path / "docs" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / "data" / "sample" / "docs" / rel, target)
    return tmp_path / "docs"


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run `make system`")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p, tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 900},
        )
        context.set_default_timeout(30_000)
        try:
            yield context.new_page()
        finally:
            context.close()


def _airflow_password(settings: Any) -> str:
    path = settings.airflow_home / "simple_auth_manager_passwords.json.generated"
    return str(json.loads(path.read_text())["admin"])


def _auth(base: str, password: str) -> dict[str, str]:
    token = httpx.post(f"{base}/auth/token", json={"username": "admin", "password": password}, timeout=10)
    return {"Authorization": f"Bearer {token.json()['access_token']}"}


def _task_logs(base: str, password: str, run_id: str) -> str:
    """Every try's log of the run's `sync` task, so a failed run says why in the test report."""
    headers = _auth(base, password)
    url = f"{base}/api/v2/dags/ingest_documents/dagRuns/{run_id}/taskInstances/sync"
    try:
        tries = int(httpx.get(url, headers=headers, timeout=10).json().get("try_number") or 1)
        parts = []
        for number in range(1, tries + 1):
            log = httpx.get(f"{url}/logs/{number}", headers=headers, params={"full_content": True}, timeout=30)
            parts.append(f"--- try {number} ---\n{log.text[-3000:]}")
        return "\n".join(parts)
    except (httpx.HTTPError, ValueError) as exc:
        return f"(task logs unavailable: {exc})"


def _wait_for_run(base: str, password: str, source: str, timeout_s: float = 600.0) -> dict[str, Any]:
    """The ingest_documents run triggered with our source Param, once it has finished (REST API, JWT auth)."""
    headers = _auth(base, password)
    deadline = time.monotonic() + timeout_s
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            runs = httpx.get(
                f"{base}/api/v2/dags/ingest_documents/dagRuns",
                params={"order_by": "-start_date", "limit": 20},
                headers=headers,
                timeout=30,
            ).json()["dag_runs"]
        except httpx.TimeoutException:  # the API server shares 2 cores with the running task: ask again
            time.sleep(3)
            continue
        run = next((r for r in runs if (r.get("conf") or {}).get("source") == source), {})
        if run.get("state") in ("success", "failed"):
            return run
        time.sleep(3)
    raise AssertionError(f"ingest_documents run with source={source} did not finish in {timeout_s:.0f} s: {run}")


def test_trigger_ingest_in_airflow_then_ask_the_playground(stack: Any, docs_folder: Path, browser: Any) -> None:
    settings = stack
    page = browser
    airflow = f"http://{settings.host}:{settings.airflow_port}"
    password = _airflow_password(settings)

    # 1. Sign in.
    page.goto(airflow + "/")
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(password)
    page.screenshot(path=ARTIFACTS / "01-airflow-login.png")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth/login" not in url)

    # 2. The DAG's page; its Trigger form with the Params (source, force).
    page.goto(f"{airflow}/dags/ingest_documents")
    page.get_by_text("ingest_documents").first.wait_for()
    page.get_by_role("button", name="Trigger").first.click()
    source = page.locator("#element_source")
    source.wait_for()
    source.fill(str(docs_folder))
    page.screenshot(path=ARTIFACTS / "02-airflow-trigger-form.png", full_page=True)
    page.get_by_role("dialog").get_by_role("button", name="Trigger").last.click()

    # 3. The run finishes; the UI shows it.
    run = _wait_for_run(airflow, password, str(docs_folder))
    page.goto(f"{airflow}/dags/ingest_documents/runs/{run['dag_run_id']}")
    page.get_by_text(run["dag_run_id"]).first.wait_for()
    page.screenshot(path=ARTIFACTS / "03-airflow-run.png", full_page=True)
    if run["state"] != "success":
        logs = _task_logs(airflow, password, run["dag_run_id"])
        pytest.fail(f"ingest run {run['dag_run_id']} {run['state']}:\n{logs}")
    assert run["conf"]["source"] == str(docs_folder)

    # 4. The playground, opened with the client key in the fragment as `tandem up` prints it: the key moves to
    # localStorage and leaves the address bar. Pick a model, ask, get an answer with citations.
    from components.keys import client_secret

    key = client_secret(settings)
    assert key
    page.goto(settings.gateway_url + "/#key=" + key)
    page.locator("#model option").first.wait_for(state="attached")
    assert "key=" not in page.url
    assert page.evaluate("localStorage.getItem('tandem-api-key')") == key
    page.locator("#model option").first.wait_for(state="attached")
    models = page.locator("#model option").evaluate_all("els => els.map(e => e.value)")
    assert settings.served_model_name in models
    page.fill("#question", QUESTION)
    page.fill("#max-tokens", "24")
    page.click("#send")
    page.locator("#result").wait_for(state="visible", timeout=120_000)
    page.screenshot(path=ARTIFACTS / "04-playground-answer.png", full_page=True)
    assert page.inner_text("#answer").strip()
    citations = page.locator("#citations li").all_inner_texts()
    assert any("berth-booking" in c for c in citations), citations
    assert "retrieval on" in page.inner_text("#served")


README_SCREENSHOT = REPO_ROOT / "bench" / "results" / "dashboards-gateway.png"
_NO_GPU = "no GPU on a CPU host: the exporter reports 0 devices, so there is no per-GPU series"
_NO_TRAINING = "no adapter is trained, promoted or evaluated in this test (a fresh state dir)"
_NO_ERRORS = "the traffic has no errors, rejections or fallbacks, so the counter has no series"
# Panels that may stay empty after the traffic below, and why; every other panel must draw a non-empty series.
MAY_STAY_EMPTY: dict[str, dict[str, str]] = {
    "tandem-gateway": {
        "Error ratio (5xx) of /v1 requests": _NO_ERRORS,
        "Rejected requests by reason": _NO_ERRORS,
        "Upstream (vLLM) errors by replica and kind": _NO_ERRORS,
        "Fallback requests (alias answered by the base model)": _NO_ERRORS,
        "Champion version served": _NO_TRAINING,
        "Aliases on the base model (fallback)": _NO_TRAINING,
        "Adapter loads, unloads and failures": _NO_TRAINING,
        "Promotion time (p95) and promotions": _NO_TRAINING,
    },
    "tandem-vllm": {},
    "tandem-gpu": {
        "GPUs reporting": _NO_GPU,
        "Max memory used": _NO_GPU,
        "Max temperature": _NO_GPU,
        "Utilisation": _NO_GPU,
        "Memory used (share)": _NO_GPU,
        "Memory used and free": _NO_GPU,
        "Temperature": _NO_GPU,
        "Power": _NO_GPU,
    },
    "tandem-pipelines": {
        "Adapter versions by alias and status": _NO_TRAINING,
        "Champion version (registry)": _NO_TRAINING,
        "Champion version (served by the gateway)": _NO_TRAINING,
        "Adapter scores (newest versions)": _NO_TRAINING,
        "Rejected and failed retrainings (hours since)": _NO_TRAINING,
        "Accuracy per arm (latest evaluation run)": _NO_TRAINING,
        "Hybrid margin over base+RAG (champion)": _NO_TRAINING,
        "Latest evaluation run (age)": _NO_TRAINING,
        "Running DAG runs: seconds since start": "the DAG run has finished before the page is opened",
    },
}
DAG_ID = "ingest_documents"


def test_a_broken_file_is_reported_and_the_others_load(tmp_path: Path) -> None:
    shutil.copy(REPO_ROOT / "infra" / "grafana" / "dashboards" / "tandem-gpu.json", tmp_path / "good.json")
    (tmp_path / "broken.json").write_text('{"panels": [')
    (tmp_path / "shapeless.json").write_text("[]")
    entries = {e["file"]: e for e in load_boards(tmp_path)}
    assert entries["good.json"]["board"]["uid"] == "tandem-gpu"
    assert entries["broken.json"]["error"].startswith("broken.json cannot be drawn:")
    assert "expected an object with a 'panels' list" in entries["shapeless.json"]["error"]


def _run_ingest_dag(settings: Any) -> None:
    """One ingest_documents run through Airflow's scheduler (REST API), the sample corpus as its source."""
    base = f"http://{settings.host}:{settings.airflow_port}"
    password = json.loads((settings.airflow_home / "simple_auth_manager_passwords.json.generated").read_text())
    token = httpx.post(f"{base}/auth/token", json={"username": "admin", "password": password["admin"]}, timeout=30)
    token.raise_for_status()
    headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        deadline = time.monotonic() + 180
        while client.get(f"/api/v2/dags/{DAG_ID}").status_code == 404 and time.monotonic() < deadline:
            time.sleep(3)
        client.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False}).raise_for_status()
        run = client.post(f"/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None})
        run.raise_for_status()
        run_id, state = run.json()["dag_run_id"], "queued"
        deadline = time.monotonic() + 600
        while state not in ("success", "failed") and time.monotonic() < deadline:
            time.sleep(3)
            state = client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}").json()["state"]
    assert state == "success", f"{DAG_ID} run {run_id} ended {state}"


@pytest.fixture(scope="module")
def traffic(stack: Any) -> Any:
    """What the dashboards draw: one ingest DAG run through the scheduler, chat (plain and streamed) and retrieval,
    in two rounds with a scrape between them so rate() has two points."""
    from components.keys import client_secret

    settings = stack
    _run_ingest_dag(settings)
    key = client_secret(settings)
    assert key, "the local stack has no client key"
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=settings.gateway_url, headers=auth, timeout=120.0) as client:
        ask = {
            "model": settings.served_model_name,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "How do I book a berth?"}],
        }
        for _ in range(2):
            one_round(client, ask, "berth booking")
            time.sleep(6)  # a scrape between the two rounds, so rate() has two points
    time.sleep(12)  # the next scrapes, before the page reads them
    return settings


def _states(page: Any, timeout_s: float = 90.0) -> dict[str, dict[str, str]]:
    """{title: {state, problem}} of every panel on screen, once none is loading."""
    deadline = time.monotonic() + timeout_s
    while True:
        panels = page.locator(".panel").evaluate_all(
            "els => els.map(e => ({title: e.dataset.title, state: e.dataset.state,"
            " problem: e.querySelector('.problem').textContent}))"
        )
        if panels and all(p["state"] != "loading" for p in panels):
            return {p["title"]: p for p in panels}
        if time.monotonic() > deadline:
            raise AssertionError(f"panels still loading after {timeout_s:.0f} s: {panels}")
        time.sleep(1)


def _legend(page: Any, title: str) -> list[str]:
    text = page.locator(f'.panel[data-title="{title}"]').get_attribute("data-legend") or ""
    return text.split("\n")


def test_without_the_key_nothing_is_shown(stack: Any, browser: Any) -> None:
    page = browser
    page.goto(stack.gateway_url + "/dashboards")
    page.wait_for_function("document.getElementById('status').textContent.length > 0")
    assert "dashboards unavailable" in page.inner_text("#status")
    assert page.locator(".panel").count() == 0


def test_every_board_draws_from_live_prometheus(traffic: Any, browser: Any) -> None:
    from components.keys import client_secret

    page = browser
    # As `tandem up` prints the playground's URL: the key in the fragment; the dashboards link keeps it.
    page.goto(traffic.gateway_url + "/#key=" + str(client_secret(traffic)))
    page.get_by_role("link", name="dashboards").click()
    page.wait_for_url("**/dashboards**")
    options = page.locator("#board option").evaluate_all("els => els.map(e => [e.value, e.textContent])")
    assert len(options) == 4, options
    report: dict[str, dict[str, str]] = {}
    for value, _ in options:
        page.select_option("#board", value)
        uid = str(page.locator("section.board").get_attribute("data-uid"))
        states = _states(page)
        page.screenshot(path=ARTIFACTS / f"dashboards-{uid}.png", full_page=True)
        if uid == "tandem-gateway":
            page.screenshot(path=README_SCREENSHOT, full_page=True)
            # Series are named by each target's legendFormat, also on panels with several targets.
            assert set(_legend(page, "Chat completion latency (p50, p95, p99)")) == {"p50", "p95", "p99"}
            assert "/v1/chat/completions 200" in _legend(page, "Requests per second by route and status")
        report[uid] = {title: p["state"] for title, p in states.items()}
        errors = {title: p["problem"] for title, p in states.items() if p["state"] == "error"}
        assert errors == {}, f"{uid}: panels with errors: {errors}"
        assert set(MAY_STAY_EMPTY[uid]) <= set(states), (
            f"{uid}: no such panels {set(MAY_STAY_EMPTY[uid]) - set(states)}"
        )
        empty = sorted(t for t, p in states.items() if p["state"] != "ok" and t not in MAY_STAY_EMPTY[uid])
        assert empty == [], f"{uid}: panels without data: {empty}"
    (ARTIFACTS / "dashboards-states.json").write_text(json.dumps(report, indent=1))
    assert set(report) == set(MAY_STAY_EMPTY)


def test_a_panel_that_cannot_be_drawn_shows_its_error_and_the_rest_draws(traffic: Any, browser: Any) -> None:
    page = browser

    def tamper(route: Any) -> None:
        body = route.fetch().json()
        board = next(e for e in body["boards"] if e.get("board", {}).get("uid") == "tandem-pipelines")["board"]
        board["panels"].append({"type": "heatmap", "title": "Not drawn", "id": 901, "targets": [{"expr": "up"}]})
        board["panels"].append({"type": "timeseries", "title": "Bad query", "id": 902, "targets": [{"expr": "sum("}]})
        body["boards"].append({"file": "broken.json", "error": "broken.json cannot be drawn: Expecting value"})
        route.fulfill(json=body)

    from components.keys import client_secret

    page.route("**/dashboards/boards", tamper)
    page.goto(traffic.gateway_url + "/dashboards?board=tandem-pipelines#key=" + str(client_secret(traffic)))
    states = _states(page)
    assert states["Not drawn"]["state"] == "error"
    assert "panel type 'heatmap' is not drawn" in states["Not drawn"]["problem"]
    assert states["Bad query"]["state"] == "error"
    assert "parse error" in states["Bad query"]["problem"]
    assert states["Documents"]["state"] == "ok"
    assert "broken.json cannot be drawn" in page.inner_text("#status")
    page.screenshot(path=ARTIFACTS / "dashboards-errors.png", full_page=True)

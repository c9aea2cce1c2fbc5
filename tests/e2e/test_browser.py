"""A person's path through the local stack, in headless Chromium (Debian's): sign into the Airflow UI, trigger
ingest_documents with a Param, see the run succeed; then ask the playground a question and see cited sources.

Screenshots of every step are kept in artifacts/e2e/ (ignored by git).
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
    """The gateway and Airflow (standalone, the project's dags/) beside the session's vLLM and Postgres."""
    from components.settings import get_settings
    from components.stack import manager

    get_settings.cache_clear()
    settings = get_settings()
    wanted = ["gateway", "airflow"]
    started = [s.name for s in manager.status(settings, wanted) if s.state == "down"]
    # Only the run this test triggers: unpausing the DAG must not also start its hourly run of the whole corpus
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

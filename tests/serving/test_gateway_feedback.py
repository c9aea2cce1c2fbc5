"""Feedback from answers: each answer recorded under its response id, POST /v1/feedback, corrections as pending
examples, recording off, the retention purge, and a recorder that never waits for Postgres."""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from components.training.data import example_digest, parse_record

Gateway = Any  # the `gateway` fixture (tests/serving/conftest.py)
ALIAS = "gwtest"
QUESTION = "When does Corran Lock open for transits?"
CONTEXT_KEYS = {"question", "answer_given", "correction", "sources", "rating", "alias", "version"}


def _client(gateway: Gateway, url: str = "") -> openai.OpenAI:
    return openai.OpenAI(base_url=(url or gateway.url) + "/v1", api_key=gateway.api_key, max_retries=0, timeout=120)


def _ask(gateway: Gateway, question: str = QUESTION, url: str = "") -> Any:
    return _client(gateway, url).chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": question}], max_tokens=8
    )


def _row(sql: str, *params: Any) -> Any:
    from components.db import connect

    with connect() as conn:
        return conn.execute(sql, params).fetchone()


def _recorded(response_id: str) -> Any:
    return _row(
        "SELECT alias, adapter_version, served_model, question, chunk_ids, sources, cited, answer, key_name"
        " FROM answers WHERE response_id = %s",
        response_id,
    )


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    from serving import metrics as m

    return m.REGISTRY.get_sample_value(name, labels or {}) or 0.0


pytestmark = pytest.mark.vllm


def test_answer_recorded_under_its_id_with_chunk_ids(gateway: Gateway) -> None:
    before = _sample("tandem_feedback_answers_recorded_total")
    completion = _ask(gateway)
    data = completion.model_dump()
    assert completion.id.startswith("chatcmpl-")
    gateway.wait_for(lambda: _recorded(completion.id) is not None, "the answer recorded")
    alias, version, served, question, chunk_ids, sources, cited, answer, key_name = _recorded(completion.id)
    assert (alias, version, served) == (ALIAS, data["tandem"]["adapter_version"], data["tandem"]["served_model"])
    assert question == QUESTION
    assert answer == completion.choices[0].message.content
    assert key_name == gateway.api_key_name
    assert chunk_ids == [r["chunk_id"] for r in data["retrieved"]] and chunk_ids
    assert [s["n"] for s in sources] == [r["index"] for r in data["retrieved"]]
    assert sources[0]["path"] == data["retrieved"][0]["document_path"]
    assert cited == [c["index"] for c in data["citations"]]
    assert _sample("tandem_feedback_answers_recorded_total") > before


def test_stream_carries_one_id_and_is_recorded(gateway: Gateway) -> None:
    stream = _client(gateway).chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": QUESTION}], max_tokens=8, stream=True
    )
    chunks = list(stream)
    ids = {c.id for c in chunks}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")
    assert chunks[-1].model_dump()["object"] == "tandem.citations"
    (response_id,) = ids
    gateway.wait_for(lambda: _recorded(response_id) is not None, "the streamed answer recorded")
    assert _recorded(response_id)[7] == text


def test_correction_becomes_a_pending_example_once(gateway: Gateway) -> None:
    completion = _ask(gateway)
    correction = f"Corran Lock opens two hours either side of high water [1]. ({secrets.token_hex(4)})"
    with gateway.client() as client:  # posted at once: the answer may still be on its way to Postgres
        resp = client.post(
            "/v1/feedback", json={"response_id": completion.id, "rating": "down", "correction": correction}
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        again = client.post(
            "/v1/feedback", json={"response_id": completion.id, "rating": "down", "correction": correction}
        ).json()
    example = body["example"]
    assert example["status"] == "pending" and example["duplicate"] is False
    assert again["example"] == {"id": example["id"], "status": "pending", "duplicate": True}
    alias, content_hash, stored, origin, status, by, context = _row(
        "SELECT alias, content_hash, example, origin, status, submitted_by, context FROM domain_examples WHERE id = %s",
        example["id"],
    )
    assert (alias, origin, status, by) == (ALIAS, f"feedback:{completion.id}", "pending", gateway.api_key_name)
    assert stored["messages"] == [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": correction}]
    assert content_hash == example_digest(parse_record(stored))  # what the intake computes for the same example
    assert set(context) == CONTEXT_KEYS
    assert context["question"] == QUESTION and context["correction"] == correction
    assert context["answer_given"] == completion.choices[0].message.content
    assert (context["rating"], context["alias"]) == ("down", ALIAS)
    assert context["version"] == completion.model_dump()["tandem"]["adapter_version"]
    assert context["sources"] and set(context["sources"][0]) == {"n", "path", "heading", "chunk_id"}
    rows = _row("SELECT count(*), count(example_id) FROM answer_feedback WHERE response_id = %s", completion.id)
    assert rows == (2, 2)


def test_rating_alone_adds_no_example(gateway: Gateway) -> None:
    completion = _ask(gateway)
    before = _sample("tandem_feedback_ratings_total", {"rating": "up", "correction": "no"})
    with gateway.client() as client:
        resp = client.post("/v1/feedback", json={"response_id": completion.id, "rating": "up"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["example"] is None
    assert _row("SELECT rating, correction, key_name FROM answer_feedback WHERE response_id = %s", completion.id) == (
        "up",
        None,
        gateway.api_key_name,
    )
    assert _row("SELECT count(*) FROM domain_examples WHERE origin = %s", f"feedback:{completion.id}") == (0,)
    assert _sample("tandem_feedback_ratings_total", {"rating": "up", "correction": "no"}) == before + 1


def test_bad_feedback_is_refused_in_one_line(gateway: Gateway) -> None:
    completion = _ask(gateway)
    rid = completion.id
    with gateway.client() as client:
        cases = {
            "unknown id": (client.post("/v1/feedback", json={"response_id": "chatcmpl-nope", "rating": "up"}), 404),
            "another key's answer": (
                gateway.admin().post("/v1/feedback", json={"response_id": rid, "rating": "up"}),
                404,
            ),
            "bad rating": (client.post("/v1/feedback", json={"response_id": rid, "rating": "meh"}), 400),
            "empty correction": (
                client.post("/v1/feedback", json={"response_id": rid, "rating": "down", "correction": "  "}),
                400,
            ),
            "oversized correction": (
                client.post("/v1/feedback", json={"response_id": rid, "rating": "down", "correction": "x" * 4001}),
                400,
            ),
            "body over the size limit": (
                client.post("/v1/feedback", json={"response_id": rid, "rating": "down", "correction": "x" * 70_000}),
                413,
            ),
            "unknown field": (client.post("/v1/feedback", json={"response_id": rid, "rating": "up", "x": 1}), 400),
        }
    for what, (resp, status) in cases.items():
        assert resp.status_code == status, (what, resp.text)
        message = resp.json()["error"]["message"]
        assert message and "\n" not in message, what
    assert "chatcmpl-nope" in cases["unknown id"][0].json()["error"]["message"]
    assert "at most 4000 characters" in cases["oversized correction"][0].json()["error"]["message"]
    assert _row("SELECT count(*) FROM answer_feedback WHERE response_id = %s", rid) == (0,)


def test_feedback_needs_a_key(gateway: Gateway) -> None:
    import httpx

    body = {"response_id": "chatcmpl-x", "rating": "up"}
    assert httpx.post(gateway.url + "/v1/feedback", json=body, timeout=30).status_code == 401
    bad = httpx.post(gateway.url + "/v1/feedback", json=body, headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert bad.status_code == 401


# ---- a second gateway: recording off, the retention purge every half second --------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def unrecorded(gateway: Gateway) -> Iterator[str]:
    """A gateway with TANDEM_RECORD_ANSWERS=false whose purge runs every 0.5 s; yields its URL."""
    import uvicorn

    from components.settings import Settings
    from serving.app import create_app

    port = _free_port()
    settings = Settings(
        gateway_port=port,
        max_tokens_limit=16,
        default_max_tokens=8,
        record_answers=False,
        answer_retention_days=30,
        answer_purge_interval_s=0.5,
        api_keys=[f"{gateway.api_key_name}:{gateway.api_key}"],
    )
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="gateway-unrecorded", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_recording_off_records_nothing(gateway: Gateway, unrecorded: str) -> None:
    import httpx

    completion = _ask(gateway, url=unrecorded)
    assert completion.id.startswith("chatcmpl-") and completion.choices[0].message.content is not None
    resp = httpx.post(
        unrecorded + "/v1/feedback",
        json={"response_id": completion.id, "rating": "down", "correction": "Something else."},
        headers={"Authorization": f"Bearer {gateway.api_key}"},
        timeout=30,
    )
    assert resp.status_code == 404
    assert "TANDEM_RECORD_ANSWERS=false" in resp.json()["error"]["message"]
    time.sleep(1.0)  # longer than a write takes (the other tests wait for theirs): nothing is on its way
    assert _recorded(completion.id) is None


def test_retention_purge_removes_old_answers(gateway: Gateway, unrecorded: str) -> None:
    from components.db import connect

    old, recent = f"chatcmpl-old{secrets.token_hex(6)}", f"chatcmpl-recent{secrets.token_hex(6)}"
    with connect() as conn:
        for rid, age in ((old, 31), (recent, 29)):
            conn.execute(
                "INSERT INTO answers (response_id, alias, served_model, question, answer, key_name, created_at)"
                " VALUES (%s, %s, 'm', 'q', 'a', 'k', now() - make_interval(days => %s))",
                (rid, ALIAS, age),
            )
        conn.execute("INSERT INTO answer_feedback (response_id, rating, key_name) VALUES (%s, 'down', 'k')", (old,))
        conn.commit()
    gateway.wait_for(lambda: _recorded(old) is None, "the 31-day-old answer purged (retention 30 days)")
    assert _recorded(recent) is not None
    assert _row("SELECT count(*) FROM answer_feedback WHERE response_id = %s", old) == (0,)


# ---- the recorder never waits for Postgres -----------------------------------------------------------------


def test_recorder_drops_and_counts_when_postgres_is_unreachable(pg_url: str) -> None:
    """A full queue drops at once; a write Postgres cannot take is dropped and counted (a port nothing listens
    on stands for Postgres down)."""
    from components.settings import Settings
    from serving.answer_log import AnswerLog, AnswerRecord
    from serving.db import Database

    async def scenario() -> None:
        db = Database(f"postgresql://tandem@127.0.0.1:{_free_port()}/tandem", pool_timeout_s=0.3)
        db.open()
        answers = AnswerLog(Settings(answer_log_queue=2, answer_purge_interval_s=3600), db)
        record = AnswerRecord("chatcmpl-t", ALIAS, None, "m", "q", "a", "k")
        full = _sample("tandem_feedback_answers_dropped_total", {"reason": "queue_full"})
        failed = _sample("tandem_feedback_answers_dropped_total", {"reason": "db_error"})
        for _ in range(3):
            answers.record(record)  # returns at once: no writer is running yet
        assert _sample("tandem_feedback_answers_dropped_total", {"reason": "queue_full"}) == full + 1
        answers.start()
        await answers.flush(10.0)
        assert answers.queue.empty()
        assert _sample("tandem_feedback_answers_dropped_total", {"reason": "db_error"}) == failed + 2
        await answers.stop()
        await asyncio.to_thread(db.close)

    asyncio.run(scenario())


# ---- the playground: thumbs and "suggest a correction", in headless Chromium ---------------------------------


def test_playground_rates_and_corrects_an_answer(gateway: Gateway) -> None:
    import shutil
    import tempfile

    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: run `make system`")
    correction = f"Corran Lock opens two hours either side of high water. ({secrets.token_hex(4)})"
    with sync_playwright() as p, tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        context.set_default_timeout(60_000)
        try:
            page = context.new_page()
            page.goto(f"{gateway.url}/#key={gateway.api_key}")  # the key as `tandem up` hands it over
            expect(page.locator(f"#model option[value='{ALIAS}']")).to_have_count(1)
            page.select_option("#model", ALIAS)
            page.fill("#question", QUESTION)
            page.fill("#max-tokens", "8")
            page.click("#send")
            expect(page.locator("#result")).to_be_visible()
            page.click("#rate-up")
            expect(page.locator("#feedback-status")).to_have_text("Thanks, your rating is recorded.")
            expect(page.locator("#rate-up")).to_have_attribute("aria-pressed", "true")
            page.click("#suggest")
            page.fill("#correction", correction)
            page.click("#send-correction")
            expect(page.locator("#feedback-status")).to_have_text("Thanks, your correction waits for a reviewer.")
        finally:
            context.close()
    response_id, rating, by = _row(
        "SELECT response_id, rating, key_name FROM answer_feedback WHERE correction = %s", correction
    )
    assert (rating, by) == ("down", gateway.api_key_name)
    assert _row("SELECT count(*) FROM answer_feedback WHERE response_id = %s AND rating = 'up'", response_id) == (1,)
    assert _row("SELECT status, submitted_by FROM domain_examples WHERE origin = %s", f"feedback:{response_id}") == (
        "pending",
        gateway.api_key_name,
    )

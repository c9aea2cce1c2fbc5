"""Faults injected under the real gateway: its Postgres stopped during chats, during scrapes, during a promotion.

The module runs a Postgres of its own (the embedded server, in a temp dir, migrated and indexed like the
session's) and a second in-process gateway on it, sharing the session's vLLM; stopping that database disturbs no
other test. The server is stopped with its own ``pg_ctl -m fast`` (as ``tandem down`` does) and always started
again in a ``finally``, waited for until it accepts connections.

Every answer is tallied: 200, a clear 503 (the OpenAI error shape, one line, with a code), another 5xx, or lost
(no answer at all). Other 5xx and lost requests must stay at 0. The gateway is never restarted.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.vllm

# An alias of its own: its served names (faults-vN) never clash in the shared vLLM with the session gateway's.
ALIAS = "faults"
BASE = "smollm2-135m"
DOCS = {
    "pumps.md": "# Bilge pumps\n\n## Testing\n\nEach bilge pump on the Merrow tenders is tested every Monday by "
    "the watch leader, who logs the result in the blue book kept in the chart room.\n",
    "radio.md": "# Radio checks\n\n## Daily\n\nThe harbour radio check runs at 08:15 on channel 12; a station "
    "that does not answer twice is reported to the duty officer.\n",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- a Postgres of this module's own ----------------------------------------------------------------------


@dataclass
class Postgres:
    """The embedded server in ``pgdata``; ``stop`` and ``start`` use its pg_ctl, as the project does."""

    pgdata: Path
    url: str
    server: Any

    @property
    def _user(self) -> str | None:  # as root the server runs as the owner of its data folder
        return pwd.getpwuid(self.pgdata.stat().st_uid).pw_name if os.geteuid() == 0 else None

    def running(self) -> bool:
        return (self.pgdata / "postmaster.pid").exists()

    def stop(self) -> None:
        from components.db.postgres import _server_package

        _server_package().pg_ctl(["-m", "fast", "-w", "stop"], pgdata=self.pgdata, user=self._user, timeout=60)

    def start(self) -> None:
        """Start it again on the same socket (the URL does not change), then wait until it accepts connections."""
        from psycopg.conninfo import conninfo_to_dict

        from components.db.postgres import _server_package

        socket_dir = conninfo_to_dict(self.url)["host"]
        args = ["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(self.pgdata / "log"), "start"]
        _server_package().pg_ctl(args, pgdata=self.pgdata, user=self._user, timeout=60)
        deadline = time.monotonic() + 60
        while not self.accepts():
            assert time.monotonic() < deadline, "the restarted Postgres does not accept connections"
            time.sleep(0.2)

    def accepts(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    @contextmanager
    def down(self) -> Iterator[None]:
        """Postgres stopped for the block; started again afterwards whatever happens."""
        try:
            self.stop()
            assert not self.accepts()
            yield
        finally:
            if not self.running():
                self.start()


@pytest.fixture(scope="module")
def faults_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    from components.db import migrate
    from components.db.postgres import _server_package
    from components.settings import Settings

    pgdata = tmp_path_factory.mktemp("faults-pg") / "pgdata"
    server = _server_package().get_server(pgdata, cleanup_mode="delete")
    pg = Postgres(pgdata, str(server.get_uri()), server)
    migrate(Settings(database_url=pg.url))
    try:
        yield pg
    finally:
        if pg.running():
            pg.stop()
        server.cleanup()  # the server is stopped: this only deletes the data folder
        shutil.rmtree(pgdata, ignore_errors=True)


# ---- its gateway ------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Every answer of the module, by kind; ``lost`` is a request that got no answer at all."""

    kinds: Counter[str] = field(default_factory=Counter)
    slowest_503_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    def record(
        self, what: str, call: Callable[[], httpx.Response], clear: Callable[[httpx.Response], bool] | None = None
    ) -> httpx.Response | None:
        """Make the request and tally its answer; ``clear`` says whether a 503 is a clear one (default: the
        OpenAI error shape with a code)."""
        started = time.monotonic()
        try:
            response = call()
        except httpx.TransportError as exc:
            self.kinds["lost"] += 1
            self.problems.append(f"{what}: no answer ({type(exc).__name__})")
            return None
        seconds = time.monotonic() - started
        status = response.status_code
        if status == 503 and (clear or _clear_error)(response):
            self.kinds["503"] += 1
            self.slowest_503_s = max(self.slowest_503_s, seconds)
        elif status >= 500:
            self.kinds["other_5xx"] += 1
            self.problems.append(f"{what}: {status} {response.text[:300]}")
        else:
            self.kinds[str(status)] += 1
        return response

    def assert_clean(self) -> None:
        assert self.kinds["other_5xx"] == 0 and self.kinds["lost"] == 0, self.problems


def _clear_error(response: httpx.Response) -> bool:
    """An OpenAI-shaped error with a one-line message and a code."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return bool(error.get("code")) and bool(error.get("message")) and "\n" not in error["message"]


@dataclass
class Faulty:
    url: str
    pg: Postgres
    versions: dict[str, int]
    api_key: str
    admin_key: str
    tally: Tally

    def client(self, admin: bool = False) -> httpx.Client:
        key = self.admin_key if admin else self.api_key
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def chat(self, rag: bool, model: str = BASE, stream: bool = False) -> httpx.Response | None:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "When are the bilge pumps tested?"}],
            "rag": rag,
            "max_tokens": 4,
            "stream": stream,
        }

        def call() -> httpx.Response:
            with self.client() as client:
                if not stream:
                    return client.post("/v1/chat/completions", json=body)
                with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    response.read()
                    return response

        return self.tally.record(f"chat rag={rag} model={model} stream={stream}", call)

    def promote(self, version: int) -> httpx.Response | None:
        def call() -> httpx.Response:
            with self.client(admin=True) as client:
                return client.post("/v1/admin/adapters/promote", json={"alias": ALIAS, "version": version})

        return self.tally.record(f"promote v{version}", call)

    def scrape(self) -> httpx.Response | None:
        return self.tally.record("scrape", lambda: httpx.get(self.url + "/metrics", timeout=30))

    def snapshot(self) -> dict[str, Any]:
        with self.client(admin=True) as client:
            entry = next(a for a in client.get("/v1/admin/adapters").json()["aliases"] if a["alias"] == ALIAS)
        return dict(entry)

    def serves(self, version: int) -> bool:
        entry = self.snapshot()
        return bool(entry["champion_version"] == version and not entry["fallback"])

    def champions(self) -> list[int]:
        """The versions the registry marks champion for the alias (read as the schema owner)."""
        import psycopg

        with psycopg.connect(self.pg.url) as conn:
            rows = conn.execute(
                "SELECT version FROM adapter_versions WHERE alias = %s AND status = 'champion'", (ALIAS,)
            ).fetchall()
        return [int(r[0]) for r in rows]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 90.0) -> float:
    """Poll until ``predicate()`` holds; returns the seconds it took (a wait for a state, not a timed assertion)."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"gave up waiting for: {what}")
        time.sleep(0.25)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def faulty(
    faults_pg: Postgres, vllm_server: str, peft_adapters: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Faulty]:
    import uvicorn
    from psycopg.conninfo import make_conninfo

    from components import registry
    from components.db import connect
    from components.db.gateway_role import GATEWAY_ROLE
    from components.ingest.sync import sync_documents
    from components.settings import Settings
    from serving.app import create_app

    owner = Settings(database_url=faults_pg.url)
    folder = tmp_path_factory.mktemp("faults-docs")
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    sync_documents(str(folder), settings=owner.model_copy(update={"ingest_allowed_roots": [str(folder)]}))
    with connect(owner) as conn:
        versions = {}
        for label, path in (("v1", peft_adapters.v1), ("v2", peft_adapters.v2)):
            versions[label] = registry.register_candidate(
                conn,
                alias=ALIAS,
                base_model=BASE,
                dataset_version="faults",
                dataset_size=1,
                hyperparameters={"r": 8},
                metrics={},
                artifact_uri=str(path),
                lora_rank=8,
            ).version
            conn.commit()
        registry.set_champion(conn, ALIAS, versions["v1"], actor="cli:tests")
        conn.commit()
    api_key, admin_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    port = _free_port()
    settings = Settings(
        gateway_port=port,
        database_url=faults_pg.url,
        gateway_database_url=make_conninfo(faults_pg.url, user=GATEWAY_ROLE, password=""),
        reconcile_interval_s=1.0,
        max_tokens_limit=16,
        default_max_tokens=4,
        metrics_refresh_interval_s=0.5,
        metrics_db_budget_s=0.5,
        ready_db_budget_s=0.5,
        api_keys=[f"faults-client:{api_key}"],
        admin_api_keys=[f"faults-admin:{admin_key}"],
        # db_pool_timeout_s and rate_limit_db_timeout_s keep their defaults: the waits measured are the shipped ones
    )
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="gateway-faults", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.1)
    gw = Faulty(f"http://127.0.0.1:{port}", faults_pg, versions, api_key, admin_key, Tally())
    wait_for(lambda: gw.serves(versions["v1"]), "v1 loaded by the reconciler")
    try:
        yield gw
    finally:
        server.should_exit = True
        thread.join(30)


def _retrieval_works(gw: Faulty) -> bool:
    response = gw.chat(rag=True)
    return bool(response is not None and response.status_code == 200 and response.json()["retrieved"])


# ---- the faults -------------------------------------------------------------------------------------------


def test_postgres_stopped_during_chats_answers_503_or_200_never_500(faulty: Faulty) -> None:
    gw = faulty
    assert _retrieval_works(gw)
    with ThreadPoolExecutor(4) as pool:
        # chats in flight while the database goes away: each one ends 200 (retrieval done before) or a clear 503
        in_flight: list[Future[httpx.Response | None]] = [pool.submit(gw.chat, True) for _ in range(4)]
        time.sleep(0.2)
        with gw.pg.down():
            during = [f.result() for f in in_flight]
            assert all(r is not None and r.status_code in (200, 503) for r in during), [
                r.status_code if r else None for r in during
            ]
            print(f"\nrag chats in flight as Postgres stopped: {sorted(r.status_code for r in during if r)}")
            # with it down: retrieval answers a clear 503, in the time the shipped settings allow
            for stream in (False, True):
                started = time.monotonic()
                refused = gw.chat(rag=True, stream=stream)
                seconds = time.monotonic() - started
                assert refused is not None and refused.status_code == 503, refused.text if refused else None
                assert refused.json()["error"]["code"] == "retrieval_unavailable"
                assert seconds < 10.0  # rate-limit wait (1 s) + pool wait (2 s), far under the 10 s it was
                print(f"rag chat (stream={stream}) with Postgres down: 503 in {seconds:.2f} s")
            with gw.client() as client:
                retrieve = gw.tally.record("retrieve", lambda: client.post("/v1/retrieve", json={"query": "pumps"}))
            assert retrieve is not None and retrieve.status_code == 503
            # without retrieval the database is not needed: vLLM answers
            plain = gw.chat(rag=False)
            assert plain is not None and plain.status_code == 200, plain.text if plain else None
            assert plain.json()["choices"][0]["message"]["content"] is not None
            # an adapter alias is still routed to its champion from memory
            routed = gw.chat(rag=False, model=ALIAS)
            assert routed is not None and routed.status_code == 200
            assert routed.json()["tandem"]["adapter_version"] == gw.versions["v1"]
    seconds = wait_for(lambda: _retrieval_works(gw), "retrieval answers again after Postgres is back")
    print(f"retrieval back {seconds:.2f} s after Postgres accepted connections again")
    gw.tally.assert_clean()


def test_postgres_stopped_during_scrapes_metrics_answer_within_budget(faulty: Faulty) -> None:
    gw = faulty

    def pipeline_up(value: str) -> bool:
        scrape = gw.scrape()
        return bool(scrape is not None and f"tandem_pipeline_metrics_up {value}" in scrape.text)

    wait_for(lambda: pipeline_up("1.0"), "pipeline metrics read from Postgres")
    stop_scraping = threading.Event()
    timings: list[tuple[int, float]] = []

    def scrape_all_along() -> None:
        while not stop_scraping.is_set():
            started = time.monotonic()
            scrape = gw.scrape()
            timings.append((scrape.status_code if scrape else 0, time.monotonic() - started))
            time.sleep(0.1)

    scraper = threading.Thread(target=scrape_all_along, daemon=True)
    scraper.start()
    try:
        with gw.pg.down():
            wait_for(lambda: pipeline_up("0.0"), "the pipeline metrics say the database is down", timeout=30)
            scrape = gw.scrape()
            assert scrape is not None and scrape.status_code == 200
            assert "tandem_pipeline_metrics_up 0.0" in scrape.text
            assert "tandem_eval_scrape_ok 0.0" in scrape.text
            time.sleep(2.0)  # keep scraping through a few failed refreshes
            # /ready's 503 is its answer "not ready", with the check that failed
            ready = gw.tally.record(
                "ready", lambda: httpx.get(gw.url + "/ready", timeout=30), clear=lambda r: "checks" in r.json()
            )
            assert ready is not None and ready.status_code == 503
            assert ready.json()["checks"]["database_reachable"] is False
            assert httpx.get(gw.url + "/health", timeout=30).status_code == 200
    finally:
        stop_scraping.set()
        scraper.join(30)
    assert timings and all(status == 200 for status, _ in timings), timings
    slowest = max(seconds for _, seconds in timings)
    # a scrape copies the snapshot and never waits for the database (it used to wait up to 10 s); the margin is
    # for a loaded 2-core CI host, where 0.52 s was seen
    assert slowest < 3.0
    print(f"\n{len(timings)} scrapes while Postgres stopped and came back: all 200, slowest {slowest:.3f} s")
    wait_for(lambda: pipeline_up("1.0"), "pipeline metrics read again after Postgres is back")
    gw.tally.assert_clean()


def test_postgres_stopped_during_a_promotion_leaves_one_champion_that_is_served(faulty: Faulty) -> None:
    gw = faulty
    v1, v2 = gw.versions["v1"], gw.versions["v2"]
    assert gw.champions() == [v1]
    with ThreadPoolExecutor(1) as pool:
        during = pool.submit(gw.promote, v2)
        time.sleep(0.05)
        with gw.pg.down():
            first = during.result()
            # promotions sent while it is down: refused with a clear 503, nothing switched
            refused = [gw.promote(v) for v in (v1, v2)]
    answers = [first, *refused]
    assert all(r is not None and r.status_code in (200, 503) for r in answers), [
        (r.status_code, r.text[:200]) if r else None for r in answers
    ]
    for response in refused:
        assert response is not None and response.status_code == 503, response.text if response else None
        assert response.json()["error"]["code"] == "database_unavailable"
    codes = [
        (r.status_code, r.json().get("error", {}).get("code") if r.status_code >= 400 else "") for r in answers if r
    ]
    print(f"\npromotion during the stop, then two while down: {codes}")
    # back: the registry holds exactly one champion and the reconciler makes the gateway serve it
    champions = gw.champions()
    assert len(champions) == 1 and champions[0] in (v1, v2), champions
    wait_for(lambda: gw.serves(champions[0]), f"the gateway serving v{champions[0]}, the registry's champion")
    routed = gw.chat(rag=False, model=ALIAS)
    assert routed is not None and routed.status_code == 200
    assert routed.json()["tandem"]["adapter_version"] == champions[0]
    gw.tally.assert_clean()


def test_everything_answers_again_without_restarting_the_gateway(faulty: Faulty) -> None:
    gw = faulty
    assert _retrieval_works(gw)
    with gw.client() as client:
        assert client.post("/v1/retrieve", json={"query": "radio check"}).json()["chunks"]
    assert httpx.get(gw.url + "/ready", timeout=30).status_code == 200
    current = gw.champions()[0]
    other = gw.versions["v1"] if current == gw.versions["v2"] else gw.versions["v2"]
    promoted = gw.promote(other)
    assert promoted is not None and promoted.status_code == 200, promoted.text if promoted else None
    assert gw.champions() == [other] and gw.serves(other)
    gw.tally.assert_clean()
    print(f"\nanswers over the module: {dict(gw.tally.kinds)}; slowest clear 503: {gw.tally.slowest_503_s:.2f} s")

"""Two gateways on one Postgres and one real vLLM: promotions that agree fleet-wide.

Gateway A reconciles every second. Gateway B reconciles only every 10 minutes, so whatever B learns within a test
it learned from the registry's NOTIFY (or a reconcile round woken by it). Gateway C, started by one test, has the
listener off: only its reconcile round tells it.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest

pytestmark = pytest.mark.vllm

ALIAS = "fleettest"
API = ("fleet-client", secrets.token_urlsafe(24))
ADMIN = ("fleet-admin", secrets.token_urlsafe(24))
GRACE_S = 2.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Any, what: str, timeout: float = 90.0) -> None:
    """Poll until ``predicate()`` is true (a wait for a state, never an assertion on time)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for: {what}")
        time.sleep(0.05)


@dataclass
class Gw:
    url: str
    server: Any
    thread: threading.Thread
    name: str
    timings: list[float] = field(default_factory=list)

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN[1]}"}, timeout=120)

    def snapshot(self) -> dict[str, Any]:
        with self.admin() as client:
            result: dict[str, Any] = client.get("/v1/admin/adapters").json()
        return result

    def routed_version(self) -> int | None:
        """The version this gateway routes the alias to (None while it falls back to the base model)."""
        entry = next((a for a in self.snapshot()["aliases"] if a["alias"] == ALIAS), None)
        return None if entry is None or entry["fallback"] else entry["champion_version"]

    def ask(self) -> int | None:
        client = openai.OpenAI(base_url=self.url + "/v1", api_key=API[1], max_retries=0, timeout=120)
        raw = client.chat.completions.with_raw_response.create(
            model=ALIAS, messages=[{"role": "user", "content": "Hello"}], max_tokens=2, extra_body={"rag": False}
        )
        version: int | None = raw.parse().model_dump()["tandem"]["adapter_version"]
        return version

    def promote(self, version: int) -> httpx.Response:
        with self.admin() as client:
            return client.post("/v1/admin/adapters/promote", json={"alias": ALIAS, "version": version})

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_gateway(name: str, **overrides: Any) -> Gw:
    import uvicorn

    from components.settings import Settings
    from serving.app import create_app

    port = _free_port()
    settings = Settings(
        gateway_port=port,
        max_tokens_limit=16,
        default_max_tokens=8,
        api_keys=[f"{API[0]}:{API[1]}"],
        admin_api_keys=[f"{ADMIN[0]}:{ADMIN[1]}"],
        adapter_drain_grace_s=GRACE_S,
        promotion_lock_wait_s=2.0,
        **overrides,
    )
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"gateway-{name}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, f"gateway {name} did not start"
        time.sleep(0.1)
    return Gw(f"http://127.0.0.1:{port}", server, thread, name)


@dataclass
class Fleet:
    a: Gw
    b: Gw
    versions: list[int]
    vllm_url: str


def _register(path: Any) -> int:
    from components import registry
    from components.db import connect

    with connect() as conn:
        av = registry.register_candidate(
            conn,
            alias=ALIAS,
            base_model="smollm2-135m",
            dataset_version="fleet",
            dataset_size=1,
            hyperparameters={"r": 8},
            metrics={},
            artifact_uri=str(path),
            lora_rank=8,
        )
        conn.commit()
    return av.version


def _registry_state() -> tuple[list[int], int | None]:
    """Every champion row of the alias (must be one), and the champion."""
    from components.db import connect

    with connect() as conn:
        rows = conn.execute(
            "SELECT version FROM adapter_versions WHERE alias = %s AND status = 'champion'", (ALIAS,)
        ).fetchall()
    versions = [r[0] for r in rows]
    return versions, versions[0] if len(versions) == 1 else None


def _vllm_models(url: str) -> set[str]:
    from components.keys import vllm_secret
    from components.settings import get_settings
    from components.vllm_client import VllmClient

    with VllmClient(url, 30.0, api_key=vllm_secret(get_settings())) as client:
        return client.models()


@pytest.fixture(scope="module")
def fleet(vllm_server: str, pg_url: str, peft_adapters: Any) -> Iterator[Fleet]:
    from components import registry
    from components.db import connect

    paths = [peft_adapters.v1, peft_adapters.v2, peft_adapters.v1, peft_adapters.v2, peft_adapters.v1]
    versions = [_register(p) for p in paths]  # each a new served name
    with connect() as conn:
        registry.set_champion(conn, ALIAS, versions[0], actor="cli:tests")
        conn.commit()
    a = start_gateway("a", reconcile_interval_s=1.0)
    try:
        wait_for(lambda: a.routed_version() == versions[0], "A serves v1")
        b = start_gateway("b", reconcile_interval_s=600.0)
    except BaseException:
        a.stop()
        raise
    try:
        wait_for(lambda: b.routed_version() == versions[0], "B serves v1")
        yield Fleet(a, b, versions, vllm_server)
    finally:
        b.stop()
        a.stop()


def _settle(fleet: Fleet, version: int) -> None:
    """Both gateways serve ``version`` (the registry's champion) and the replica holds it."""
    wait_for(lambda: fleet.a.routed_version() == version, f"A serves v{version}")
    wait_for(lambda: fleet.b.routed_version() == version, f"B serves v{version}")
    assert f"{ALIAS}-v{version}" in _vllm_models(fleet.vllm_url)


def test_promotion_through_a_is_served_by_b_through_notify(fleet: Fleet) -> None:
    """B never reconciles on its own during this test: it switches because it heard the registry's NOTIFY."""
    target = fleet.versions[1]
    heard_before = fleet.b.snapshot()["listener"]["notifications"]
    response = fleet.a.promote(target)
    committed = time.monotonic()
    assert response.status_code == 200, response.text
    wait_for(lambda: fleet.b.routed_version() == target, "B serves the new version", timeout=60)
    delay = time.monotonic() - committed
    assert fleet.b.ask() == target and fleet.a.ask() == target
    listener = fleet.b.snapshot()["listener"]
    assert listener["enabled"] and listener["connected"] and listener["notifications"] > heard_before
    print(f"B served v{target} {delay:.3f} s after A's promotion answered (commit precedes the answer)")


def test_two_promotions_of_one_alias_at_once_leave_one_champion(fleet: Fleet) -> None:
    """Gateway A's admin API and the CLI's registry path race for the alias: one waits for the other's lock (or
    is refused with 409); the registry ends with one champion and the replica and both gateways agree with it."""
    from components.errors import TandemError
    from components.settings import get_settings
    from components.training import promotion

    current = _registry_state()[1]
    via_a, via_cli = fleet.versions[2], fleet.versions[3]  # neither loaded yet: A's promotion holds the lock a while
    assert current not in (via_a, via_cli)
    outcomes: dict[str, Any] = {}
    barrier = threading.Barrier(2)

    def gateway_side() -> None:
        barrier.wait()
        outcomes["a"] = fleet.a.promote(via_a)

    def cli_side() -> None:
        barrier.wait()
        # pointed at a port with no gateway, so the CLI takes its own path: the alias lock and the registry
        cli_settings = get_settings().model_copy(update={"gateway_port": _free_port()})
        try:
            outcomes["cli"] = promotion.promote(cli_settings, ALIAS, via_cli, reason="race")
        except TandemError as exc:
            outcomes["cli"] = exc

    threads = [threading.Thread(target=gateway_side), threading.Thread(target=cli_side)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    a, cli = outcomes["a"], outcomes["cli"]
    a_ok = a.status_code == 200
    cli_ok = not isinstance(cli, Exception)
    assert a_ok or cli_ok, (a.text, cli)
    if not a_ok:
        assert a.status_code == 409 and a.json()["error"]["code"] == "alias_busy", a.text
    if not cli_ok:
        assert "another promotion" in str(cli) and "\n" not in str(cli), cli
    if cli_ok:
        assert cli.via == "registry"
    champions, champion = _registry_state()
    assert len(champions) == 1, champions
    assert champion in {v for v, ok in ((via_a, a_ok), (via_cli, cli_ok)) if ok}
    _settle(fleet, champion)  # the replica holds what the registry says, and both gateways route to it


def test_a_held_alias_lock_refuses_the_gateway_and_the_cli_and_changes_nothing(fleet: Fleet) -> None:
    """While another switch holds the alias's lock: the admin API answers 409 after its wait, `tandem promote`
    prints one line and exits non-zero, and the registry keeps its champion."""
    from components import registry
    from components.db import connect

    before = _registry_state()
    other = next(v for v in fleet.versions if v != before[1])
    with connect() as holder, holder.transaction():
        registry.lock_alias(holder, ALIAS)  # a promotion in progress elsewhere
        refused = fleet.a.promote(other)
        env = {**os.environ, "TANDEM_PROMOTION_LOCK_WAIT_S": "1"}
        cli = subprocess.run(
            [sys.executable, "-m", "components.cli", "promote", ALIAS, str(other)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "alias_busy"
    assert cli.returncode != 0
    assert cli.stderr.strip().count("\n") == 0 and "another promotion" in cli.stderr, cli.stderr
    assert _registry_state() == before
    busy = httpx.get(fleet.a.url + "/metrics").text
    assert f'tandem_adapter_alias_lock_busy_total{{alias="{ALIAS}"}}' in busy


def test_retired_version_stays_while_vllm_runs_a_request_on_it(fleet: Fleet) -> None:
    """A request on the old version that no gateway knows about (sent to vLLM directly, as another gateway's
    would be) keeps it loaded past the grace period; it is unloaded once that request has finished."""
    from components.keys import vllm_secret
    from components.settings import get_settings

    old = _registry_state()[1]
    assert old is not None
    _settle(fleet, old)
    new = next(v for v in fleet.versions if v != old)
    old_name = f"{ALIAS}-v{old}"
    done = threading.Event()
    errors: list[BaseException] = []

    def long_stream() -> None:
        client = openai.OpenAI(
            base_url=fleet.vllm_url + "/v1", api_key=vllm_secret(get_settings()) or "none", max_retries=0
        )
        try:
            stream = client.chat.completions.create(
                model=old_name,
                messages=[{"role": "user", "content": "Tell a long story."}],
                max_tokens=400,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for _ in stream:
                pass
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    streamer = threading.Thread(target=long_stream)
    streamer.start()
    time.sleep(1.0)  # let it reach vLLM's scheduler
    assert fleet.a.promote(new).status_code == 200
    switched = time.monotonic()
    checked_after_grace = 0
    while not done.is_set():
        loaded = old_name in _vllm_models(fleet.vllm_url)
        if not done.is_set():
            assert loaded, "the old version was unloaded under a running request"
            if time.monotonic() - switched > GRACE_S + 2.0:  # past the grace and at least one round of A
                checked_after_grace += 1
        time.sleep(0.3)
    streamer.join(30)
    assert errors == []
    assert checked_after_grace > 0, "the stream ended within the grace period: nothing was shown"
    wait_for(lambda: old_name not in _vllm_models(fleet.vllm_url), "old version unloaded after the request")
    _settle(fleet, new)


def test_a_killed_listener_reconnects_and_serving_keeps_the_last_known_state(fleet: Fleet) -> None:
    from components.db import connect

    current = _registry_state()[1]
    _settle(fleet, current)  # type: ignore[arg-type]
    reconnects = fleet.b.snapshot()["listener"]["reconnects"]
    with connect() as conn:
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'tandem-registry-listener'"
        ).fetchone()
    assert killed and killed[0] >= 2  # A's and B's
    assert fleet.b.ask() == current  # serving goes on with what B knew
    wait_for(
        lambda: (s := fleet.b.snapshot()["listener"])["connected"] and s["reconnects"] > reconnects,
        "B's listener reconnected",
    )
    target = next(v for v in fleet.versions if v != current)
    assert fleet.a.promote(target).status_code == 200
    wait_for(lambda: fleet.b.routed_version() == target, "B heard the promotion on its new connection", timeout=60)
    metrics = httpx.get(fleet.b.url + "/metrics").text
    assert "tandem_adapter_registry_listener_reconnects_total" in metrics


def test_with_the_listener_off_the_reconcile_round_picks_the_switch_up(fleet: Fleet) -> None:
    c = start_gateway("c", reconcile_interval_s=1.0, registry_notify=False)
    try:
        current = _registry_state()[1]
        wait_for(lambda: c.routed_version() == current, "C serves the champion")
        assert c.snapshot()["listener"] == {"enabled": False}
        target = next(v for v in fleet.versions if v != current)
        assert fleet.a.promote(target).status_code == 200
        wait_for(lambda: c.routed_version() == target, "C's reconcile round picked up the switch", timeout=60)
        assert c.ask() == target
    finally:
        c.stop()

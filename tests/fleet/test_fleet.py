"""The fleet under load: switches through either gateway and the CLI, a replica killed, replicas found by DNS.

Every test runs the official openai client against the real gateways and real vLLM replicas (conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ALIAS = "fleettest"  # the fleet fixture's alias (conftest.py)
QUESTION = "When does Corran Lock open for transits?"
Fleet = Any  # conftest.Fleet (test modules import nothing from conftest)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 120.0, interval: float = 0.25) -> None:
    """Poll until ``predicate()`` holds (a wait for a state, not an assertion on time)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for: {what}")
        time.sleep(interval)


# ---- load ---------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    gateway: str
    stream: bool
    ok: bool
    error: str = ""
    version: int | None = None
    fallback: bool = False
    citations_event: bool = False
    chunks: int = 0  # stream chunks received before the end (or the failure)


@dataclass
class Load:
    """``clients`` threads, each with its own official openai client on one gateway, half of them streaming."""

    gateways: list[str]
    api_key: str
    clients: int = 8
    max_tokens: int = 4
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _one(self, client: Any, gateway: str, stream: bool) -> Outcome:
        out = Outcome(gateway, stream, ok=False)
        kwargs: dict[str, Any] = {
            "model": ALIAS,
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": self.max_tokens,
        }
        try:
            if stream:
                last: Any = None
                for chunk in client.chat.completions.create(stream=True, **kwargs):
                    out.chunks += 1
                    last = chunk
                extra = (last.model_extra or {}) if last is not None else {}
                out.citations_event = last is not None and last.object == "tandem.citations" and "citations" in extra
            else:
                reply = client.chat.completions.create(**kwargs)
                extra = reply.model_extra or {}
                out.citations_event = "citations" in extra
            info = extra.get("tandem") or {}
            out.version = info.get("adapter_version")
            out.fallback = bool(info.get("fallback"))
            out.ok = True
        except Exception as exc:
            out.error = f"{type(exc).__name__}: {exc}"[:300]
        return out

    def _run(self, index: int) -> None:
        from openai import OpenAI

        gateway = self.gateways[index % len(self.gateways)]
        stream = index % 2 == 1
        client = OpenAI(base_url=f"{gateway}/v1", api_key=self.api_key, max_retries=0, timeout=120.0)
        with client:
            while not self._stop.is_set():
                self.outcomes.append(self._one(client, gateway, stream))

    def __enter__(self) -> Load:
        for i in range(self.clients):
            thread = threading.Thread(target=self._run, args=(i,), name=f"client-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(180)

    def count(self) -> int:
        return len(self.outcomes)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]


# ---- discovery: a DNS server for one name, and a TCP forward from 127.0.0.2 -----------------------------------
class NameServer:
    """A dnslib server on loopback answering ``name`` with the A records in ``addresses`` (NXDOMAIN when
    ``failing``); everything else NXDOMAIN."""

    def __init__(self, name: str, addresses: list[str]) -> None:
        from dnslib import QTYPE, RCODE, RR, A
        from dnslib.server import BaseResolver, DNSLogger, DNSServer

        self.name = name
        self.addresses = list(addresses)
        self.failing = False
        outer = self

        class Answer(BaseResolver):  # type: ignore[misc]
            def resolve(self, request: Any, handler: Any) -> Any:
                reply = request.reply()
                q = request.q
                if str(q.qname).rstrip(".") != outer.name or outer.failing:
                    reply.header.rcode = RCODE.NXDOMAIN
                elif q.qtype == QTYPE.A:
                    for address in list(outer.addresses):
                        reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(address), ttl=1))
                return reply

        self.server = DNSServer(
            Answer(), port=0, address="127.0.0.1", logger=DNSLogger(log="-request,-reply,-truncated,-error")
        )
        self.server.start_thread()
        self.port = int(self.server.server.server_address[1])

    def stop(self) -> None:
        self.server.stop()


class Forward:
    """Plain TCP forwarding from ``listen`` to ``target`` (both on loopback), one thread per direction."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with socket.create_connection(target) as upstream:
                    back = threading.Thread(target=pump, args=(upstream, self.request), daemon=True)
                    back.start()
                    pump(self.request, upstream)
                    back.join()

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(listen, Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="forward", daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- tests -------------------------------------------------------------------------------------------------


def _switch_via_gateway(fleet: Fleet, gateway: str, action: str, version: int | None = None) -> int:
    body: dict[str, Any] = {"alias": ALIAS} | ({"version": version} if version is not None else {})
    with fleet.admin(gateway) as client:
        reply = client.post(f"/v1/admin/adapters/{action}", json=body)
    assert reply.status_code == 200, reply.text
    return int(reply.json()["version"])


def _switch_via_cli(fleet: Fleet, action: str, version: int | None = None) -> int:
    """`tandem promote` / `rollback` with no gateway reachable: the registry is switched in Postgres directly,
    and the gateways must learn it from there."""
    from components import registry
    from components.db import connect
    from components.training import promotion

    if action == "rollback":
        with connect() as conn:
            version = registry.rollback_target(conn, ALIAS).version
    # Staged first (loaded and warmed on every replica, as the retraining DAG does for a candidate that passed
    # the gate), so the registry commit is only the switch; a cold version would wait for its load on every replica.
    with fleet.admin(fleet.gateways[1]) as client:
        staged = client.post("/v1/admin/adapters/stage", json={"alias": ALIAS, "version": version})
    assert staged.status_code == 200, staged.text
    cli = fleet.settings.model_copy(update={"gateway_port": free_port()})
    result = promotion.rollback(cli, ALIAS) if action == "rollback" else promotion.promote(cli, ALIAS, version or 0)
    assert result.via == "registry", result
    return result.version


def test_switches_through_both_gateways_and_the_cli_fail_no_request(fleet: Fleet) -> None:
    a, b = fleet.gateways
    v = fleet.versions
    steps = [
        ("gateway A promotes", lambda: _switch_via_gateway(fleet, a, "promote", v[1])),
        ("gateway B rolls back", lambda: _switch_via_gateway(fleet, b, "rollback")),
        ("the CLI promotes", lambda: _switch_via_cli(fleet, "promote", v[2])),
        ("gateway B promotes", lambda: _switch_via_gateway(fleet, b, "promote", v[3])),
        ("the CLI rolls back", lambda: _switch_via_cli(fleet, "rollback")),
        ("gateway A rolls back", lambda: _switch_via_gateway(fleet, a, "rollback")),
    ]
    propagation: dict[str, float] = {}
    with Load(fleet.gateways, fleet.api_key, clients=8) as load:
        wait_for(lambda: load.count() >= 8, "the clients' first answers")
        for what, switch in steps:
            version = switch()
            committed = time.monotonic()
            assert fleet.registry_champion() == version, what
            wait_for(
                lambda version=version: all(fleet.serving(gw) == (version, True) for gw in fleet.gateways),
                f"both gateways serving v{version} after {what}",
                timeout=30,
                interval=0.05,
            )
            propagation[what] = time.monotonic() - committed
            done = load.count()
            wait_for(lambda done=done: load.count() >= done + 4, f"answers after {what}")
    failures = load.failures()
    assert not failures, [f.error for f in failures[:5]]
    assert all(o.citations_event for o in load.outcomes), "an answer ended without its citations"
    assert {o.stream for o in load.outcomes} == {True, False}
    assert {o.gateway for o in load.outcomes} == set(fleet.gateways)
    fallbacks = [o for o in load.outcomes if o.fallback]
    assert not fallbacks, f"{len(fallbacks)} answer(s) from the base model: a replica lacked a routed version"
    print("propagation s:", {what: round(s, 3) for what, s in propagation.items()}, "answers:", load.count())
    # How fast (issue 16's 2 s) is measured by `tandem bench fleet`, not asserted here: on 2 shared cores a switch
    # took 2.07 s once. What this test holds is that it happens (the 30 s wait above) and loses no request.


def _since_restart(log: str) -> list[str]:
    """The access-log lines vLLM wrote since its last start (process.start writes the 'starting:' marker)."""
    tail = log.rsplit("starting:", 1)[-1]
    return re.findall(r'"(?:POST|GET) (/v1/[a-z_/]+)', tail)


def test_a_killed_replica_fails_no_unanswered_request_and_gets_champions_before_traffic(fleet: Fleet) -> None:
    from components.stack import manager, process

    name = "vllm-2"
    log = fleet.replica_log(name)
    with Load(fleet.gateways, fleet.api_key, clients=4) as load:
        wait_for(lambda: load.count() >= 4, "the clients' first answers")
        record = process.read_record(fleet.settings.run_dir, name)
        assert record is not None and process.is_alive(record)
        os.killpg(record.pid, signal.SIGKILL)
        killed_at = load.count()
        wait_for(lambda: load.count() >= killed_at + 8, "answers from the surviving replica")
        manager.up(fleet.settings, only=["vllm"])  # starts the missing replica again, on its port
        champion = fleet.registry_champion()
        served = next(a["served_name"] for a in fleet.snapshot(fleet.gateways[0])["aliases"] if a["alias"] == ALIAS)
        url = fleet.replicas[1]

        def holds_champion(gateway: str) -> bool:
            replica = next(r for r in fleet.snapshot(gateway)["replicas"] if r["url"] == url)
            return bool(replica["healthy"] and served in replica["loaded"])

        wait_for(lambda: all(holds_champion(gw) for gw in fleet.gateways), f"the restarted replica holding v{champion}")

        def traffic_after_warm_up() -> bool:
            calls = _since_restart(log.read_text(errors="replace"))
            return calls.count("/v1/chat/completions") > calls.count("/v1/load_lora_adapter") + 2

        wait_for(traffic_after_warm_up, "answers from the restarted replica")
    calls = [c for c in _since_restart(log.read_text(errors="replace")) if c != "/v1/models"]
    assert calls.index("/v1/load_lora_adapter") < calls.index("/v1/chat/completions"), calls[:6]
    # Only a stream that had sent tokens may break with its replica; every other request is answered.
    lost = [o for o in load.failures() if not (o.stream and o.chunks > 0)]
    assert not lost, [o.error for o in lost[:5]]
    assert all(o.citations_event for o in load.outcomes if o.ok)


def test_discovery_admits_a_replica_with_its_champions_and_drops_a_removed_one(fleet: Fleet) -> None:
    import uvicorn

    from serving import metrics as m
    from serving.app import create_app

    name = "replicas.fleet.test"
    first, second = (int(url.rsplit(":", 1)[1]) for url in fleet.replicas)
    forward = Forward(("127.0.0.2", first), ("127.0.0.1", second))  # replica 2 at 127.0.0.2 on replica 1's port
    dns = NameServer(name, ["127.0.0.1"])
    port = free_port()
    settings = fleet.settings.model_copy(
        update={
            "vllm_urls": [f"dns+http://{name}:{first}"],
            "discovery_nameserver": f"127.0.0.1:{dns.port}",
            "discovery_interval_s": 0.5,
            "gateway_port": port,
        }
    )
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="gateway-c", daemon=True)
    thread.start()
    gateway = f"http://127.0.0.1:{port}"
    joined, left = f"http://127.0.0.2:{first}", f"http://127.0.0.1:{first}"

    def lookup_errors() -> float:
        return m.REGISTRY.get_sample_value("tandem_discovery_errors_total", {"name": name}) or 0.0

    samples: list[tuple[bool, int, bool]] = []  # the joining replica: (admitted, outstanding, holds champion)
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            gw = app.state.gateway
            champ = gw.adapters.champions.get(ALIAS)
            for r in gw.pool.replicas:
                if r.url == joined:
                    samples.append((r.admitted, r.outstanding, champ is not None and champ.served_name in r.loaded))
            time.sleep(0.005)

    try:
        wait_for(lambda: server.started, "gateway C started")
        champion = fleet.registry_champion()
        wait_for(lambda: fleet.serving(gateway) == (champion, True), f"gateway C serving v{champion}")
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        pool = app.state.gateway.pool
        with Load([gateway], fleet.api_key, clients=4) as load:
            wait_for(lambda: load.count() >= 4, "gateway C's first answers")
            dns.addresses = ["127.0.0.1", "127.0.0.2"]
            wait_for(lambda: any(out > 0 for _, out, _ in samples), "traffic on the replica that joined")
            errors = lookup_errors()
            dns.failing = True  # the name stops resolving: the last known replicas stay
            wait_for(lambda: lookup_errors() > errors, "a failed lookup")
            assert [r.url for r in pool.replicas] == [left, joined]
            dns.failing = False
            dns.addresses = ["127.0.0.2"]
            wait_for(lambda: [r.url for r in pool.replicas] == [joined], "the removed replica out of the pool")
            done = load.count()
            wait_for(lambda: load.count() >= done + 8, "answers after the removal")
        sampling.set()
        sampler.join(5)
    finally:
        sampling.set()
        server.should_exit = True
        thread.join(30)
        forward.stop()
        dns.stop()
    failures = load.failures()
    assert not failures, [f.error for f in failures[:5]]
    assert all(o.citations_event and not o.fallback for o in load.outcomes)
    assert samples[0][0] is False, "the joining replica was in rotation before it was warmed"
    assert all(held for admitted, _, held in samples if admitted), "admitted without the champion"
    assert all(admitted for admitted, out, _ in samples if out > 0), "traffic before admission"
    assert (m.REGISTRY.get_sample_value("tandem_discovery_admitted_total") or 0) >= 1


# ---- discovery without vLLM: entries, lookups, the pool ------------------------------------------------------
@pytest.mark.parametrize(
    "entry", ["dns+http://vllm-headless", "ftp://vllm:8000", "http://", "vllm:8000", "dns+http://vllm:8000/v1"]
)
def test_a_malformed_replica_entry_is_refused_in_one_line(entry: str) -> None:
    from components.errors import ConfigError
    from serving.discovery import parse_entry

    with pytest.raises(ConfigError, match="TANDEM_VLLM_URLS entry") as caught:
        parse_entry(entry)
    assert "\n" not in str(caught.value)


def test_a_dns_name_resolves_to_one_replica_per_address_and_keeps_the_last_set_when_it_fails() -> None:
    from components.settings import Settings
    from serving import metrics as m
    from serving.discovery import Discovery

    dns = NameServer("vllm.discovery.test", ["127.0.0.1", "127.0.0.2"])
    try:
        settings = Settings(
            vllm_urls=["dns+http://vllm.discovery.test:8100", "http://10.1.2.3:9000"],
            discovery_nameserver=f"127.0.0.1:{dns.port}",
        )
        discovery = Discovery(settings)
        assert discovery.dynamic
        assert discovery.resolve() == ["http://127.0.0.1:8100", "http://127.0.0.2:8100", "http://10.1.2.3:9000"]
        dns.addresses = ["127.0.0.3"]
        assert discovery.resolve() == ["http://127.0.0.3:8100", "http://10.1.2.3:9000"]
        errors = m.REGISTRY.get_sample_value("tandem_discovery_errors_total", {"name": "vllm.discovery.test"}) or 0
        dns.failing = True
        assert discovery.resolve() == ["http://127.0.0.3:8100", "http://10.1.2.3:9000"]
        after = m.REGISTRY.get_sample_value("tandem_discovery_errors_total", {"name": "vllm.discovery.test"})
        assert after == errors + 1
    finally:
        dns.stop()


def test_a_joining_replica_gets_no_request_until_admitted_and_a_leaving_one_none_after() -> None:
    from serving.replicas import NoReplicaError, ReplicaPool

    pool = ReplicaPool(["http://127.0.0.1:1"])
    old = pool.replicas[0]
    old.mark(True)
    added, removed = pool.sync(["http://127.0.0.1:1", "http://127.0.0.2:1"])
    assert [r.url for r in added] == ["http://127.0.0.2:1"] and not removed
    new = added[0]
    new.mark(True)
    assert {pool.pick().url for _ in range(4)} == {old.url}  # healthy, not admitted: no traffic
    pool.admit(new)
    assert {pool.pick().url for _ in range(4)} == {old.url, new.url}
    with pool.track(old):  # a request in flight on the replica that leaves finishes there
        added, removed = pool.sync(["http://127.0.0.2:1"])
        assert removed == [old] and old.outstanding == 1
        assert {pool.pick().url for _ in range(4)} == {new.url}
    assert old.outstanding == 0
    pool.sync([])
    with pytest.raises(NoReplicaError):
        pool.pick()

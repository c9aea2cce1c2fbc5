"""A fleet on one machine: 2 real vLLM replicas and 2 gateways started by `tandem up`'s manager, once per run.

Loopback only. Load comes from the official ``openai`` client (no retries of its own, so every failure counts).
Gateway C of the discovery test runs in this process and finds replicas through a DNS server of ours (dnslib)
that answers for one name: 127.0.0.1 is replica 1, 127.0.0.2 a TCP forward to replica 2 (A records carry no
port, and both replicas listen on 127.0.0.1 on consecutive ports).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

ALIAS = "fleettest"
DOCS = {
    "lock.md": "# Corran Lock\n\n## Opening hours\n\nCorran Lock opens for transits two hours either side of high "
    "water. The lock keeper on duty is reached on VHF channel 14.\n",
    "berths.md": "# Heron Berths\n\n## Booking\n\nHeron Berths H1 to H8 on Fennick Pier are booked through the "
    "berth office at least 48 hours before arrival.\n",
}
# What each gateway of the fleet is started with (tiny answers, a fast safety-net reconcile round).
GATEWAY_ENV = {
    "TANDEM_VLLM_REPLICAS": "2",
    "TANDEM_GATEWAY_REPLICAS": "2",
    "TANDEM_RECONCILE_INTERVAL_S": "1.0",
    "TANDEM_MAX_TOKENS_LIMIT": "16",
    "TANDEM_DEFAULT_MAX_TOKENS": "4",
    "TANDEM_ADAPTER_DRAIN_GRACE_S": "2",
    "TANDEM_RATE_LIMIT_REQUESTS_PER_MINUTE": "0",
    "TANDEM_RATE_LIMIT_TOKENS_PER_MINUTE": "0",
    # two vLLM servers starting at once on 2 busy cores took over 240 s here
    "TANDEM_STARTUP_TIMEOUT_S": "900",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_adapter(base_model_dir: str, folder: Path, seed: int, rank: int = 8) -> Path:
    """A real peft adapter with random weights (as tests/serving makes them): no training needed."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, torch_dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


@dataclass
class Fleet:
    """The running fleet: gateway URLs, replica URLs, keys, registered versions of the test alias."""

    settings: Any
    gateways: list[str]
    replicas: list[str]
    api_key: str
    admin_key: str
    versions: list[int]
    started: list[str]

    def admin(self, gateway: str) -> httpx.Client:
        return httpx.Client(base_url=gateway, headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=120)

    def snapshot(self, gateway: str) -> dict[str, Any]:
        with self.admin(gateway) as client:
            result: dict[str, Any] = client.get("/v1/admin/adapters").json()
        return result

    def serving(self, gateway: str) -> tuple[int | None, bool]:
        """The alias's champion version on ``gateway``, and whether it answers with it (not the base model)."""
        entry = next((a for a in self.snapshot(gateway)["aliases"] if a["alias"] == ALIAS), None)
        if entry is None:
            return None, False
        return entry["champion_version"], not entry["fallback"]

    def registry_champion(self) -> int | None:
        from components import registry
        from components.db import connect

        with connect() as conn:
            champ = registry.get_champion(conn, ALIAS)
        return champ.version if champ else None

    def replica_log(self, name: str) -> Path:
        return Path(self.settings.run_dir) / f"{name}.log"


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 120.0, interval: float = 0.25) -> None:
    """Poll until ``predicate()`` holds (a wait for a state, not an assertion on time)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for: {what}")
        time.sleep(interval)


# Module scope, not "package": tests/ has no __init__.py files, and there pytest keeps a package-scoped fixture
# until the end of the session, which left the fleet (and TANDEM_VLLM_REPLICAS=2) running under every later test.
@pytest.fixture(scope="module")
def fleet(base_model_dir: str, pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """2 vLLM replicas and 2 gateways on consecutive ports, the test alias's v1 champion, two tiny documents."""
    from components import registry
    from components.db import connect
    from components.ingest.sync import sync_documents
    from components.keys import admin_secret, client_secret
    from components.settings import get_settings
    from components.stack import manager

    root = tmp_path_factory.mktemp("fleet")
    docs = root / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    saved = {k: os.environ.get(k) for k in GATEWAY_ENV}
    os.environ.update(GATEWAY_ENV)  # the gateways' processes read their settings from the environment
    get_settings.cache_clear()
    settings = get_settings()
    sync_documents(str(docs), settings=settings.model_copy(update={"ingest_allowed_roots": [str(docs)]}))
    adapters = [make_adapter(base_model_dir, root / f"a{i}", seed=i) for i in (1, 2)]
    with connect() as conn:
        versions = [
            registry.register_candidate(
                conn,
                alias=ALIAS,
                base_model="smollm2-135m",
                dataset_version="fleet-test",
                dataset_size=1,
                hyperparameters={"r": 8},
                metrics={},
                artifact_uri=str(adapters[i % 2]),  # one folder may back several versions (each its own name)
                lora_rank=8,
            ).version
            for i in range(5)
        ]
        registry.set_champion(conn, ALIAS, versions[0], actor="cli:tests")
        conn.commit()
    started: list[str] = []

    def event(name: str, msg: str) -> None:
        if msg == "starting":
            started.append(name)

    # A gateway some earlier fixture left on these ports would be taken for one of ours ("already up").
    taken = [s.name for s in manager.status(settings, ["gateway"]) if s.state != "down"]
    assert not taken, f"{', '.join(taken)} already running before the fleet test: an earlier fixture outlived its tests"
    try:
        items = manager.up(settings, only=["postgres", "vllm", "gateway"], on_event=event)
        urls = {i.name: i.url.removesuffix("/v1") for i in items}
        fleet = Fleet(
            settings=settings,
            gateways=[urls["gateway"], urls["gateway-2"]],
            replicas=[urls["vllm"], urls["vllm-2"]],
            api_key=client_secret(settings) or "",
            admin_key=admin_secret(settings) or "",
            versions=versions,
            started=started,
        )
        for gw in fleet.gateways:
            wait_for(lambda gw=gw: fleet.serving(gw) == (versions[0], True), f"v1 served by {gw}")
        yield fleet
    finally:
        for name in reversed(started):
            manager._stop(name, settings)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()
        shutil.rmtree(root, ignore_errors=True)

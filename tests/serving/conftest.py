"""Gateway fixtures: real peft adapters, a few indexed documents, and the gateway served in-process by uvicorn."""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

ALIAS = "gwtest"
# Keys are configured as name:secret; tests send the secret. Fresh random secrets per session (placeholders and
# short secrets are refused at start-up).
API_KEY_NAME, ADMIN_KEY_NAME = "tests-client", "tests-admin"
API_KEY = secrets.token_urlsafe(24)
ADMIN_KEY = secrets.token_urlsafe(24)

DOCS = {
    "lock.md": "# Corran Lock\n\n## Opening hours\n\nCorran Lock opens for transits two hours either side of high "
    "water. The lock keeper on duty is reached on VHF channel 14.\n",
    "berths.md": "# Heron Berths\n\n## Booking\n\nHeron Berths H1 to H8 on Fennick Pier are booked through the "
    "berth office at least 48 hours before arrival. Late bookings pay a surcharge of 15 percent.\n",
    "spill.md": "# Spill response\n\n## First actions\n\nA diesel sheen is reported to Lantern House at once. The "
    "duty officer deploys the boom stored at the Gull Berths.\n",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _make_adapter(base_model_dir: str, folder: Path, seed: int, rank: int = 8) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, torch_dtype=torch.float32)
    # init_lora_weights=False: B is random too, so the adapter really changes the outputs (no training needed).
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


@dataclass
class Adapters:
    v1: Path
    v2: Path
    corrupt: Path
    too_big: Path


@pytest.fixture(scope="session")
def peft_adapters(base_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Adapters:
    """Two real adapters, a corrupt one (garbage weights) and one whose rank exceeds max_lora_rank."""
    root = tmp_path_factory.mktemp("adapters")
    v1 = _make_adapter(base_model_dir, root / "v1", seed=1)
    v2 = _make_adapter(base_model_dir, root / "v2", seed=2)
    corrupt = root / "corrupt"
    shutil.copytree(v1, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken" + b"\x00" * 64)
    too_big = root / "too_big"
    shutil.copytree(v1, too_big)
    config = json.loads((too_big / "adapter_config.json").read_text())
    config["r"] = 64
    (too_big / "adapter_config.json").write_text(json.dumps(config))
    return Adapters(v1, v2, corrupt, too_big)


def register(conn: Any, path: Path, rank: int = 8) -> int:
    from components import registry

    version = registry.register_candidate(
        conn,
        alias=ALIAS,
        base_model="smollm2-135m",
        dataset_version="test",
        dataset_size=1,
        hyperparameters={"r": rank},
        metrics={},
        artifact_uri=str(path),
        lora_rank=rank,
    )
    conn.commit()
    return version.version


@pytest.fixture(scope="session")
def indexed_docs(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Three tiny documents indexed by the ingestion pipeline; returns the folder (its name is the source)."""
    from components.ingest.sync import sync_documents
    from components.settings import get_settings

    folder = tmp_path_factory.mktemp("gwdocs")
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    get_settings.cache_clear()
    settings = get_settings().model_copy(update={"ingest_allowed_roots": [str(folder)]})  # only this folder
    sync_documents(str(folder), settings=settings)
    return str(folder)


@dataclass
class Gateway:
    """The running gateway and what tests need around it (test modules import nothing from conftest)."""

    url: str
    versions: dict[str, int]
    adapters: Adapters
    alias: str = ALIAS
    api_key: str = API_KEY
    admin_key: str = ADMIN_KEY
    api_key_name: str = API_KEY_NAME
    admin_key_name: str = ADMIN_KEY_NAME
    base_model: str = "smollm2-135m"

    def client(self, key: str = API_KEY) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def admin(self) -> httpx.Client:
        return self.client(ADMIN_KEY)

    def register(self, path: Path, rank: int = 8) -> int:
        from components.db import connect

        with connect() as conn:
            return register(conn, path, rank)

    def set_champion(self, version: int) -> None:
        """Switch the champion in the registry directly, as `tandem promote` does when the gateway is down."""
        from components import registry
        from components.db import connect

        with connect() as conn:
            registry.set_champion(conn, ALIAS, version, actor="cli:tests")
            conn.commit()

    def snapshot(self) -> dict[str, Any]:
        with self.admin() as client:
            result: dict[str, Any] = client.get("/v1/admin/adapters").json()
        return result

    def champion_loaded(self, version: int) -> bool:
        entry = next((a for a in self.snapshot()["aliases"] if a["alias"] == ALIAS), None)
        return bool(entry and entry["champion_version"] == version and not entry["fallback"])

    @staticmethod
    def wait_for(predicate: Any, what: str, timeout: float = 90.0) -> None:
        """Poll until ``predicate()`` is true (a wait for a state, never an assertion on time)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for: {what}")
            time.sleep(0.25)


@pytest.fixture(scope="package")
def gateway(vllm_server: str, pg_url: str, indexed_docs: str, peft_adapters: Adapters) -> Iterator[Gateway]:
    """The gateway app served by uvicorn in a thread, with v1 of the test alias as champion at start-up."""
    import uvicorn

    from components import registry
    from components.db import connect
    from components.settings import Settings
    from serving.app import create_app

    with connect() as conn:
        versions = {
            "v1": register(conn, peft_adapters.v1),
            "v2": register(conn, peft_adapters.v2),
        }
        registry.set_champion(conn, ALIAS, versions["v1"])
        conn.commit()
    port = _free_port()
    settings = Settings(
        gateway_port=port,
        reconcile_interval_s=1.0,
        max_tokens_limit=16,
        default_max_tokens=8,
        max_messages=8,
        max_top_k=10,
        max_body_bytes=64 * 1024,
        api_keys=[f"{API_KEY_NAME}:{API_KEY}"],
        admin_api_keys=[f"{ADMIN_KEY_NAME}:{ADMIN_KEY}"],
    )
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.1)
    gw = Gateway(f"http://127.0.0.1:{port}", versions, peft_adapters)
    gw.wait_for(lambda: gw.champion_loaded(versions["v1"]), "v1 loaded by the reconciler")
    try:
        yield gw
    finally:
        server.should_exit = True
        thread.join(30)

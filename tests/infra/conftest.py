"""Shared helpers for the infra tests: paths and the system tools they drive."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA = REPO_ROOT / "infra"
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: run `make system` (Debian's prometheus package ships it)")
    return path

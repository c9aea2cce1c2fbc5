"""`tandem bench ingest` on a tiny corpus (Tandem's side only): the benchmark's own bookkeeping is right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_bench_ingest_small_run_reports_consistent_figures(pg_url: str, tmp_path: Path) -> None:
    out = tmp_path / "ingest.json"
    # The benchmark's generated corpus lies in the state dir, outside the default allowed roots.
    env = {**os.environ, "TANDEM_INGEST_ALLOWED_ROOTS": str(Path(os.environ["TANDEM_STATE_DIR"]) / "bench")}
    done = subprocess.run(
        [sys.executable, "-m", "components.cli", "bench", "ingest", "--docs", "100", "--skip-peer", "--raw-sample",
         "16", "--out", str(out), "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(out.read_text())
    assert json.loads(done.stdout) == r
    initial, unchanged, edited = r["tandem"]["phases"]
    assert initial["added"] == 100 and initial["chunks_embedded"] == initial["chunks_written"] > 0
    assert unchanged["chunks_embedded"] == 0 and unchanged["unchanged"] == 100
    assert edited["updated"] == r["edited"] == 5 and edited["deleted"] == r["deleted"] == 1
    assert r["tandem"]["deleted_chunks_left"] == 0
    assert r["raw_sample"] == 16 and len(r["raw_before_after_chunks_per_s"]) == 2
    assert r["raw_model_chunks_per_s"] == pytest.approx(sum(r["raw_before_after_chunks_per_s"]) / 2, abs=0.01)
    assert r["summary"]["tandem_initial_vs_raw"] > 0 and "langchain" not in r


def test_bench_ingest_refuses_a_tiny_corpus() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "components.cli", "bench", "ingest", "--docs", "3", "--skip-peer"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "--docs must be at least 10" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

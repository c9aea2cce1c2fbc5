"""The gateway benchmark's own arithmetic: CPU accounting from /proc and rows merged over rounds."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from components.bench.gateway import _cpu_seconds, _row


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cpu_seconds_counts_the_process_and_its_children() -> None:
    assert _cpu_seconds(None) == 0.0
    parent = os.getpid()
    before = _cpu_seconds(parent)
    spin_then_sleep = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", spin_then_sleep])
    try:
        deadline = time.monotonic() + 30
        while _cpu_seconds(child.pid) < 0.9 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _cpu_seconds(child.pid) >= 0.9
        # The child's second of CPU shows up in the parent's tree while the child runs.
        assert _cpu_seconds(parent) - before >= 0.9
    finally:
        child.kill()
        child.wait()
    assert _cpu_seconds(2**22 + 7) == 0.0  # no such process: nothing, not an error


def test_row_merges_rounds_over_their_summed_wall_time() -> None:
    runs = [
        {"clients": 16, "latencies": [1.0, 2.0, 3.0], "errors": 1, "wall": 2.0},
        {"clients": 16, "latencies": [4.0, 5.0], "errors": 0, "wall": 3.0},
    ]
    row = _row(runs, {"gateway": 0.06, "vllm": 3.0})
    assert (row["clients"], row["requests"], row["errors"]) == (16, 6, 1)
    assert row["req_per_s"] == 1.0  # 5 answered in 5 s of wall time
    assert row["p50_ms"] == 3000.0 and row["p95_ms"] == 5000.0
    assert row["gateway_cpu_ms_per_request"] == 10.0 and row["vllm_cpu_ms_per_request"] == 500.0

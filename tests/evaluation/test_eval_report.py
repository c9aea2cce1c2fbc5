"""The report files written from a fixed EvalReport: Markdown table, PNG chart, JSON copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.evaluation import format_table
from components.evaluation.report import write_report
from components.evaluation.results import EvalReport

from .conftest import build_report


def test_text_table_has_every_arm(fixed_report: EvalReport) -> None:
    text = format_table(fixed_report)
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["arm", "model"]
    assert any(line.startswith("adapter + retrieval") and "83% (5/6)" in line for line in lines)
    assert any(line.startswith("base alone") and "17% (1/6)" in line for line in lines)
    assert lines[-1] == "retrieval alone (top 5 chunks, 6 questions): recall@5 83%, MRR 0.70, p50 0.020 s"


def test_report_files_are_written(fixed_report: EvalReport, tmp_path: Path) -> None:
    out = write_report(fixed_report, tmp_path / "eval" / "run1")
    assert sorted(p.name for p in out.iterdir()) == ["chart.png", "report.json", "report.md"]
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "chart.png").stat().st_size > 10_000
    md = (out / "report.md").read_text()
    assert "| adapter + retrieval | harbour (v3) | 83% (5/6) | 50% | 33% | 2.25 | 2.48 | 800 | 10.0 | 0 |" in md
    assert "| base alone | smollm2-135m | 17% (1/6) | - | - | 0.75 | 0.97 | 40 | 10.0 | 0 |" in md
    assert "![accuracy, latency and tokens per arm](chart.png)" in md
    assert "35 documents, 420 chunks (all-MiniLM-L6-v2:384)" in md
    assert "Retrieval alone (top 5 chunks, 6 questions): recall@5 83%, MRR 0.70" in md
    assert "| q3 | no | no | yes | yes |" in md  # per-question matrix
    assert "answers cited by the gateway: base + retrieval 2/6, adapter + retrieval 2/6" in md
    data = json.loads((out / "report.json").read_text())
    assert data["arms"][3]["accuracy"] == pytest.approx(5 / 6)
    assert len(data["arms"][0]["answers"]) == 6
    assert fixed_report.out_dir == str(out)
    # No temporary folder is left beside the report.
    assert [p.name for p in out.parent.iterdir()] == ["run1"]


def test_report_without_adapter_and_no_overwrite(tmp_path: Path) -> None:
    report = build_report(with_adapter=False)
    out = write_report(report, tmp_path / "r")
    md = (out / "report.md").read_text()
    assert "| adapter alone | harbour | no adapter | - |" in md
    assert "has no champion adapter" in md
    with pytest.raises(FileExistsError):
        write_report(report, out)

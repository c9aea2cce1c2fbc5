"""Scores stored in the real Postgres and exported by the Prometheus collector (checked by promtool)."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from components.evaluation.store import index_state, latest_scores, save_report
from serving.eval_metrics import EvalScoresCollector

from .conftest import build_report


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_save_and_export_latest_scores(db: Any, settings: Any) -> None:
    older = build_report(with_adapter=False)
    older.alias = "store-test"
    save_report(db, older)
    report = build_report()
    report.alias = "store-test"
    report.finished_at = report.finished_at.replace(hour=4)
    run_id = save_report(db, report)
    assert report.run_id == run_id

    rows = db.execute(
        "SELECT arm, status, correct, accuracy FROM evaluation_scores WHERE run_id = %s ORDER BY arm", (run_id,)
    ).fetchall()
    assert rows[1][:3] == ("adapter_rag", "ok", 5)
    answers = db.execute("SELECT count(*) FROM evaluation_answers WHERE run_id = %s", (run_id,)).fetchone()
    assert answers[0] == 24

    latest = {s.arm: s for s in latest_scores(db) if s.alias == "store-test"}
    assert set(latest) == {"base", "base_rag", "adapter", "adapter_rag"}
    assert {s.run_id for s in latest.values()} == {run_id}
    assert latest["adapter_rag"].accuracy == pytest.approx(5 / 6)

    registry = CollectorRegistry()
    registry.register(EvalScoresCollector(settings))
    samples = _samples(registry)
    key = (("adapter_version", "3"), ("alias", "store-test"), ("arm", "adapter_rag"))
    assert samples[("tandem_eval_accuracy", key)] == pytest.approx(5 / 6)
    assert samples[("tandem_eval_source_hit_rate", key)] == pytest.approx(0.5)
    assert samples[("tandem_eval_source_attributed_rate", key)] == pytest.approx(1 / 3)  # read back from Postgres
    assert samples[("tandem_eval_latency_p50_seconds", key)] == pytest.approx(2.25)
    assert samples[("tandem_eval_retrieval_recall_at_k", (("alias", "store-test"), ("k", "5")))] == pytest.approx(5 / 6)
    assert samples[("tandem_eval_mrr", (("alias", "store-test"),))] == pytest.approx(0.7)
    assert samples[("tandem_eval_scrape_ok", ())] == 1.0
    base_key = (("adapter_version", ""), ("alias", "store-test"), ("arm", "base"))
    assert ("tandem_eval_source_hit_rate", base_key) not in samples  # no retrieval in that arm
    assert ("tandem_eval_source_attributed_rate", base_key) not in samples

    if shutil.which("promtool"):
        check = subprocess.run(
            ["promtool", "check", "metrics"], input=generate_latest(registry), capture_output=True, check=False
        )
        assert check.returncode == 0, check.stderr.decode() + check.stdout.decode()


def test_collector_reports_database_down_instead_of_failing(settings: Any) -> None:
    settings = settings.model_copy(update={"database_url": "postgresql://nobody@127.0.0.1:1/none"})
    registry = CollectorRegistry()
    registry.register(EvalScoresCollector(settings))  # registering reads nothing
    samples = _samples(registry)
    assert samples == {("tandem_eval_scrape_ok", ()): 0.0}


def test_index_state_reads_the_ingestion_tables(db: Any) -> None:
    state = index_state(db)
    assert state.documents is not None and state.documents >= 0
    db.rollback()

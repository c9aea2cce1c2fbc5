"""serving/pipeline_metrics.py against the real session Postgres: gauges follow the rows the pipelines write."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serving.pipeline_metrics import PipelineCollector, install


def _samples(collector: PipelineCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    collector._cached_at = float("-inf")  # read afresh
    out = {}
    for family in collector.collect():
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def collector(pg_url: str) -> PipelineCollector:
    @contextmanager
    def connection() -> Iterator[psycopg.Connection]:
        with psycopg.connect(pg_url) as conn:
            yield conn

    return PipelineCollector(connection)


def test_ingest_runs_documents_and_failures(collector: PipelineCollector, db: psycopg.Connection) -> None:
    before = _samples(collector)
    assert before[("tandem_pipeline_metrics_up", ())] == 1.0

    db.execute(
        "INSERT INTO documents (source, path, title, content_hash, size_bytes) VALUES "
        "('pm-test', 'a.md', 'A', 'h1', 10), ('pm-test', 'b.md', 'B', 'h2', 20)"
    )
    db.execute("INSERT INTO ingest_failures (source, path, reason) VALUES ('pm-test', 'bad.pdf', 'empty')")
    db.execute(
        "INSERT INTO ingest_runs (source, model_id, started_at, finished_at, report) VALUES "
        "('pm-test', 'm', now() - interval '90 seconds', now() - interval '30 seconds', %s)",
        (json.dumps({"chunks_embedded": 42}),),
    )
    db.commit()
    after = _samples(collector)
    assert after[("tandem_index_documents", ())] - before[("tandem_index_documents", ())] == 2
    assert after[("tandem_index_failed_documents", ())] - before[("tandem_index_failed_documents", ())] == 1
    assert after[("tandem_ingest_last_run_failed", ())] == 0.0
    assert after[("tandem_ingest_last_run_chunks_embedded", ())] == 42.0
    assert after[("tandem_ingest_last_run_duration_seconds", ())] == pytest.approx(60.0, abs=1.0)
    assert after[("tandem_index_last_success_timestamp_seconds", ())] > before.get(
        ("tandem_index_last_success_timestamp_seconds", ()), 0.0
    )

    # A run that started two hours ago and never finished crashed: the ingest alert's input goes to 1.
    db.execute(
        "INSERT INTO ingest_runs (source, model_id, started_at) VALUES ('pm-test', 'm', now() - interval '2 hours')"
    )
    db.commit()
    crashed = _samples(collector)
    assert crashed[("tandem_ingest_last_run_failed", ())] == 1.0
    assert crashed[("tandem_ingest_running", ())] == 0.0

    # A run in progress is neither failed nor stale.
    db.execute("INSERT INTO ingest_runs (source, model_id) VALUES ('pm-test', 'm')")
    db.commit()
    running = _samples(collector)
    assert running[("tandem_ingest_last_run_failed", ())] == 0.0
    assert running[("tandem_ingest_running", ())] == 1.0


def test_adapter_versions_and_scores(collector: PipelineCollector, db: psycopg.Connection) -> None:
    rows = [
        (1, "retired", {"qa": {"score": 0.4}, "val_loss": 1.9}),
        (2, "champion", {"qa": {"score": 0.6}, "val_loss": 1.2, "promoted": True}),
        (3, "rejected", {"qa": {"score": 0.5}, "note": "worse"}),
    ]
    for version, status, metrics in rows:
        db.execute(
            "INSERT INTO adapter_versions (alias, version, base_model, dataset_version, dataset_size, metrics, "
            "artifact_uri, lora_rank, status) VALUES ('pm-alias', %s, 'base', 'd', 10, %s, '/a', 8, %s)",
            (version, json.dumps(metrics), status),
        )
    db.commit()
    s = _samples(collector)
    assert s[("tandem_adapter_versions", (("alias", "pm-alias"), ("status", "rejected")))] == 1.0
    assert s[("tandem_adapter_registry_champion_version", (("alias", "pm-alias"),))] == 2.0
    assert s[("tandem_adapter_last_status_timestamp_seconds", (("alias", "pm-alias"), ("status", "rejected")))] > 0
    key = (("alias", "pm-alias"), ("metric", "qa_score"), ("status", "champion"), ("version", "2"))
    assert s[("tandem_adapter_score", key)] == 0.6
    # booleans and text are not scores
    assert not [k for k in s if k[0] == "tandem_adapter_score" and ("metric", "promoted") in k[1]]


def test_unreachable_database_serves_up_zero_only() -> None:
    @contextmanager
    def broken() -> Iterator[psycopg.Connection]:
        with psycopg.connect("postgresql://nobody@127.0.0.1:1/none", connect_timeout=1) as conn:
            yield conn

    s = _samples(PipelineCollector(broken))
    assert s == {("tandem_pipeline_metrics_up", ()): 0.0}


def test_install_registers_once_and_exposition_parses(pg_url: str) -> None:
    registry = CollectorRegistry(auto_describe=True)

    @contextmanager
    def connection() -> Iterator[psycopg.Connection]:
        with psycopg.connect(pg_url) as conn:
            yield conn

    first = install(registry, connection)
    second = install(registry, connection)  # a second app in the same process: no duplicate registration
    assert first is second
    names = {f.name for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert {"tandem_pipeline_metrics_up", "tandem_index_chunks", "tandem_adapter_score"} <= names

"""Pipeline gauges read from Postgres: index freshness and size, adapter versions and scores.

The pipelines (Airflow tasks, `tandem ingest`, `tandem train`) are short-lived processes with nothing to scrape;
what they leave is rows in Postgres (ingest_runs, documents, chunks, ingest_failures, adapter_versions). This
collector turns those rows into gauges. The gateway installs it behind a ``Snapshot``
(serving/scrape_snapshot.py): a worker thread refreshes it on a timer within a time budget, and a scrape only
copies the last snapshot, so a slow or stopped Postgres never blocks serving::

    install(metrics.REGISTRY, partial(gateway_db.pool.connection, timeout=2.0), statement_timeout_ms=2000)

Each refresh runs a handful of aggregate queries (milliseconds). When the database cannot be read, only
``tandem_pipeline_metrics_up 0`` is served (and ``tandem_pipeline_metrics_snapshot_age_seconds``, the age of
the last good read). Constructed directly, ``PipelineCollector`` reads at collect time (tests, tools).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serving.scrape_snapshot import Snapshot

log = logging.getLogger(__name__)

ConnectionFactory = Callable[[], AbstractContextManager[psycopg.Connection]]

# An ingest run still unfinished this long after it started is taken as failed (a crashed run never finishes).
STALE_RUN_SECONDS = 3600.0
# Adapter versions per alias whose scores are exported (newest first): keeps the series count bounded.
SCORED_VERSIONS_PER_ALIAS = 10

_SPECS: dict[str, tuple[str, list[str]]] = {
    "tandem_pipeline_metrics_up": ("1 if the pipeline tables could be read at the last refresh.", []),
    "tandem_index_documents": ("Documents in the index (all sources).", []),
    "tandem_index_chunks": ("Chunks in the active embedding generation (what retrieval reads).", []),
    "tandem_index_failed_documents": ("Documents that failed to load, retried on every run.", []),
    "tandem_index_last_success_timestamp_seconds": (
        "Unix time the last successful ingest run finished (0: none yet).",
        [],
    ),
    "tandem_ingest_last_run_failed": (
        f"1 if the newest ingest run never finished (crashed) within {STALE_RUN_SECONDS:.0f} s of its start.",
        [],
    ),
    "tandem_ingest_running": ("1 while an ingest run is in progress.", []),
    "tandem_ingest_last_run_duration_seconds": ("Wall time of the last finished ingest run.", []),
    "tandem_ingest_last_run_chunks_embedded": ("Chunks embedded by the last finished ingest run.", []),
    "tandem_adapter_versions": ("Adapter versions in the registry, by alias and status.", ["alias", "status"]),
    "tandem_adapter_registry_champion_version": ("The champion version each alias has in the registry.", ["alias"]),
    "tandem_adapter_last_status_timestamp_seconds": (
        "Unix time of the newest version of each alias that reached each status.",
        ["alias", "status"],
    ),
    "tandem_adapter_score": (
        "Numeric evaluation metrics of the newest adapter versions (from the registry's metrics column).",
        ["alias", "version", "status", "metric"],
    ),
}

_QUERIES = {
    "tables": """SELECT to_regclass('ingest_runs') IS NOT NULL, to_regclass('adapter_versions') IS NOT NULL""",
    "index": """
        SELECT (SELECT count(*) FROM documents),
               (SELECT coalesce(sum(dg.chunk_count), 0) FROM document_generations dg
                  JOIN embedding_generations g ON g.id = dg.generation_id WHERE g.status = 'active'),
               (SELECT count(*) FROM ingest_failures),
               (SELECT coalesce(extract(epoch FROM max(finished_at)), 0) FROM ingest_runs
                 WHERE finished_at IS NOT NULL)""",
    "last_run": """
        SELECT finished_at IS NOT NULL, extract(epoch FROM now() - started_at),
               extract(epoch FROM finished_at - started_at), coalesce((report->>'chunks_embedded')::float, 0)
          FROM ingest_runs ORDER BY id DESC LIMIT 1""",
    "last_finished": """
        SELECT extract(epoch FROM finished_at - started_at), coalesce((report->>'chunks_embedded')::float, 0)
          FROM ingest_runs WHERE finished_at IS NOT NULL ORDER BY id DESC LIMIT 1""",
    "versions": """
        SELECT alias, status, count(*), extract(epoch FROM max(updated_at)),
               max(version) FILTER (WHERE status = 'champion')
          FROM adapter_versions GROUP BY alias, status""",
    "scores": """
        SELECT alias, version, status, metrics FROM (
            SELECT alias, version, status, metrics,
                   row_number() OVER (PARTITION BY alias ORDER BY version DESC) AS n
              FROM adapter_versions) v
         WHERE n <= %s ORDER BY alias, version""",
}


def _numeric_items(metrics: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """Flatten nested numeric metrics ({"qa": {"score": 0.7}} -> "qa_score"); booleans and text are skipped."""
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            yield name, float(value)
        elif isinstance(value, dict):
            yield from _numeric_items(value, prefix=f"{name}_")


class PipelineCollector(Collector):
    """A prometheus-client collector reading the pipeline tables through ``connection()`` at each scrape."""

    def __init__(
        self, connection: ConnectionFactory, min_interval: float = 5.0, statement_timeout_ms: int | None = None
    ) -> None:
        self.connection = connection
        self.min_interval = min_interval
        self.statement_timeout_ms = statement_timeout_ms  # for this read only (SET LOCAL); None: the connection's
        self._lock = threading.Lock()
        self._cached: list[Metric] = []
        self._cached_at = float("-inf")

    def describe(self) -> Iterable[Metric]:
        # Registration must not query the database: families without samples are enough to describe.
        return [GaugeMetricFamily(name, doc, labels=labels) for name, (doc, labels) in _SPECS.items()]

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            now = time.monotonic()
            if now - self._cached_at >= self.min_interval:
                self._cached = self._read()
                self._cached_at = now
            return list(self._cached)

    def _read(self) -> list[Metric]:
        families = {name: GaugeMetricFamily(name, doc, labels=labels) for name, (doc, labels) in _SPECS.items()}
        try:
            with self.connection() as conn:
                self._fill(conn, families)
        except (psycopg.Error, OSError) as exc:
            log.warning("pipeline metrics: cannot read Postgres: %s", exc)
            families = {name: GaugeMetricFamily(name, doc, labels=labels) for name, (doc, labels) in _SPECS.items()}
            families["tandem_pipeline_metrics_up"].add_metric([], 0.0)
            return list(families.values())
        families["tandem_pipeline_metrics_up"].add_metric([], 1.0)
        return list(families.values())

    def _fill(self, conn: psycopg.Connection, f: dict[str, GaugeMetricFamily]) -> None:
        if self.statement_timeout_ms is not None:
            conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(self.statement_timeout_ms),))
        has_ingest, has_registry = conn.execute(_QUERIES["tables"]).fetchone() or (False, False)
        if has_ingest:
            row = conn.execute(_QUERIES["index"]).fetchone()
            assert row is not None
            documents, chunks, failed, last_success = row
            f["tandem_index_documents"].add_metric([], float(documents))
            f["tandem_index_chunks"].add_metric([], float(chunks))
            f["tandem_index_failed_documents"].add_metric([], float(failed))
            f["tandem_index_last_success_timestamp_seconds"].add_metric([], float(last_success))
            last = conn.execute(_QUERIES["last_run"]).fetchone()
            finished, age = (bool(last[0]), float(last[1])) if last else (True, 0.0)
            f["tandem_ingest_last_run_failed"].add_metric([], 0.0 if finished or age < STALE_RUN_SECONDS else 1.0)
            f["tandem_ingest_running"].add_metric([], 0.0 if finished or age >= STALE_RUN_SECONDS else 1.0)
            done = conn.execute(_QUERIES["last_finished"]).fetchone()
            if done:
                f["tandem_ingest_last_run_duration_seconds"].add_metric([], float(done[0]))
                f["tandem_ingest_last_run_chunks_embedded"].add_metric([], float(done[1]))
        if has_registry:
            for alias, status, count, changed_at, champion in conn.execute(_QUERIES["versions"]).fetchall():
                f["tandem_adapter_versions"].add_metric([alias, status], float(count))
                f["tandem_adapter_last_status_timestamp_seconds"].add_metric([alias, status], float(changed_at))
                if champion is not None:
                    f["tandem_adapter_registry_champion_version"].add_metric([alias], float(champion))
            rows = conn.execute(_QUERIES["scores"], (SCORED_VERSIONS_PER_ALIAS,)).fetchall()
            for alias, version, status, metrics in rows:
                for metric, value in _numeric_items(metrics or {}):
                    f["tandem_adapter_score"].add_metric([alias, str(version), status, metric], value)
        conn.rollback()  # read-only: leave no transaction open on a pooled connection


# registry -> (its snapshot, the one source behind it, the connection factories of the apps that installed it)
_INSTALLED: dict[int, tuple[Snapshot, PipelineCollector, list[ConnectionFactory]]] = {}


def install(
    registry: CollectorRegistry,
    connection: ConnectionFactory,
    statement_timeout_ms: int | None = None,
    stale_after: float = 60.0,
) -> PipelineCollector:
    """Register the collector, behind a snapshot, on ``registry`` once; a later call (a second app in one process)
    swaps its source until ``uninstall``. Refresh it with ``snapshot(registry).refresh()`` off the event loop."""
    entry = _INSTALLED.get(id(registry))
    if entry is None:
        collector = PipelineCollector(connection, statement_timeout_ms=statement_timeout_ms)
        snap = Snapshot(collector, "tandem_pipeline_metrics_up", "tandem_pipeline_metrics", stale_after)
        registry.register(snap)
        entry = _INSTALLED[id(registry)] = (snap, collector, [])
    snap, collector, stack = entry
    stack.append(connection)
    _use(entry, connection, statement_timeout_ms, stale_after)
    return collector


def uninstall(registry: CollectorRegistry, connection: ConnectionFactory) -> None:
    """Stop reading through ``connection`` (its app is shutting down): the app installed before it reads again."""
    entry = _INSTALLED.get(id(registry))
    if entry is None or connection not in entry[2]:
        return
    stack = entry[2]
    stack.remove(connection)
    if stack:
        _use(entry, stack[-1], entry[1].statement_timeout_ms, entry[0].stale_after)


def _use(
    entry: tuple[Snapshot, PipelineCollector, list[ConnectionFactory]],
    connection: ConnectionFactory,
    statement_timeout_ms: int | None,
    stale_after: float,
) -> None:
    snap, collector, _ = entry
    collector.connection = connection
    collector.statement_timeout_ms = statement_timeout_ms
    collector._cached_at = float("-inf")
    snap.stale_after = stale_after
    snap.reset()


def snapshot(registry: CollectorRegistry) -> Snapshot:
    return _INSTALLED[id(registry)][0]

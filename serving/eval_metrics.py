"""The latest evaluation scores as Prometheus gauges, read from Postgres.

A custom collector, so the numbers always match the database (no state kept in the gateway) and a gateway
restart loses nothing. The gateway installs it behind a ``Snapshot`` (serving/scrape_snapshot.py), refreshed off
the event loop within a time budget, so a scrape never waits for Postgres::

    eval_metrics.install(REGISTRY, settings, db.pool, timeout=2.0)

Constructed directly (``EvalScoresCollector(settings)``), it reads at collect time (tests, tools).

Series (latest run of each alias; arms ``base``, ``base_rag``, ``adapter``, ``adapter_rag``; arms not run,
such as adapter arms of an alias with no champion, export no sample):

- ``tandem_eval_accuracy{alias,arm,adapter_version}`` (0..1)
- ``tandem_eval_source_hit_rate{alias,arm,adapter_version}`` (retrieval arms)
- ``tandem_eval_source_attributed_rate{alias,arm,adapter_version}`` (retrieval arms: the answer stands on the
  expected source by the gateway's attributions)
- ``tandem_eval_latency_p50_seconds`` / ``tandem_eval_latency_p95_seconds{alias,arm,adapter_version}``
- ``tandem_eval_prompt_tokens_mean`` / ``tandem_eval_completion_tokens_mean{alias,arm,adapter_version}``
- ``tandem_eval_retrieval_recall_at_k{alias,k}``, ``tandem_eval_mrr{alias}``
- ``tandem_eval_questions{alias}``, ``tandem_eval_last_run_timestamp_seconds{alias}``
- ``tandem_adapter_stale{alias}``: 1 when the latest staleness check of the alias's champion found it below base+RAG
  on questions about changed documents (components/evaluation/staleness.py), else 0 (one sample per champion)
- ``tandem_eval_scrape_ok``: 0 when the database could not be read (the other series are then absent)
- ``tandem_eval_snapshot_age_seconds``: behind a snapshot, seconds since the database last answered
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import psycopg
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from components.settings import Settings
from serving.scrape_snapshot import Snapshot

if TYPE_CHECKING:
    from components.evaluation.store import StoredScore

log = logging.getLogger(__name__)

ARM_LABELS = ["alias", "arm", "adapter_version"]
# name suffix, help, StoredScore field
ARM_GAUGES = (
    ("accuracy", "Answer accuracy of an arm on the held-out QA set (latest run), 0..1.", "accuracy"),
    (
        "source_hit_rate",
        "Share of questions whose expected source is among the citations (retrieval arms), 0..1.",
        "source_hit_rate",
    ),
    (
        "source_attributed_rate",
        "Share of questions whose answer stands on the expected source by the gateway's attributions, 0..1.",
        "source_attributed_rate",
    ),
    ("latency_p50_seconds", "Median end-to-end latency per question through the gateway.", "latency_p50_s"),
    ("latency_p95_seconds", "95th percentile end-to-end latency per question through the gateway.", "latency_p95_s"),
    ("prompt_tokens_mean", "Mean prompt tokens per question.", "prompt_tokens_mean"),
    ("completion_tokens_mean", "Mean completion tokens per question.", "completion_tokens_mean"),
)


# registry -> (its snapshot, the one source behind it, the (settings, pool) of the apps that installed it)
_INSTALLED: dict[int, tuple[Snapshot, EvalScoresCollector, list[tuple[Settings, Any]]]] = {}
_OK_HELP = "1 when the scores could be read from Postgres."


def install(
    registry: CollectorRegistry,
    settings: Settings,
    pool: Any = None,
    timeout: float | None = None,
    stale_after: float = 60.0,
) -> EvalScoresCollector:
    """Register the collector, behind a snapshot, on ``registry`` once; a later call (a second app in one process)
    swaps its pool until ``uninstall``. ``timeout``: seconds to wait for a pooled connection."""
    entry = _INSTALLED.get(id(registry))
    if entry is None:
        collector = EvalScoresCollector(settings, pool=pool)
        snap = Snapshot(collector, f"{collector.prefix}_scrape_ok", collector.prefix, stale_after)
        registry.register(snap)
        entry = _INSTALLED[id(registry)] = (snap, collector, [])
    snap, collector, stack = entry
    stack.append((settings, pool))
    collector.settings, collector.pool, collector.timeout = settings, pool, timeout
    snap.stale_after = stale_after
    snap.reset()
    return collector


def uninstall(registry: CollectorRegistry, pool: Any) -> None:
    """Stop reading through ``pool`` (its app is shutting down): the app installed before it reads again."""
    entry = _INSTALLED.get(id(registry))
    if entry is None:
        return
    snap, collector, stack = entry
    stack[:] = [(s, p) for s, p in stack if p is not pool]
    if stack:
        collector.settings, collector.pool = stack[-1]
        snap.reset()


def snapshot(registry: CollectorRegistry) -> Snapshot:
    return _INSTALLED[id(registry)][0]


class EvalScoresCollector(Collector):
    """Exports the latest stored evaluation of each alias; one short query per scrape."""

    def __init__(self, settings: Settings, pool: Any = None, prefix: str = "tandem_eval") -> None:
        self.settings = settings
        self.pool = pool  # a psycopg_pool.ConnectionPool to borrow from; without one, a short connection per scrape
        self.timeout: float | None = None  # seconds to wait for a pooled connection (None: the pool's own)
        self.prefix = prefix
        self._url: str | None = None

    def _read(self) -> tuple[list[StoredScore], dict[str, bool]]:
        if self.pool is not None:
            with self.pool.connection(timeout=self.timeout) as conn:
                return _read_all(conn)
        if self._url is None:
            from components.db import database_url

            self._url = database_url(self.settings)
        with psycopg.connect(self._url, autocommit=True, connect_timeout=3) as conn:
            return _read_all(conn)

    def _families(self) -> dict[str, GaugeMetricFamily]:
        p = self.prefix
        fams = {key: GaugeMetricFamily(f"{p}_{key}", doc, labels=ARM_LABELS) for key, doc, _ in ARM_GAUGES}
        fams["recall"] = GaugeMetricFamily(
            f"{p}_retrieval_recall_at_k",
            "Share of questions whose expected document is among the top k retrieved chunks (latest run).",
            labels=["alias", "k"],
        )
        fams["mrr"] = GaugeMetricFamily(
            f"{p}_mrr", "Mean reciprocal rank of the expected document in retrieval (latest run).", labels=["alias"]
        )
        fams["questions"] = GaugeMetricFamily(
            f"{p}_questions", "Questions in the latest evaluation run.", labels=["alias"]
        )
        fams["last_run"] = GaugeMetricFamily(
            f"{p}_last_run_timestamp_seconds", "When the latest evaluation run finished (Unix time).", labels=["alias"]
        )
        fams["stale"] = GaugeMetricFamily(
            "tandem_adapter_stale",
            "1 when the alias's champion answers questions about changed documents worse than base+RAG.",
            labels=["alias"],
        )
        return fams

    def describe(self) -> Iterable[Metric]:
        # Names only: registering the collector must not touch the database.
        yield from self._families().values()
        yield GaugeMetricFamily(f"{self.prefix}_scrape_ok", _OK_HELP)

    def collect(self) -> Iterator[Metric]:
        fams = self._families()
        try:
            scores, stale = self._read()
        except Exception as exc:  # a scrape must not fail because the database is away: report it instead
            log.warning("evaluation scores unavailable: %s", exc)
            yield GaugeMetricFamily(f"{self.prefix}_scrape_ok", _OK_HELP, 0)
            return
        runs_seen: set[str] = set()
        for s in scores:
            if s.status == "ok":
                labels = [s.alias, s.arm, "" if s.adapter_version is None else str(s.adapter_version)]
                for key, _, field in ARM_GAUGES:
                    value = getattr(s, field)
                    if value is not None:
                        fams[key].add_metric(labels, float(value))
            if s.alias in runs_seen:
                continue
            runs_seen.add(s.alias)
            if s.retrieval_recall_at_k is not None:
                fams["recall"].add_metric([s.alias, str(s.retrieval_k)], s.retrieval_recall_at_k)
            if s.retrieval_mrr is not None:
                fams["mrr"].add_metric([s.alias], s.retrieval_mrr)
            fams["questions"].add_metric([s.alias], s.questions)
            fams["last_run"].add_metric([s.alias], s.finished_at.timestamp())
        for alias, flagged in stale.items():
            fams["stale"].add_metric([alias], 1.0 if flagged else 0.0)
        yield from fams.values()
        yield GaugeMetricFamily(f"{self.prefix}_scrape_ok", _OK_HELP, 1)


def _read_all(conn: Any) -> tuple[list[StoredScore], dict[str, bool]]:
    """The latest scores of each alias and, per alias with a champion, whether its latest staleness check
    flagged it (a champion never checked counts as not stale)."""
    from components.evaluation.staleness import champion_staleness
    from components.evaluation.store import latest_scores

    stale = {alias: bool(check and check.stale) for alias, _, check in champion_staleness(conn)}
    return latest_scores(conn), stale

"""The latest evaluation scores as Prometheus gauges, read from Postgres at scrape time.

A custom collector, so the numbers always match the database (no state kept in the gateway) and a gateway
restart loses nothing. Register it once on the gateway's registry::

    from serving.eval_metrics import EvalScoresCollector
    REGISTRY.register(EvalScoresCollector(settings, pool=db.pool))  # pool optional: psycopg_pool.ConnectionPool

Series (latest run of each alias; arms ``base``, ``base_rag``, ``adapter``, ``adapter_rag``; arms not run,
such as adapter arms of an alias with no champion, export no sample):

- ``tandem_eval_accuracy{alias,arm,adapter_version}`` (0..1)
- ``tandem_eval_source_hit_rate{alias,arm,adapter_version}`` (retrieval arms)
- ``tandem_eval_latency_p50_seconds`` / ``tandem_eval_latency_p95_seconds{alias,arm,adapter_version}``
- ``tandem_eval_prompt_tokens_mean`` / ``tandem_eval_completion_tokens_mean{alias,arm,adapter_version}``
- ``tandem_eval_retrieval_recall_at_k{alias,k}``, ``tandem_eval_mrr{alias}``
- ``tandem_eval_questions{alias}``, ``tandem_eval_last_run_timestamp_seconds{alias}``
- ``tandem_eval_scrape_ok``: 0 when the database could not be read (the other series are then absent)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import psycopg
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from components.settings import Settings

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
    ("latency_p50_seconds", "Median end-to-end latency per question through the gateway.", "latency_p50_s"),
    ("latency_p95_seconds", "95th percentile end-to-end latency per question through the gateway.", "latency_p95_s"),
    ("prompt_tokens_mean", "Mean prompt tokens per question.", "prompt_tokens_mean"),
    ("completion_tokens_mean", "Mean completion tokens per question.", "completion_tokens_mean"),
)


_INSTALLED: dict[int, EvalScoresCollector] = {}


def install(registry: CollectorRegistry, settings: Settings, pool: Any = None) -> EvalScoresCollector:
    """Register the collector on ``registry`` once; a later call (a second app in one process) swaps its pool."""
    collector = _INSTALLED.get(id(registry))
    if collector is None:
        collector = EvalScoresCollector(settings, pool=pool)
        registry.register(collector)
        _INSTALLED[id(registry)] = collector
    else:
        collector.settings, collector.pool = settings, pool
    return collector


class EvalScoresCollector(Collector):
    """Exports the latest stored evaluation of each alias; one short query per scrape."""

    def __init__(self, settings: Settings, pool: Any = None, prefix: str = "tandem_eval") -> None:
        self.settings = settings
        self.pool = pool  # a psycopg_pool.ConnectionPool to borrow from; without one, a short connection per scrape
        self.prefix = prefix
        self._url: str | None = None

    def _read(self) -> list[StoredScore]:
        from components.evaluation.store import latest_scores

        if self.pool is not None:
            with self.pool.connection() as conn:
                return latest_scores(conn)
        if self._url is None:
            from components.db import database_url

            self._url = database_url(self.settings)
        with psycopg.connect(self._url, autocommit=True, connect_timeout=3) as conn:
            return latest_scores(conn)

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
        return fams

    def describe(self) -> Iterable[Metric]:
        # Names only: registering the collector must not touch the database.
        yield from self._families().values()
        yield GaugeMetricFamily(f"{self.prefix}_scrape_ok", "")

    def collect(self) -> Iterator[Metric]:
        fams = self._families()
        try:
            scores = self._read()
        except Exception as exc:  # a scrape must not fail because the database is away: report it instead
            log.warning("evaluation scores unavailable: %s", exc)
            yield GaugeMetricFamily(f"{self.prefix}_scrape_ok", "1 when the scores could be read from Postgres.", 0)
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
        yield from fams.values()
        yield GaugeMetricFamily(f"{self.prefix}_scrape_ok", "1 when the scores could be read from Postgres.", 1)

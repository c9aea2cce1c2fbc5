"""Collectors that read Postgres, served from a snapshot so a scrape never waits for the database.

A ``Snapshot`` wraps a collector that reads Postgres when collected (``PipelineCollector``,
``EvalScoresCollector``). ``refresh()`` collects it in a worker thread, on a timer (``refresh_forever``), within a
time budget the source applies to its connection; a scrape only copies the last result. Beside the source's own
series a snapshot exports ``<prefix>_snapshot_age_seconds``, the age of the last snapshot the database answered.
When that is older than ``stale_after`` seconds (Postgres hangs, or the refresher is stuck on it), the scrape
serves ``<up_name> 0`` alone, as the source does when its read fails.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from contextlib import suppress

import anyio
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


def _up_value(families: Sequence[Metric], up_name: str) -> float:
    for family in families:
        if family.name == up_name:
            return next((s.value for s in family.samples), 0.0)
    return 0.0


class Snapshot(Collector):
    """Serves what ``source`` returned at the last refresh; a scrape never reads the database."""

    def __init__(self, source: Collector, up_name: str, prefix: str, stale_after: float) -> None:
        self.source = source
        self.up_name = up_name
        self.prefix = prefix
        self.stale_after = stale_after
        self._lock = threading.Lock()
        self._families: list[Metric] = []
        self._ok_at: float | None = None  # monotonic time of the last refresh the database answered

    def reset(self) -> None:
        """Forget the last snapshot (the source now reads another database)."""
        with self._lock:
            self._families, self._ok_at = [], None

    def refresh(self) -> bool:
        """Collect the source now (blocking: call it from a worker thread); True when the database answered."""
        families = list(self.source.collect())
        ok = _up_value(families, self.up_name) == 1.0
        with self._lock:
            self._families = families
            if ok:
                self._ok_at = time.monotonic()
        return ok

    def _described(self) -> list[Metric]:
        describe = getattr(self.source, "describe", None)
        return list(describe()) if describe is not None else []

    def _age(self, age: float | None) -> Metric:
        family = GaugeMetricFamily(
            f"{self.prefix}_snapshot_age_seconds",
            "Seconds since Postgres last answered the refresh of these series (absent: not since start).",
        )
        if age is not None:
            family.add_metric([], age)
        return family

    def describe(self) -> Iterable[Metric]:
        return [*self._described(), self._age(None)]

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            families, ok_at = list(self._families), self._ok_at
        age = None if ok_at is None else time.monotonic() - ok_at
        if not families or age is None or age > self.stale_after:
            # Not read yet, or the last good read is too old to pass for current: the series without samples,
            # and the source's up gauge at 0, as the source itself reports a failed read.
            families = [f for f in self._described() if f.name != self.up_name]
            down = next(f for f in self._described() if f.name == self.up_name)
            families.append(GaugeMetricFamily(down.name, down.documentation, value=0.0))
        return [*families, self._age(age)]


async def refresh_forever(snapshots: Sequence[Snapshot], interval: float) -> None:
    """Refresh each snapshot every ``interval`` seconds in a worker thread, until cancelled."""
    limiter = anyio.CapacityLimiter(1)  # one refresh at a time: a slow database gets no pile of readers
    while True:
        for snapshot in snapshots:
            try:
                await anyio.to_thread.run_sync(snapshot.refresh, limiter=limiter, abandon_on_cancel=True)
            except Exception:  # a refresh must never end the loop; the source reports its own failures
                log.exception("refreshing %s failed", snapshot.prefix)
        await asyncio.sleep(interval)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task

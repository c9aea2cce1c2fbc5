"""Replica health: a refused connection takes a replica out at once; slow or odd answers only when repeated."""

from __future__ import annotations

import pytest

from serving.replicas import FAILED_CHECKS_TOLERATED, NoReplicaError, ReplicaPool


def test_a_refused_connection_takes_the_replica_out_at_once() -> None:
    pool = ReplicaPool(["http://127.0.0.1:1"])
    replica = pool.replicas[0]
    replica.mark(True)
    assert replica.check_failed("ConnectError: refused", refused=True)
    assert pool.healthy == [] and replica.last_error == "ConnectError: refused"
    with pytest.raises(NoReplicaError):
        pool.pick()


def test_slow_checks_are_tolerated_until_they_repeat_and_a_good_check_resets_the_count() -> None:
    pool = ReplicaPool(["http://127.0.0.1:1"])
    replica = pool.replicas[0]
    replica.mark(True)
    for _ in range(FAILED_CHECKS_TOLERATED):
        assert not replica.check_failed("ReadTimeout: timed out", refused=False)
        assert pool.pick() is replica  # still serving: one slow listing on a busy host is not an outage
    assert replica.last_error == "ReadTimeout: timed out"
    replica.mark(True)
    assert replica.failed_checks == 0 and replica.last_error is None
    for _ in range(FAILED_CHECKS_TOLERATED):
        replica.check_failed("HTTPStatusError: 500", refused=False)
    assert replica.check_failed("HTTPStatusError: 500", refused=False)  # one more in a row: out of rotation
    assert pool.healthy == []


def test_a_replica_never_seen_healthy_stays_out_after_a_failed_check() -> None:
    pool = ReplicaPool(["http://127.0.0.1:1"])
    assert pool.replicas[0].check_failed("ReadTimeout: timed out", refused=False)
    assert pool.healthy == []

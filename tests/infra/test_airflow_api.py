"""components/airflow_api.py without Airflow running: credentials fail closed, an unreachable Airflow is its own
error (the intake CLI warns and goes on), and event extras name aliases or are left out."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest

from components import airflow_api
from components.airflow_api import (
    GENERATED_LOGINS,
    AirflowUnreachableError,
    announce_domain_data,
    event_aliases,
)
from components.errors import ConfigError, ServiceError
from components.settings import Settings


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when the block ends: nothing listens there


def test_no_credentials_is_refused_before_any_call(tmp_path: Path) -> None:
    remote = Settings(state_dir=tmp_path, airflow_url="http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="no credentials for Airflow"):
        announce_domain_data(remote, "harbour", {})
    local = Settings(state_dir=tmp_path)
    with pytest.raises(ConfigError, match="no Airflow credentials"):
        announce_domain_data(local, "harbour", {})
    (local.airflow_home).mkdir(parents=True)
    (local.airflow_home / GENERATED_LOGINS).write_text(json.dumps({"someone": "pw"}))
    with pytest.raises(ConfigError, match="no password for user 'admin'"):
        announce_domain_data(local, "harbour", {})


def test_an_airflow_that_does_not_answer_is_unreachable(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, airflow_port=_closed_port(), airflow_password="pw")
    with pytest.raises(AirflowUnreachableError, match="not reachable"):
        announce_domain_data(settings, "harbour", {"approved": 3})


def test_event_aliases_in_order_once_default_for_none_bad_ones_left_out() -> None:
    extras = [{"alias": "b"}, {}, {"alias": "b"}, {"alias": "Bad Alias"}, {"alias": "a"}]
    aliases, skipped = event_aliases(extras, "harbour")
    assert aliases == ["b", "harbour", "a"]
    assert len(skipped) == 1 and "'Bad Alias'" in skipped[0]


def test_a_5xx_is_tried_again_and_a_4xx_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in for Airflow's API (httpx.MockTransport): the 500 its SQLite metadata database gives while the
    # scheduler holds it cannot be brought about on demand; the real Airflow is in test_scheduler_chain.py.
    monkeypatch.setattr(airflow_api.time, "sleep", lambda s: None)
    answers = iter([500, 500, 200])
    seen = []

    def reply(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        status = next(answers)
        return httpx.Response(status, json={"id": 1} if status == 200 else {"detail": "Database error"})

    with httpx.Client(base_url="http://airflow.invalid", transport=httpx.MockTransport(reply)) as http:
        assert airflow_api._call(http, "POST", "/api/v2/assets/events", retries=2, json={}).json() == {"id": 1}
        assert len(seen) == 3
        answers = iter([500, 200])
        with pytest.raises(ServiceError, match="Airflow answered 500"):
            airflow_api._call(http, "POST", "/api/v2/assets/events", json={})  # no retries asked: one try
        answers = iter([404])
        with pytest.raises(ServiceError, match="Airflow answered 404"):
            airflow_api._call(http, "POST", "/api/v2/assets/events", retries=2, json={})
    assert len(seen) == 5

"""Alertmanager: its configs pass `amtool check-config`, the K8s copy is in step, `tandem status` names it when it
is missing, and on the live stack an alert fires, reaches the gateway's webhook (stored in Postgres) and resolves.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.infra.conftest import INFRA

ALERTMANAGER_DIR = INFRA / "alertmanager"
# The live test's rules: the real alert expressions with a short `for` (and a short staleness threshold).
SHORT_FOR = "5s"
EVAL_S = 5.0  # the local stack's evaluation_interval


@pytest.fixture(scope="session")
def amtool() -> str:
    path = shutil.which("amtool")
    if path is None:
        pytest.fail("amtool is not installed: run `make system` (Debian's prometheus-alertmanager ships it)")
    return path


def _check(amtool: str, *paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([amtool, "check-config", *map(str, paths)], capture_output=True, text=True, check=False)


def test_shipped_configs_pass_amtool(amtool: str) -> None:
    paths = sorted(ALERTMANAGER_DIR.glob("*.yml"))
    assert {p.name for p in paths} == {"alertmanager.yml", "receivers.example.yml"}
    result = _check(amtool, *paths)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(paths)
    receivers = yaml.safe_load((ALERTMANAGER_DIR / "receivers.example.yml").read_text())["receivers"]
    kinds = {key for r in receivers for key in r if key.endswith("_configs")}
    assert {"email_configs", "slack_configs", "webhook_configs"} <= kinds


def test_a_broken_config_fails_amtool(amtool: str, tmp_path: Path) -> None:
    """The check is not vacuous: a route to a receiver that does not exist is refused."""
    config = yaml.safe_load((ALERTMANAGER_DIR / "alertmanager.yml").read_text())
    config["route"]["receiver"] = "nobody"
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump(config))
    result = _check(amtool, path)
    assert result.returncode != 0
    assert "nobody" in result.stdout + result.stderr


def test_local_stack_config_passes_amtool(amtool: str, settings: Any) -> None:
    from components.stack.alertmanager import write_alertmanager_config

    path = write_alertmanager_config(settings)
    result = _check(amtool, path)
    assert result.returncode == 0, result.stdout + result.stderr
    hook = yaml.safe_load(path.read_text())["receivers"][0]["webhook_configs"][0]
    assert hook["url"] == f"{settings.gateway_url}/v1/admin/alerts/webhook" and hook["send_resolved"] is True
    # the webhook is an admin endpoint: the key comes from a file only this user can read
    key_file = Path(hook["http_config"]["authorization"]["credentials_file"])
    assert key_file.stat().st_mode & 0o077 == 0


def test_prometheus_sends_to_alertmanager(settings: Any) -> None:
    from components.stack.prometheus import write_config

    local = yaml.safe_load(write_config(settings).read_text())
    targets = local["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert targets == [f"{settings.host}:{settings.alertmanager_port}"]
    for name in ("prometheus.yml", "prometheus-k8s.yml"):
        config = yaml.safe_load((INFRA / "prometheus" / name).read_text())
        assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]


def test_k8s_and_compose_run_the_same_alertmanager_config() -> None:
    docs = list(yaml.safe_load_all((INFRA / "k8s" / "alertmanager.yaml").read_text()))
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config_map["data"]["alertmanager.yml"] == (ALERTMANAGER_DIR / "alertmanager.yml").read_text()
    kustomization = yaml.safe_load((INFRA / "k8s" / "kustomization.yaml").read_text())
    assert {"alertmanager.yaml", "postgres-exporter.yaml"} <= set(kustomization["resources"])
    compose = yaml.safe_load((INFRA / "compose" / "docker-compose.yml").read_text())["services"]
    assert "../alertmanager:/etc/alertmanager:ro" in compose["alertmanager"]["volumes"]
    assert "postgres-exporter" in compose


def test_status_names_what_is_missing_and_how_to_install_it(
    settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from components.stack import manager

    monkeypatch.setenv("PATH", str(tmp_path))  # nothing installed on this PATH
    items = {i.name: i for i in manager.status(settings, ["alertmanager", "postgres-exporter"])}
    assert items["alertmanager"].state == "not installed"
    assert "apt-get install -y prometheus-alertmanager" in items["alertmanager"].detail
    assert items["postgres-exporter"].state == "not installed"
    assert "apt-get install -y prometheus-postgres-exporter" in items["postgres-exporter"].detail


# --- Live: real vLLM, gateway, Prometheus and Alertmanager ----------------------------------------------------------
def _short_rules(path: Path) -> Path:
    """The real expressions of two alerts, with a short `for`, labelled so the test knows its own."""
    rules = {}
    for name in ("gateway.yml", "pipelines.yml"):
        for group in yaml.safe_load((INFRA / "prometheus" / "rules" / name).read_text())["groups"]:
            rules.update({r["alert"]: r for r in group["rules"] if "alert" in r})
    picked = []
    for alert in ("TandemNoHealthyReplica", "TandemIndexStale"):
        rule = dict(rules[alert], **{"for": SHORT_FOR})
        rule["labels"] = {**rule.get("labels", {}), "test": "short-for"}
        if alert == "TandemIndexStale":  # stale after 1 s instead of 3 h: no ingest has run in this session
            rule["expr"] = rule["expr"].replace("> 3 * 3600", "> 1")
            assert rule["expr"].endswith("> 1"), rule["expr"]
        picked.append(rule)
    path.write_text(yaml.safe_dump({"groups": [{"name": "test-short-for", "rules": picked}]}))
    return path


@pytest.fixture(scope="module")
def monitored(vllm_server: str, pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from components.settings import get_settings
    from components.stack import manager
    from components.stack.services import by_name, pid_of

    get_settings.cache_clear()
    settings = get_settings()
    wanted = ["gateway", "alertmanager", "prometheus"]
    started = [s.name for s in manager.status(settings, wanted) if s.state == "down"]
    manager.up(settings, only=wanted)
    try:
        # The test-only rules beside the real ones, loaded by a config reload (SIGHUP to the Prometheus we started).
        config_path = settings.run_dir / "prometheus.yml"
        config = yaml.safe_load(config_path.read_text())
        config["rule_files"].append(str(_short_rules(tmp_path_factory.mktemp("rules") / "short.yml")))
        config_path.write_text(yaml.safe_dump(config))
        pid = pid_of(by_name("prometheus"), settings)
        assert pid is not None, "Prometheus was not started by this test session"
        os.kill(pid, signal.SIGHUP)
        prom = f"http://{settings.host}:{settings.prometheus_port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            groups = httpx.get(f"{prom}/api/v1/rules", timeout=10).json()["data"]["groups"]
            if any(g["name"] == "test-short-for" for g in groups):
                break
            time.sleep(1)
        else:
            raise AssertionError("Prometheus did not load the test rules after SIGHUP")
        yield settings
    finally:
        manager.down(settings, only=started)


def _stored(settings: Any, alertname: str) -> list[dict[str, Any]]:
    """What the gateway's webhook stored for the test's copy of ``alertname`` (newest first)."""
    from components.db import connect
    from serving.alert_store import recent

    with connect(settings) as conn:
        rows = recent(conn, limit=500)["history"]
    return [r for r in rows if r["alertname"] == alertname and r["labels"].get("test") == "short-for"]


def _wait_for(settings: Any, alertname: str, status: str, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        rows = _stored(settings, alertname)
        if rows and rows[0]["status"] == status:
            return time.monotonic() - t0
        time.sleep(1)
    raise AssertionError(f"{alertname} not {status} at the webhook after {timeout_s:.0f} s: {json.dumps(rows)[:500]}")


@pytest.mark.vllm
@pytest.mark.slow
def test_stopping_vllm_fires_an_alert_that_reaches_the_webhook_and_resolves(monitored: Any) -> None:
    from components.stack import manager

    settings = monitored
    assert _stored(settings, "TandemNoHealthyReplica") == []
    manager.down(settings, only=["vllm"])
    try:
        # Detection (the gateway's health check every reconcile interval, then a scrape), the rule's `for`, two
        # evaluation intervals, and Alertmanager's group_wait (5 s).
        budget = settings.reconcile_interval_s + 5 + 5 + 2 * EVAL_S + 5 + 10
        took = _wait_for(settings, "TandemNoHealthyReplica", "firing", budget)
        print(f"TandemNoHealthyReplica reached the webhook {took:.1f} s after vLLM stopped (budget {budget:.0f} s)")
    finally:
        manager.up(settings, only=["vllm"])
    took = _wait_for(settings, "TandemNoHealthyReplica", "resolved", 120)
    print(f"TandemNoHealthyReplica resolved at the webhook {took:.1f} s after vLLM was healthy again")
    firing = next(r for r in _stored(settings, "TandemNoHealthyReplica") if r["status"] == "firing")
    assert firing["severity"] == "critical" and firing["annotations"]["summary"]


@pytest.mark.vllm
@pytest.mark.slow
def test_a_stale_index_fires_its_alert(monitored: Any) -> None:
    took = _wait_for(monitored, "TandemIndexStale", "firing", 60)
    print(f"TandemIndexStale reached the webhook after {took:.1f} s")


@pytest.mark.vllm
@pytest.mark.slow
def test_the_webhook_refuses_bad_input_and_keeps_nothing(monitored: Any) -> None:
    url = f"{monitored.gateway_url}/v1/admin/alerts/webhook"
    before = _stored(monitored, "TandemBadInput")
    from components.keys import admin_secret, bearer, client_secret

    bad = {"receiver": "x", "status": "firing", "alerts": [{"status": "burning", "labels": {}, "fingerprint": "f"}]}
    admin = bearer(admin_secret(monitored))
    resp = httpx.post(url, json=bad, headers=admin, timeout=10)
    assert resp.status_code == 400
    assert "status" in resp.json()["error"]["message"]
    # a NUL cannot go into Postgres: refused with a 400, not a 500
    nul = {"receiver": "x", "status": "firing", "alerts": [
        {"status": "firing", "labels": {"alertname": "TandemBadInput\x00"}, "fingerprint": "f"}]}  # fmt: skip
    assert httpx.post(url, json=nul, headers=admin, timeout=10).status_code == 400
    # fail closed: no key, or a client key, is refused even from loopback
    good = {"receiver": "x", "status": "firing", "alerts": [
        {"status": "firing", "labels": {"alertname": "TandemBadInput"}, "fingerprint": "f"}]}  # fmt: skip
    assert httpx.post(url, json=good, timeout=10).status_code == 401
    assert httpx.post(url, json=good, headers=bearer(client_secret(monitored)), timeout=10).status_code == 403
    assert _stored(monitored, "TandemBadInput") == before

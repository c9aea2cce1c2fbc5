"""Grafana dashboards: well-formed, provisioned, and every panel's query runs against a real Prometheus that has
scraped the real gateway, vLLM and GPU exporter, using only metric names some target exposes."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.infra.conftest import INFRA
from tests.traffic import one_round

DASHBOARDS = sorted((INFRA / "grafana" / "dashboards").glob("*.json"))
DATASOURCE_UID = "tandem-prometheus"
# Grafana's variables, as a dashboard with every option selected would send them.
VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$alias": ".*", "$instance": ".*"}
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "inf",
    "nan",
}
_SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def _panels() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            if panel["type"] != "row":
                yield board["uid"], panel


# Airflow's panels (airflow-exporter plugin): this module's stack runs no Airflow, so their queries are run with
# data in tests/infra/test_airflow_local.py after a DAG run through the scheduler.
AIRFLOW_PREFIX = "airflow_"


def airflow_panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query that reads an Airflow metric."""
    return [
        (title, expr)
        for _, title, expr in _queries()
        if any(name.startswith(AIRFLOW_PREFIX) for name in metric_names(expr))
    ]


def _queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, PromQL with variables substituted) for every target of every panel."""
    out = []
    for uid, panel in _panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in VARIABLES.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"{uid} / {panel['title']}: unknown variable in {expr}"
            out.append((uid, panel["title"], expr))
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, label matchers, grouping and ranges removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)\s*(\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def test_metric_names_parser() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le) (rate(tandem_x_bucket{route="/v1/chat"}[1m]))) / '
        "sum(rate(vllm:prompt_tokens_total[5m])) or on (gpu) tandem:gpu_used and time() - foo offset 5m"
    )
    assert metric_names(expr) == {"tandem_x_bucket", "vllm:prompt_tokens_total", "tandem:gpu_used", "foo"}


def test_dashboards_are_well_formed() -> None:
    assert {p.stem for p in DASHBOARDS} == {"tandem-gateway", "tandem-vllm", "tandem-gpu", "tandem-pipelines"}
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] == path.stem and board["uid"] not in uids
        uids.add(board["uid"])
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["targets"], f"{path.name} / {panel['title']}: no query"
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24
            for target in [panel, *panel["targets"]]:
                assert target["datasource"]["uid"] == DATASOURCE_UID


def test_issue_topics_have_panels() -> None:
    text = {p.stem: p.read_text() for p in DASHBOARDS}
    for stem, needles in {
        "tandem-gateway": ["tandem_gateway_requests_total", "tandem_rag_embed_duration_seconds_bucket",
                           "tandem_rag_retrieve_duration_seconds_bucket", "tandem_llm_generate_duration_seconds",
                           "adapter_version"],
        "tandem-vllm": ["vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                        "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"],
        "tandem-gpu": ["tandem:gpu_utilization_percent", "tandem:gpu_memory_used_ratio"],
        "tandem-pipelines": ["tandem_index_last_success_timestamp_seconds", "tandem_index_documents",
                             "tandem_index_chunks", "tandem_adapter_versions", "tandem_adapter_score",
                             "tandem_eval_accuracy", "tandem_eval_last_run_timestamp_seconds",
                             "adapter_rag", "pg_stat_activity_count", "pg_database_size_bytes",
                             "pg_stat_user_tables_n_dead_tup", "airflow_dag_status", "airflow_task_status",
                             "airflow_dag_run_duration", "airflow_dag_last_status"],
    }.items():  # fmt: skip
        for needle in needles:
            assert needle in text[stem], f"{stem} has no panel on {needle}"


def test_provisioning_points_at_the_dashboards() -> None:
    prov = INFRA / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["uid"] == DATASOURCE_UID and ds["type"] == "prometheus"
    provider = yaml.safe_load((prov / "dashboards" / "tandem.yml").read_text())["providers"][0]
    compose = yaml.safe_load((INFRA / "compose" / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"../grafana/dashboards:{provider['options']['path']}:ro" in mounts


def test_airflow_metrics_are_scraped_the_same_everywhere(settings: Any) -> None:
    """Job `airflow`, path /admin/metrics/ (the airflow-exporter plugin in the API server): local, compose, K8s."""
    from components.stack.prometheus import write_config

    path = "/admin/metrics/"
    local = {c["job_name"]: c for c in yaml.safe_load(write_config(settings).read_text())["scrape_configs"]}
    assert local["airflow"]["metrics_path"] == path
    assert local["airflow"]["static_configs"][0]["targets"] == [f"{settings.host}:{settings.airflow_port}"]
    compose = {c["job_name"]: c for c in yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())[
        "scrape_configs"]}  # fmt: skip
    assert compose["airflow"]["metrics_path"] == path
    assert compose["airflow"]["static_configs"][0]["targets"] == ["airflow-apiserver:8080"]
    values = yaml.safe_load((INFRA / "k8s" / "airflow-values.yaml").read_text())
    annotations = values["apiServer"]["podAnnotations"]
    assert annotations["prometheus.io/path"] == path and annotations["prometheus.io/job"] == "airflow"
    assert values["statsd"]["podAnnotations"]["prometheus.io/job"] != "airflow"  # one job, one source


def test_every_query_parses(promtool: str, tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule) without a server: catches syntax errors early."""
    rules = [{"record": f"check:q{i}", "expr": expr} for i, (_, _, expr) in enumerate(_queries())]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Live: real services scraped by a real Prometheus ------------------------------------------------------------
@pytest.fixture(scope="module")
def prometheus(vllm_server: str, pg_url: str) -> Iterator[str]:
    """Gateway, GPU exporter, Alertmanager, Postgres exporter and Prometheus started by the stack manager beside
    the session's vLLM."""
    from components.settings import get_settings
    from components.stack import manager

    get_settings.cache_clear()
    settings = get_settings()
    wanted = ["gateway", "gpu-exporter", "alertmanager", "postgres-exporter", "prometheus"]
    started = [s.name for s in manager.status(settings, wanted) if s.state == "down"]
    manager.up(settings, only=wanted)
    try:
        gateway = settings.gateway_url
        url = f"http://{settings.host}:{settings.prometheus_port}"
        from components.keys import client_secret

        auth = {"Authorization": f"Bearer {client_secret(settings)}"}  # keys fail closed: the local client key
        with httpx.Client(base_url=gateway, headers=auth, timeout=120.0) as client:
            # Traffic, so labelled histograms and counters have series: plain, streamed, retrieval-only.
            body = {"model": settings.served_model_name, "max_tokens": 4}
            ask = {**body, "messages": [{"role": "user", "content": "When is the harbour office open?"}]}
            client.post("/v1/chat/completions", json=ask).raise_for_status()
            # A labelled series is born with its first request; increase() only counts what a scrape saw it grow
            # by, so let Prometheus see the series once before the rest of the traffic.
            _wait_for_scrapes(url)
            one_round(client, ask, "harbour office")
        _wait_for_scrapes(url)
        yield url
    finally:
        manager.down(settings, only=started)


def _wait_for_scrapes(url: str, timeout_s: float = 90.0) -> None:
    """Until every target is up and has been scraped after the traffic above (two scrape intervals); Airflow is
    not started here (see AIRFLOW_PREFIX)."""
    deadline = time.monotonic() + timeout_s
    first_all_up = None
    while time.monotonic() < deadline:
        targets = httpx.get(f"{url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        targets = [t for t in targets if t["labels"]["job"] != "airflow"]
        if targets and all(t["health"] == "up" for t in targets):
            first_all_up = first_all_up or time.monotonic()
            if time.monotonic() - first_all_up > 12:  # scrape_interval is 5 s
                return
        time.sleep(1)
    raise AssertionError(f"targets not all up: {[(t['labels']['job'], t['health'], t['lastError']) for t in targets]}")


def _exposed(url: str) -> set[str]:
    data = httpx.get(f"{url}/api/v1/targets/metadata", timeout=10).json()["data"]
    return {item["metric"] for item in data}


def _recording_rules(url: str) -> dict[str, str]:
    groups = httpx.get(f"{url}/api/v1/rules", params={"type": "record"}, timeout=10).json()["data"]["groups"]
    return {rule["name"]: rule["query"] for group in groups for rule in group["rules"]}


def _is_exposed(name: str, exposed: set[str], rules: dict[str, str], seen: frozenset[str] = frozenset()) -> bool:
    if name in rules and name not in seen:  # a recording rule: one of its inputs must be exposed
        return any(_is_exposed(n, exposed, rules, seen | {name}) for n in metric_names(rules[name]))
    if name in exposed:
        return True
    return any(name.endswith(s) and name[: -len(s)] in exposed for s in _SUFFIXES)


@pytest.mark.vllm
@pytest.mark.slow
def test_every_panel_query_runs_and_uses_exposed_metrics(prometheus: str) -> None:
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    jobs = {"tandem-gateway", "vllm", "gpu-exporter", "alertmanager", "postgres", "airflow"}
    assert {t["labels"]["job"] for t in targets} == jobs
    exposed = _exposed(prometheus)
    rules = _recording_rules(prometheus)
    assert "tandem:gpu_memory_used_ratio" in rules  # the rules of infra/prometheus/rules are loaded
    problems = []
    for uid, title, expr in _queries():
        resp = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=30).json()
        if resp["status"] != "success":
            problems.append(f"{uid} / {title}: {resp.get('error')}")
        problems += [
            f"{uid} / {title}: no target exposes {name}"
            for name in sorted(metric_names(expr))
            if not name.startswith(AIRFLOW_PREFIX) and not _is_exposed(name, exposed, rules)
        ]
    assert not problems, "\n".join(problems)
    # The traffic above is visible through the dashboards' own queries, not only as names.
    chat_rate = 'sum(increase(tandem_gateway_requests_total{route="/v1/chat/completions"}[5m]))'
    result = httpx.get(f"{prometheus}/api/v1/query", params={"query": chat_rate}, timeout=30).json()
    assert float(result["data"]["result"][0]["value"][1]) > 0


@pytest.mark.vllm
@pytest.mark.slow
def test_alert_rules_are_loaded_and_evaluate(prometheus: str) -> None:
    groups = httpx.get(f"{prometheus}/api/v1/rules", params={"type": "alert"}, timeout=10).json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {"TandemGatewayHighErrorRate", "TandemIndexStale", "TandemGpuMemoryHigh"} <= {r["name"] for r in rules}
    deadline = time.monotonic() + 30
    while any(r.get("health") == "unknown" for r in rules) and time.monotonic() < deadline:
        time.sleep(2)
        groups = httpx.get(f"{prometheus}/api/v1/rules", params={"type": "alert"}, timeout=10).json()["data"]
        rules = [rule for group in groups["groups"] for rule in group["rules"]]
    assert [r["name"] for r in rules if r["health"] != "ok"] == []

"""Alert rules: promtool checks them, runs their unit tests, and every alert has at least one unit test."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.infra.conftest import INFRA, REPO_ROOT

RULES = sorted((INFRA / "prometheus" / "rules").glob("*.yml"))
UNIT_TESTS = sorted((INFRA / "prometheus" / "tests").glob("*.yml"))

# What the issue asks alerts for, by the alert that covers it.
REQUIRED_ALERTS = {
    "TandemGatewayHighErrorRate",  # gateway error rate
    "TandemGatewayHighLatencyP95",  # p95 latency
    "TandemChampionNotLoaded",  # an alias with no champion loaded on some replica
    "TandemGpuMemoryHigh",  # GPU memory above 90%
    "TandemIngestFailing",  # a failing ingest DAG
    "TandemIndexStale",  # a stale index
    "TandemRetrainingRejected",  # a rejected retraining
    "TandemRetrainingFailed",  # a failed retraining
}


def _run(*cmd: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def _alerts(paths: list[Path]) -> set[str]:
    return {
        rule["alert"]
        for path in paths
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def test_rules_pass_promtool_check(promtool: str) -> None:
    result = _run(promtool, "check", "rules", *map(str, RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULES)


def test_rule_unit_tests_pass(promtool: str) -> None:
    result = _run(promtool, "test", "rules", *map(str, UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(UNIT_TESTS)


def test_every_alert_is_unit_tested_and_the_required_ones_exist() -> None:
    defined = _alerts(RULES)
    assert defined >= REQUIRED_ALERTS, f"missing alerts: {REQUIRED_ALERTS - defined}"
    tested = {
        case["alertname"]
        for path in UNIT_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")  # a case where the alert does fire, not only one where it stays quiet
    }
    assert defined - tested == set(), f"alerts without a firing unit test: {sorted(defined - tested)}"
    for alert in defined:
        assert alert.startswith("Tandem")


def test_a_broken_rule_fails_the_unit_tests(promtool: str, tmp_path: Path) -> None:
    """The unit tests are not vacuous: a rule with the wrong threshold makes them fail."""
    rules = tmp_path / "rules"
    tests = tmp_path / "tests"
    rules.mkdir()
    tests.mkdir()
    for path in RULES:
        (rules / path.name).write_text(path.read_text().replace("> 0.05", "> 0.5"))
    (tests / "gateway_test.yml").write_text((INFRA / "prometheus" / "tests" / "gateway_test.yml").read_text())
    result = _run(promtool, "test", "rules", str(tests / "gateway_test.yml"))
    assert result.returncode != 0
    assert "TandemGatewayHighErrorRate" in result.stdout + result.stderr


def test_compose_prometheus_config_is_valid(promtool: str) -> None:
    result = _run(promtool, "check", "config", "prometheus.yml", cwd=INFRA / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    jobs = {c["job_name"] for c in config["scrape_configs"]}
    assert {"tandem-gateway", "vllm", "dcgm-exporter"} <= jobs


def test_local_stack_prometheus_config_is_valid(promtool: str, settings: object) -> None:
    from components.settings import Settings
    from components.stack.prometheus import write_config

    assert isinstance(settings, Settings)
    path = write_config(settings)
    result = _run(promtool, "check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(path.read_text())
    assert len(config["rule_files"]) == len(RULES)
    jobs = {c["job_name"]: c["static_configs"][0]["targets"] for c in config["scrape_configs"]}
    assert jobs["tandem-gateway"] == [f"{settings.host}:{settings.gateway_port}"]
    assert jobs["gpu-exporter"] == [f"{settings.host}:{settings.gpu_exporter_port}"]
    assert jobs["vllm"] == [f"{settings.host}:{settings.vllm_port}"]


def test_k8s_prometheus_config_maps_are_in_step_with_the_rules() -> None:
    """infra/k8s/prometheus-rules.yaml is rendered from infra/prometheus/: it must not drift."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("render", INFRA / "scripts" / "render_k8s_prometheus.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (INFRA / "k8s" / "prometheus-rules.yaml").read_text()
    assert committed == module.render(), "run: python infra/scripts/render_k8s_prometheus.py"
    maps = {d["metadata"]["name"]: d["data"] for d in yaml.safe_load_all(committed)}
    assert set(maps["prometheus-rules"]) == {p.name for p in RULES}
    # Debian's promtool is built without Kubernetes service discovery, so only the structure is checked here.
    k8s = yaml.safe_load(maps["prometheus-config"]["prometheus.yml"])
    pods = next(c for c in k8s["scrape_configs"] if c["job_name"] == "kubernetes-pods")
    keep = pods["relabel_configs"][0]
    assert keep["action"] == "keep"
    assert keep["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]

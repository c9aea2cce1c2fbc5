"""Kubeflow pipelines: compiled by the real kfp SDK (in .venv-kfp) to KFP v2 YAML; steps, inputs and wiring checked.

Each step's shipped source must call the same components functions the Airflow DAGs call, with arguments those
functions accept (checked here by importing them in the project's venv).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infra.conftest import INFRA, REPO_ROOT

KFP_PYTHON = REPO_ROOT / ".venv-kfp" / "bin" / "python"
IMAGE = "registry.example/tandem:test"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    if not (REPO_ROOT / ".venv-kfp" / ".installed").exists():
        made = subprocess.run(["make", "kfp-venv"], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        if made.returncode != 0:
            pytest.skip(f"the kfp venv (.venv-kfp) could not be created: {made.stderr.strip()[-300:]}")
    out = tmp_path_factory.mktemp("kfp")
    result = subprocess.run(
        [str(KFP_PYTHON), str(INFRA / "kfp" / "pipelines.py"), "--out", str(out), "--image", IMAGE],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return {p.stem: list(yaml.safe_load_all(p.read_text())) for p in out.glob("*.yaml")}


def _inputs(spec: dict[str, Any]) -> dict[str, str]:
    return {k: v["parameterType"] for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}


def _tasks(dag: dict[str, Any]) -> dict[str, Any]:
    return dict(dag["dag"]["tasks"])


def _calls(spec: dict[str, Any]) -> dict[str, tuple[str, str, set[str]]]:
    """executor -> (module, function, keyword names) of the components call in its shipped source."""
    out = {}
    for name, executor in spec["deploymentSpec"]["executors"].items():
        source = executor["container"]["command"][-1]
        tree = ast.parse(source)
        func = next(n for n in tree.body if isinstance(n, ast.FunctionDef))
        imported = {
            alias.asname or alias.name: (node.module, alias.name)
            for node in ast.walk(func)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("components")
            for alias in node.names
            if alias.name != "get_settings"
        }
        assert imported, f"{name} imports no components function"
        for call in ast.walk(func):
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in imported:
                module, function = imported[call.func.id]
                out[f"{name}:{function}"] = (module, function, {k.arg for k in call.keywords if k.arg})
    return out


def _dag_imports(dag_file: Path) -> set[tuple[str, str]]:
    tree = ast.parse(dag_file.read_text())
    return {
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("components.")
        for alias in node.names
        if alias.name != "get_settings"
    }


def test_both_pipelines_compile_to_kfp_v2(compiled: dict[str, list[dict[str, Any]]]) -> None:
    assert set(compiled) == {"ingest_documents", "retrain_adapter"}
    for docs in compiled.values():
        spec, platform = docs
        assert spec["schemaVersion"] == "2.1.0"
        assert spec["sdkVersion"].startswith("kfp-2.")
        executors = spec["deploymentSpec"]["executors"]
        assert {e["container"]["image"] for e in executors.values()} == {IMAGE}
        mounts = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        assert set(mounts) == set(executors)  # every step gets the shared volume and the secrets
        for m in mounts.values():
            assert m["pvcMount"][0]["mountPath"] == "/var/lib/tandem"
            assert m["secretAsEnv"][0]["secretName"] == "tandem-secrets"


def test_ingest_pipeline_steps_and_inputs(compiled: dict[str, list[dict[str, Any]]]) -> None:
    spec = compiled["ingest_documents"][0]
    assert _inputs(spec) == {"source": "STRING", "force": "BOOLEAN", "allow_mass_delete": "BOOLEAN"}
    tasks = _tasks(spec["root"])
    assert list(tasks) == ["sync-documents-step"]
    step = tasks["sync-documents-step"]
    params = step["inputs"]["parameters"]
    assert params["source"]["componentInputParameter"] == "source"
    assert params["force"]["componentInputParameter"] == "force"
    assert params["allow_mass_delete"]["componentInputParameter"] == "allow_mass_delete"
    assert step["retryPolicy"]["maxRetryCount"] == 2


def test_retrain_pipeline_steps_wiring_and_gpus(compiled: dict[str, list[dict[str, Any]]]) -> None:
    spec = compiled["retrain_adapter"][0]
    assert _inputs(spec) == {
        "alias": "STRING",
        "data": "STRING",
        "force": "BOOLEAN",
        "sweep_learning_rates": "LIST",
        "sweep_ranks": "LIST",
        "max_steps": "NUMBER_INTEGER",
    }
    root = _tasks(spec["root"])
    assert set(root) == {"check-new-data-step", "condition-1"}
    condition = root["condition-1"]
    assert condition["dependentTasks"] == ["check-new-data-step"]
    assert "should_train" in condition["triggerPolicy"]["condition"]

    inner = _tasks(spec["components"]["comp-condition-1"])
    assert set(inner) == {
        "sweep-points-step",
        "for-loop-2",
        "register-best-step",
        "evaluate-gate-step",
        "promote-or-reject-step",
    }
    assert inner["for-loop-2"]["parameterIterator"]["items"]["inputParameter"].endswith("sweep-points-step-Output")
    loop = _tasks(spec["components"]["comp-for-loop-2"])
    assert list(loop) == ["train-candidate-step"]
    # fan-in: register-best gets every training result; the gate follows it; promotion follows the gate
    collected = inner["register-best-step"]["inputs"]["parameters"]["results"]["taskOutputParameter"]
    assert collected["producerTask"] == "for-loop-2"
    gate_in = inner["evaluate-gate-step"]["inputs"]["parameters"]["candidate"]["taskOutputParameter"]
    assert gate_in["producerTask"] == "register-best-step"
    promote_in = inner["promote-or-reject-step"]["inputs"]["parameters"]["gated"]["taskOutputParameter"]
    assert promote_in["producerTask"] == "evaluate-gate-step"

    executors = spec["deploymentSpec"]["executors"]
    gpu = {n for n, e in executors.items() if e["container"].get("resources", {}).get("accelerator")}
    assert gpu == {"exec-train-candidate-step", "exec-evaluate-gate-step"}


def test_steps_call_the_components_functions_the_dags_use(compiled: dict[str, list[dict[str, Any]]]) -> None:
    for name, dag_file in (
        ("retrain_adapter", REPO_ROOT / "dags" / "retrain_adapter.py"),
        ("ingest_documents", REPO_ROOT / "dags" / "ingest_documents.py"),
    ):
        calls = _calls(compiled[name][0])
        used = set()
        for module, function, keywords in calls.values():
            target = getattr(importlib.import_module(module), function)
            params = inspect.signature(target).parameters
            assert keywords <= set(params), f"{module}.{function} does not take {keywords - set(params)}"
            used.add((re.sub(r"\.sync$", "", module), function))
        assert dag_file.exists(), f"{dag_file.name} is missing"
        dag_uses = {(re.sub(r"\.sync$", "", m), f) for m, f in _dag_imports(dag_file)}
        assert used <= dag_uses, f"not used by {dag_file.name}: {used - dag_uses}"

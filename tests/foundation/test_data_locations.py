"""Tandem's own data (general-knowledge and replay sets) ships in the package; the sample domain is found from
any working directory; `tandem status` says where each resolves to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import components
from components.cli import main
from components.evaluation.run import resolve_qa_path
from components.settings import Settings, get_settings
from components.training.pipeline import load_replay

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DATA = Path(components.__file__).resolve().parent / "data"
DATA_SETTINGS = ("DOCS_SOURCE", "TRAIN_DATA", "QA_SET", "GATE_QA_SET", "GENERAL_SET", "TRAIN_REPLAY_DATA")
NAMES = {"docs", "train", "qa", "gate", "general", "replay"}


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory that is not the checkout, and no data setting in the environment."""
    for name in DATA_SETTINGS:
        monkeypatch.delenv(f"TANDEM_{name}", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_product_data_is_found_from_any_folder(elsewhere: Path) -> None:
    settings = Settings(_env_file=None)
    assert Path(settings.general_set) == PACKAGE_DATA / "general_knowledge.jsonl"
    assert Path(settings.train_replay_data) == PACKAGE_DATA / "replay.jsonl"
    assert Path(settings.general_set).is_file() and Path(settings.train_replay_data).is_file()
    replay = load_replay(settings)
    assert replay is not None and not replay.problems and len(replay.examples) == 40


def test_sample_defaults_resolve_to_the_checkout_from_any_folder(elsewhere: Path) -> None:
    settings = Settings(_env_file=None)
    assert settings.docs_source == str(REPO_ROOT / "data" / "sample" / "docs")
    assert settings.train_data == str(REPO_ROOT / "data" / "sample" / "train")
    assert settings.qa_set == str(REPO_ROOT / "data" / "sample" / "qa" / "heldout.jsonl")
    assert Path(settings.docs_source).is_dir() and Path(settings.train_data).is_dir()
    assert Path(settings.qa_set).is_file()
    assert settings.gate_questions == str(REPO_ROOT / "data" / "sample" / "qa" / "gate.jsonl")  # beside qa_set
    # the evaluation's QA lookup follows the same rule
    assert resolve_qa_path(settings, None) == Path(settings.qa_set)
    assert resolve_qa_path(settings, "data/sample/qa/heldout.jsonl") == Path(settings.qa_set)


def test_a_relative_path_present_in_the_working_directory_wins(elsewhere: Path) -> None:
    (elsewhere / "data" / "sample" / "docs").mkdir(parents=True)
    assert Settings(_env_file=None).docs_source == "data/sample/docs"


def test_values_set_in_the_environment_are_kept(elsewhere: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_TRAIN_DATA", "no/such/folder")  # relative, exists nowhere
    monkeypatch.setenv("TANDEM_DOCS_SOURCE", "s3://bucket/docs")
    monkeypatch.setenv("TANDEM_QA_SET", str(elsewhere / "absent.jsonl"))
    monkeypatch.setenv("TANDEM_GENERAL_SET", "mine/general.jsonl")
    monkeypatch.setenv("TANDEM_TRAIN_REPLAY_DATA", "")
    settings = Settings(_env_file=None)
    assert settings.train_data == "no/such/folder"
    assert settings.docs_source == "s3://bucket/docs"
    assert settings.qa_set == str(elsewhere / "absent.jsonl")
    assert settings.general_set == "mine/general.jsonl"
    assert settings.train_replay_data == "" and load_replay(settings) is None
    locations = settings.data_locations()
    assert locations["train"] == {"path": str(elsewhere / "no" / "such" / "folder"), "exists": False}
    assert locations["docs"] == {"path": "s3://bucket/docs", "exists": None}  # a URL is not checked
    assert locations["replay"] == {"path": None, "exists": None}  # off
    assert settings.gate_questions is None  # no gate.jsonl beside that QA set: the gate has no QA set of its own
    assert locations["gate"] == {"path": None, "exists": None}


def test_the_gate_set_is_found_beside_the_qa_set_or_named(elsewhere: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    qa = elsewhere / "mine" / "heldout.jsonl"
    qa.parent.mkdir()
    qa.write_text("", encoding="utf-8")
    (qa.parent / "gate.jsonl").write_text("", encoding="utf-8")
    monkeypatch.setenv("TANDEM_QA_SET", str(qa))
    assert Settings(_env_file=None).gate_questions == str(qa.parent / "gate.jsonl")
    monkeypatch.setenv("TANDEM_GATE_QA_SET", "data/quillfern/qa/gate.jsonl")  # relative: found in the checkout
    settings = Settings(_env_file=None)
    assert settings.gate_questions == str(REPO_ROOT / "data" / "quillfern" / "qa" / "gate.jsonl")
    assert settings.data_locations()["gate"]["exists"] is True


def test_an_env_path_found_only_in_the_checkout_resolves_there(
    elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_TRAIN_DATA", "data/sample/train/examples.jsonl")
    assert Settings(_env_file=None).train_data == str(REPO_ROOT / "data" / "sample" / "train" / "examples.jsonl")


def _status(*args: str) -> None:
    """`tandem status` in this process: it only probes, so it needs no running stack."""
    get_settings.cache_clear()
    try:
        assert main(["status", *args]) == 0
    finally:
        get_settings.cache_clear()


def test_status_says_where_the_data_resolves_to(elsewhere: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _status("--json")
    out = json.loads(capsys.readouterr().out)
    assert {c["name"] for c in out["components"]} >= {"postgres", "vllm", "gateway", "airflow", "prometheus"}
    data = out["data"]
    assert set(data) == NAMES
    assert data["docs"] == {"path": str(REPO_ROOT / "data" / "sample" / "docs"), "exists": True}
    assert data["train"] == {"path": str(REPO_ROOT / "data" / "sample" / "train"), "exists": True}
    assert data["qa"] == {"path": str(REPO_ROOT / "data" / "sample" / "qa" / "heldout.jsonl"), "exists": True}
    assert data["general"] == {"path": str(PACKAGE_DATA / "general_knowledge.jsonl"), "exists": True}
    assert data["replay"] == {"path": str(PACKAGE_DATA / "replay.jsonl"), "exists": True}

    _status()
    text = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in text.split("\n\n", 1)[1].splitlines()[2:]}
    assert set(rows) == NAMES
    assert rows["replay"] == [str(PACKAGE_DATA / "replay.jsonl"), "yes"]

"""The gate against the real vLLM: it asks the alias's fixed held-out set whatever data a run brings, and a
candidate whose scoring fails is unloaded again with the registry left as it was."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from components import registry
from components.db import connect
from components.errors import ServiceError
from components.settings import get_settings
from components.training import pipeline
from components.training.results import RetrainResult
from components.training.vllm_client import VllmClient

from .conftest import FACTS, chat_line, write_examples

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ALIAS = "heldout"


@pytest.fixture(scope="module")
def first_run(train_env: Path, pg_url: str, vllm_server: str) -> RetrainResult:
    """The alias's first training: its held-out set (3 of FACTS at a fifth held out) is fixed here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TANDEM_TRAIN_HELDOUT_FRACTION", "0.2")
        get_settings.cache_clear()
        write_examples(train_env / "domain" / ALIAS, FACTS)
        result = pipeline.retrain(get_settings(), ALIAS)
    get_settings.cache_clear()
    assert result.trained and result.gate is not None
    return result


def test_a_runs_data_never_changes_what_the_gate_asks(first_run: RetrainResult, train_env: Path) -> None:
    assert first_run.gate is not None
    held = first_run.gate.heldout
    assert held["version"] == 1 and held["size"] == 3 and first_run.gate.counts["split"] == 3
    # a run that brings the held-out questions (with answers to memorise) and questions of its own
    evil = train_env / "evil.jsonl"
    extra = [(f"What is the code of gate {n}?", f"Gate {n} has code {n * 7}.") for n in range(6)]
    evil.write_text("".join(chat_line(q, "Learned by heart: " + a) + "\n" for q, a in FACTS + extra))

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TANDEM_TRAIN_HELDOUT_FRACTION", "0.2")
        get_settings.cache_clear()
        second = pipeline.retrain(get_settings(), ALIAS, data=str(evil), force=True)
    get_settings.cache_clear()

    assert second.gate is not None and second.training is not None and second.candidate is not None
    gate = second.gate
    assert gate.heldout == held  # same version, same content hash: judged on the questions fixed at first
    # the baseline (champion or base model) answered these prompts in the first gate: not asked again
    reused = [n for n in gate.notes if n.endswith("answers reused from earlier gates (same model and prompt)")]
    assert len(reused) == 1 and int(reused[0].split()[0]) > 0, gate.notes
    assert gate.counts["split"] == 3
    dropped = second.training.contaminated
    assert sum("(the held-out set)" in d for d in dropped) == 3  # every held-out question left out of training
    assert sum("(the QA set)" in d for d in dropped) == 3  # and the QA set's (FACTS[:3] in train_env)
    with connect() as conn:
        row = registry.get_version(conn, ALIAS, second.candidate.version)
        sets = conn.execute("SELECT count(*) FROM gate_heldout_sets WHERE alias = %s", (ALIAS,)).fetchone()
    assert row.metrics["gate"]["heldout"]["version"] == 1 and row.hyperparameters["heldout"]["version"] == 1
    assert row.metrics["training"]["n_contaminated"] == len(dropped) and sets == (1,)


def test_candidate_whose_scoring_fails_is_unloaded(first_run: RetrainResult, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = get_settings()
    assert first_run.candidate is not None
    with connect() as conn:
        trained = registry.get_version(conn, ALIAS, first_run.candidate.version)
        candidate = registry.register_candidate(
            conn,
            alias=ALIAS,
            base_model=trained.base_model,
            dataset_version=trained.dataset_version,
            dataset_size=trained.dataset_size,
            hyperparameters={"copy_of": trained.version},
            metrics={},
            artifact_uri=trained.artifact_uri,
            lora_rank=trained.lora_rank,
        )
        conn.commit()
        champion_before = registry.get_champion(conn, ALIAS)
    seen: list[set[str]] = []

    def scorer_that_breaks(client: VllmClient, model: str, *args: Any) -> Any:
        seen.append(client.models())  # the candidate is loaded when scoring starts
        raise ServiceError("the scorer broke")

    monkeypatch.setattr(pipeline, "answer_all", scorer_that_breaks)
    with pytest.raises(ServiceError, match="the scorer broke"):
        pipeline.evaluate_gate(settings, ALIAS, candidate.version)

    assert seen and candidate.served_name in seen[0]
    with VllmClient.for_settings(settings) as client:
        assert candidate.served_name not in client.models()
    with connect() as conn:
        after = registry.get_version(conn, ALIAS, candidate.version)
        champion_after = registry.get_champion(conn, ALIAS)
    assert after.status == "candidate" and "gate" not in after.metrics  # no verdict recorded
    assert (champion_after and champion_after.version) == (champion_before and champion_before.version)


def test_bench_gate_asks_the_baseline_once_and_cleans_up_after_itself(
    first_run: RetrainResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from components.cli import main

    assert first_run.candidate is not None
    served = first_run.candidate.served_name
    count = "SELECT count(*) FROM gate_answers WHERE model = %s"
    with connect() as conn:
        before = conn.execute(count, (served,)).fetchone()
    out = tmp_path / "gate.json"
    get_settings.cache_clear()
    argv = ["bench", "gate", "--alias", ALIAS, "--version", str(first_run.candidate.version), "--questions", "2"]
    assert main([*argv, "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads(out.read_text())
    assert printed == result and result["adapter"] == served
    n = sum(result["questions"].values())
    assert n > 0
    peer, retrain = result["runs"]["every_answer_asked"], result["runs"]["baseline_from_cache"]
    assert (peer["asked"], peer["reused"]) == (2 * n, 0)
    assert (retrain["asked"], retrain["reused"]) == (n, n)  # the baseline came from the cache, all of it
    same, total = map(int, result["candidate_reasked_identical"].split("/"))
    assert total == n and 0 <= same <= n
    with connect() as conn:
        assert conn.execute(count, (served,)).fetchone() == before  # the bench's candidate entries are gone

    assert main(["bench", "gate", "--alias", "no-such-alias"]) == 2
    assert "has no champion" in capsys.readouterr().err

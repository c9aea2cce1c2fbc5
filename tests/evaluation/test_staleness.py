"""Staleness after documents change: the lineage names the documents a champion was trained on, a changed fact is
found and asked about through the real gateway, the verdict is stored, exported, printed and acted on."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

DAG_FILE = Path(__file__).resolve().parents[2] / "dags" / "check_staleness.py"
FERRY_V1 = """# Kestrel Point Ferry

The Kestrel Point ferry leaves the north slipway at 7:15 each morning.
Tickets for the Kestrel Point ferry are sold at the kiosk beside the north slipway.
"""
FERRY_V2 = FERRY_V1.replace("7:15", "8:25")
BERTHS = """# Gannet Berths

The Gannet Berths take vessels up to 30 metres long.
Bookings for the Gannet Berths close at noon on the day before arrival.
"""
EXAMPLES = [
    {"question": "When does the Kestrel Point ferry leave each morning?",
     "answer": "The Kestrel Point ferry leaves the north slipway at 7:15 each morning.", "source": "kferry.md"},
    {"question": "Where are tickets for the Kestrel Point ferry sold?",
     "answer": "Tickets are sold at the kiosk beside the north slipway.", "source": "kferry.md"},
    {"question": "How long a vessel do the Gannet Berths take?",
     "answer": "The Gannet Berths take vessels up to 30 metres long.", "source": "gberths.md"},
]  # fmt: skip


def _ingest(folder: Path) -> None:
    from components.ingest.sync import sync_documents
    from components.settings import get_settings

    settings = get_settings()
    sync_documents(str(folder), settings=settings.model_copy(update={"ingest_allowed_roots": [str(folder)]}))


def _trained_lineage(folder: Path, tmp_path: Path, tag: str) -> dict[str, Any]:
    """What a training run records (components.training.pipeline.training_conversations) for EXAMPLES, on
    documents of their own (names tagged per test: the session's index is shared)."""
    from components.settings import get_settings
    from components.training.data import load_dataset
    from components.training.pipeline import training_conversations

    (folder / f"kferry-{tag}.md").write_text(FERRY_V1)
    (folder / f"gberths-{tag}.md").write_text(BERTHS)
    _ingest(folder)
    data = tmp_path / "examples.jsonl"
    rows = [{**e, "source": e["source"].replace(".md", f"-{tag}.md")} for e in EXAMPLES]
    data.write_text("".join(json.dumps(e) + "\n" for e in rows))
    settings = get_settings().model_copy(update={"train_unanswerable_share": 0.0})
    train, _, lineage = training_conversations(settings, load_dataset(str(data)).examples, [])
    assert len(train) == len(EXAMPLES)
    return lineage


def test_verdict_on_stored_paired_outcomes() -> None:
    from components.evaluation.staleness import verdict

    alpha = 0.05
    # six questions the hybrid lost and base+RAG got: significant (p = 2 * 0.5**6 = 0.03125)
    assert verdict([False] * 6, [True] * 6, alpha)[:2] == (True, 0.03125)
    # one loss on three questions: a set too small for the test, so any loss flags (the gate's rule)
    stale, p, why = verdict([True, True, False], [True, True, True], alpha)
    assert stale and p == 1.0 and "too small to test" in why
    # one loss on ten: below, but not significantly
    stale, _, why = verdict([True] * 9 + [False], [True] * 10, alpha)
    assert not stale and "not significantly" in why
    # a tie, a gain, nothing asked: never stale
    assert not verdict([True, False], [False, True], alpha)[0]
    assert not verdict([True] * 6, [False] * 6, alpha)[0]
    assert verdict([], [], alpha)[:2] == (False, None)


def test_lineage_and_changed_fact_are_seen_by_the_scoring(pg_url: str, tmp_path: Path) -> None:
    """Real Postgres, real embedding model, the real training renderer: the changed fact is found and scored."""
    from components.db import connect
    from components.evaluation.staleness import changed_documents, outcome, stale_questions
    from components.settings import get_settings

    folder = tmp_path / "docs"
    folder.mkdir()
    lineage = _trained_lineage(folder, tmp_path, "unit")
    assert {d["path"] for d in lineage["documents"]} == {"kferry-unit.md", "gberths-unit.md"}
    when = next(g for g in lineage["grounding"] if g["question"] == EXAMPLES[0]["question"])
    assert when["document"] == "kferry-unit.md" and {"7", "15"} <= set(when["evidence"])

    settings = get_settings()
    since = lineage["index"]["last_ingest_at"]
    with connect() as conn:
        assert changed_documents(conn, lineage, since) == []  # nothing changed: nothing to ask
        assert stale_questions(settings, conn, lineage, [])[1] == []
    (folder / "kferry-unit.md").write_text(FERRY_V2)
    _ingest(folder)
    with connect() as conn:
        changed = changed_documents(conn, lineage, since)
        assert [(d["path"], d["change"]) for d in changed] == [("kferry-unit.md", "changed")]
        basis, questions = stale_questions(settings, conn, lineage, changed)
    assert basis == "grounding"
    # the changed fact first; the unchanged document's question is not asked
    assert [q.question for q in questions] == [EXAMPLES[0]["question"], EXAMPLES[1]["question"]]
    assert sorted(questions[0].retired) == ["15", "7"] and questions[1].retired == []
    now = FERRY_V2
    assert outcome(questions[0], "The Kestrel Point ferry leaves at 8:25 each morning [1].", now)
    assert not outcome(questions[0], "The Kestrel Point ferry leaves the north slipway at 7:15 each morning.", now)
    assert not outcome(questions[0], "The sources do not contain the answer, so I do not know.", now)
    assert outcome(questions[1], "Tickets are sold at the kiosk beside the north slipway [1].", now)
    assert not outcome(questions[1], "Tickets are sold on board.", now)


def test_dag_is_scheduled_on_the_document_index() -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}
    dag = bag.dags["check_staleness"]
    assert dag.timetable.asset_condition.uri == "tandem://index/documents"
    assert [t.task_id for t in dag.tasks] == ["check"]


def _register_champions(alias: str, adapter_dir: Path) -> None:
    """v1 then v2 made champion (so v2 has somewhere to roll back to), both the same real peft adapter."""
    from components import registry
    from components.db import connect

    with connect() as conn:
        for _ in range(2):
            version = registry.register_candidate(
                conn, alias=alias, base_model="smollm2-135m", dataset_version="staletest", dataset_size=3,
                hyperparameters={"r": 4}, metrics={}, artifact_uri=str(adapter_dir), lora_rank=4,
            )  # fmt: skip
            registry.set_champion(conn, alias, version.version, reason="test")
        conn.commit()


def _wait_until_served(settings: Any, alias: str) -> None:
    """Until the gateway serves the alias with its adapter (the reconciler loads the new champion)."""
    import time

    import httpx

    from components.keys import bearer, client_secret

    deadline = time.monotonic() + 120
    while True:  # wait for a state, never assert on time
        models = httpx.get(
            settings.gateway_url + "/v1/models", headers=bearer(client_secret(settings)), timeout=10
        ).json()["data"]
        entry = next((m for m in models if m["id"] == alias), None)
        if entry and not entry.get("tandem", {}).get("fallback", True):
            return
        assert time.monotonic() < deadline, f"the gateway never served {alias} with its adapter"
        time.sleep(0.5)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(2400)  # answers through vLLM on 2 shared cores: a busy machine is slow, never wrong
def test_check_through_the_gateway_flags_and_rolls_back(
    eval_gateway: str, eval_adapter: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real gateway and vLLM answer the questions about the changed document; the row is stored. The tiny
    adapter (untrained: its LoRA B is zero) answers as the base model does, so its own verdict is never "stale":
    the flag, the metric, the CLI line and the rollback are then driven by a verdict on stored paired outcomes."""
    import shutil

    from prometheus_client import CollectorRegistry, generate_latest

    from components import registry
    from components.cli import main
    from components.db import connect
    from components.evaluation import staleness
    from components.settings import get_settings
    from components.training import artifacts
    from serving.eval_metrics import EvalScoresCollector

    alias = "staletest"
    folder = tmp_path / "docs"
    folder.mkdir()
    lineage = _trained_lineage(folder, tmp_path, "e2e")
    adapter = tmp_path / "adapter"
    with connect() as conn:
        shutil.copytree(registry.get_version(conn, "evaltest", eval_adapter).artifact_uri, adapter)
    (adapter / artifacts.MANIFEST).write_text(json.dumps({"rendering": lineage}))
    _register_champions(alias, adapter)
    settings = get_settings().model_copy(update={"staleness_max_questions": 1})  # the changed fact only
    _wait_until_served(settings, alias)

    unchanged = staleness.check_alias(settings, alias, trigger="test")
    assert unchanged is not None and unchanged.questions == 0 and not unchanged.stale and unchanged.check_id

    (folder / "kferry-e2e.md").write_text(FERRY_V2)
    _ingest(folder)
    check = staleness.check_alias(settings, alias, trigger="test")
    assert check is not None and check.check_id and check.basis == "grounding"
    assert [o["question"] for o in check.outcomes] == [EXAMPLES[0]["question"]]  # changed facts first
    assert check.outcomes[0]["retired"] == ["15", "7"]
    hybrid = [o["adapter_rag"]["correct"] for o in check.outcomes]
    base_rag = [o["base_rag"]["correct"] for o in check.outcomes]
    assert check.stale == staleness.verdict(hybrid, base_rag, settings.gate_alpha)[0]
    assert all(o[arm]["answer"] for o in check.outcomes for arm in staleness.STALE_ARMS)
    with connect() as conn:
        stored = staleness.latest_check(conn, alias, 2)
    assert stored is not None and stored.check_id == check.check_id and stored.questions == 1
    again = staleness.check_alias(settings, alias, trigger="test")  # same changed documents: the verdict stands
    assert again is not None and again.reused and again.check_id == check.check_id

    # A verdict on stored paired outcomes: the hybrid repeated the old time where base+RAG gave the new one.
    flagged = staleness.StalenessCheck(alias, 2, "test", "grounding", lineage["index"], check.changed_documents,
                                       check.documents_fingerprint, questions=2)  # fmt: skip
    flagged.stale, flagged.p_value, flagged.reason = staleness.verdict([False, True], [True, True], 0.05)
    staleness.finish(settings, flagged, auto_rollback=False)
    assert flagged.stale and flagged.rolled_back_to is None

    collector_registry = CollectorRegistry()
    collector_registry.register(EvalScoresCollector(settings))
    exposition = generate_latest(collector_registry).decode()
    assert f'tandem_adapter_stale{{alias="{alias}"}} 1.0' in exposition
    assert 'tandem_adapter_stale{alias="evaltest"} 0.0' in exposition
    assert main(["adapters", "--alias", alias]) == 0
    assert re.search(rf"stale champion: {alias} v2 \(below on a set too small", capsys.readouterr().out)
    assert main(["adapters", "--alias", alias, "--json"]) == 0
    listed = {v["version"]: v["staleness"] for v in json.loads(capsys.readouterr().out)}
    assert listed[2]["stale"] is True and listed[1] is None
    assert main(["staleness", "check", "--alias", "nosuchalias"]) == 2
    assert "nosuchalias" in capsys.readouterr().err

    # TANDEM_AUTO_ROLLBACK=true: the same verdict rolls the champion back, with the reason in the registry.
    rolled = staleness.StalenessCheck(**{**flagged.to_dict(), "check_id": None, "checked_at": None})
    staleness.finish(settings, rolled, auto_rollback=True)
    assert rolled.rolled_back_to == 1 and rolled.rollback_error is None
    with connect() as conn:
        assert registry.get_champion(conn, alias).version == 1  # type: ignore[union-attr]
        left = registry.get_version(conn, alias, 2)
        assert left.status == "rolled_back" and "by the staleness check" in (left.reason or "")
        assert staleness.latest_check(conn, alias, 2).rolled_back_to == 1  # type: ignore[union-attr]
    exposition = generate_latest(collector_registry).decode()
    assert f'tandem_adapter_stale{{alias="{alias}"}} 0.0' in exposition  # v1 is champion and not stale


def test_the_gateway_role_reads_the_verdicts(pg_url: str) -> None:
    """The gauge is read by the gateway as role tandem_gateway: migration 0013 grants it the table, nothing more."""
    import psycopg

    from components.db.gateway_role import gateway_database_url
    from components.evaluation.staleness import champion_staleness

    with psycopg.connect(gateway_database_url(), autocommit=True) as conn:
        assert isinstance(champion_staleness(conn), list)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM staleness_checks")

"""The four arms end to end on a few sample questions through the real gateway, vLLM and Postgres."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from components.evaluation.qa import load_qa
from components.evaluation.run import resolve_qa_path, run_evaluation
from components.evaluation.scoring import answer_matches, source_matches

from .conftest import EVAL_ALIAS, STACK_QUESTIONS

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_four_arms_through_the_gateway(eval_gateway: str, eval_adapter: int, settings: Any, tmp_path: Path) -> None:
    from components.db import connect
    from serving.eval_metrics import EvalScoresCollector

    report = run_evaluation(settings, alias=EVAL_ALIAS, limit=STACK_QUESTIONS, out_dir=tmp_path / "report")
    expected = {q.id: q for q in load_qa(resolve_qa_path(settings, None), limit=STACK_QUESTIONS)}

    assert [a.arm for a in report.arms] == ["base", "base_rag", "adapter", "adapter_rag"]
    for arm in report.arms:
        assert arm.status == "ok" and arm.questions == STACK_QUESTIONS and arm.errors == 0, arm.label
        assert [x.qa_id for x in arm.answers] == list(expected)
        for x in arm.answers:  # the stored verdicts are the scorer's on the real answers
            assert x.correct == answer_matches(x.text, expected[x.qa_id].answer)
            assert x.completion_tokens > 0 and x.prompt_tokens > 0
        assert arm.accuracy == sum(x.correct for x in arm.answers) / STACK_QUESTIONS
        if arm.arm.startswith("adapter"):  # really served by the adapter's versioned name, not the fallback
            assert arm.adapter_version == eval_adapter and arm.fallbacks == 0
            assert {x.served_model for x in arm.answers} == {f"{EVAL_ALIAS}-v{eval_adapter}"}
        else:
            assert {x.served_model for x in arm.answers} == {settings.served_model_name}
        if arm.rag:
            for x in arm.answers:
                hit = any(source_matches(c, expected[x.qa_id].source) for c in x.cited_sources)
                assert x.source_hit == hit
                assert isinstance(x.source_attributed, bool)  # every answer of a retrieval arm gets a verdict
            assert arm.source_attributed_rate == sum(bool(x.source_attributed) for x in arm.answers) / STACK_QUESTIONS
        else:
            assert arm.source_hit_rate is None and all(not x.cited_sources for x in arm.answers)
            assert arm.source_attributed_rate is None and all(x.source_attributed is None for x in arm.answers)
    # Retrieval puts the numbered sources into the prompt: the token cost the report is about.
    assert report.arm("base_rag").prompt_tokens_mean > 5 * report.arm("base").prompt_tokens_mean  # type: ignore[operator]
    assert report.retrieval is not None and report.retrieval.errors == 0
    assert report.retrieval.recall_at_k >= 2 / 3  # the expected documents are indexed
    assert report.index.documents and report.index.chunks

    out = Path(report.out_dir or "")
    assert (out / "chart.png").read_bytes()[:4] == b"\x89PNG"
    assert f"run: {report.run_id}," in (out / "report.md").read_text()

    with connect() as conn:
        row = conn.execute(
            "SELECT adapter_version, questions, index_chunks FROM evaluation_runs WHERE id = %s", (report.run_id,)
        ).fetchone()
        assert row == (eval_adapter, STACK_QUESTIONS, report.index.chunks)
        stored = conn.execute("SELECT count(*) FROM evaluation_answers WHERE run_id = %s", (report.run_id,)).fetchone()
        assert stored == (4 * STACK_QUESTIONS,)
        rates = conn.execute(
            "SELECT arm, source_attributed_rate FROM evaluation_scores WHERE run_id = %s ORDER BY arm",
            (report.run_id,),
        ).fetchall()
        assert dict(rates) == {a.arm: a.source_attributed_rate for a in report.arms}

    registry = CollectorRegistry()
    registry.register(EvalScoresCollector(settings))
    text = generate_latest(registry).decode()
    hybrid = report.arm("adapter_rag").accuracy
    assert (
        f'tandem_eval_accuracy{{adapter_version="{eval_adapter}",alias="{EVAL_ALIAS}",arm="adapter_rag"}} {hybrid}'
        in text
    )


def test_cli_reports_no_adapter_for_an_alias_without_champion(eval_gateway: str, tmp_path: Path) -> None:
    from components.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["eval", "--alias", "nochampion", "--limit", "1", "--json", "--out", str(tmp_path / "r")])
    assert code == 0
    data = json.loads(out.getvalue())
    status = {a["arm"]: a["status"] for a in data["arms"]}
    assert status == {"base": "ok", "base_rag": "ok", "adapter": "no adapter", "adapter_rag": "no adapter"}
    assert data["adapter_version"] is None and data["run_id"] is not None
    assert "no champion adapter" in data["recommendation"]
    assert (tmp_path / "r" / "report.md").exists()

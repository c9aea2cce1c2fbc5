"""Train as you serve: examples rendered for training carry exactly the prompt the running gateway sends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.vllm

GROUNDED = [
    ("When does Corran Lock open for transits?", "Corran Lock opens two hours either side of high water [2]."),
    ("How early must the Heron Berths be booked?", "Heron Berths are booked at least 48 hours before arrival."),
    ("Who deploys the boom after a diesel sheen?", "The duty officer deploys the boom stored at the Gull Berths."),
]
NOT_IN_INDEX = ("What colour is the pilot launch?", "The pilot launch is orange with a white wheelhouse.")


def _dataset(tmp_path: Path, rows: list[dict[str, Any]]) -> Any:
    from components.training.data import load_dataset

    path = tmp_path / "examples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_dataset(str(path))


def _render(examples: list[Any], share: float = 0.0) -> Any:
    from components.db import connect
    from components.retrieval import serving_retriever
    from components.settings import get_settings
    from components.training.raft import render_examples

    settings = get_settings()
    with connect() as conn:
        return render_examples(
            examples, serving_retriever(conn, settings), settings.assistant_org, settings.rag_top_k,
            unanswerable_share=share,
        )  # fmt: skip


def test_rendered_examples_carry_the_prompt_the_gateway_sends(gateway: Any, tmp_path: Path) -> None:
    ds = _dataset(tmp_path, [{"question": q, "answer": a} for q, a in GROUNDED])
    report = _render(ds.examples)
    assert report.kinds["grounded"] == 3 and not report.problems
    with gateway.client() as http:
        for example, conversation in zip(ds.examples, report.conversations, strict=True):
            question = example.as_messages()[0]["content"]
            for model in (gateway.base_model, gateway.alias):
                resp = http.post(
                    "/v1/chat/prompt", json={"model": model, "messages": [{"role": "user", "content": question}]}
                )
                assert resp.status_code == 200, resp.text
                assert resp.json()["messages"] == conversation[:-1]  # the same strings, through both paths
                assert resp.json()["rag"] is True
            # the target cites the source that holds the answer, and only it
            target = conversation[-1]["content"]
            cited = int(target.split("[", 1)[1].split("]", 1)[0])
            sources = conversation[0]["content"].split("\n\n[")  # sources[0] holds the instruction and [1]
            assert example.answer.split()[0].lower() in sources[cited - 1].lower()
            assert target.count("[") == 1


def test_an_answer_in_no_retrieved_chunk_is_reported_with_its_line(gateway: Any, tmp_path: Path) -> None:
    q, a = NOT_IN_INDEX
    rows = [{"question": q, "answer": a}, {"question": GROUNDED[0][0], "answer": GROUNDED[0][1]}]
    rows.append({"question": "How do we sign letters?", "answer": "Kind regards, the harbour office.", "rag": False})
    ds = _dataset(tmp_path, rows)
    report = _render(ds.examples)
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"{ds.files[0]}:1: no retrieved chunk that holds the answer")
    assert all(q not in json.dumps(c) for c in report.conversations)  # not trained on
    assert report.kinds == {"grounded": 1, "plain": 1}
    plain = report.conversations[-1]
    assert [m["role"] for m in plain] == ["user", "assistant"]  # a plain example keeps no sources


def test_examples_whose_sources_lack_the_answer_say_so(gateway: Any, tmp_path: Path) -> None:
    from components.training.raft import MAX_DISTRACTOR_SUPPORT, NOT_IN_SOURCES, answer_support

    ds = _dataset(tmp_path, [{"question": q, "answer": a} for q, a in GROUNDED])
    report = _render(ds.examples, share=0.999)
    assert report.kinds["not_in_sources"] == 3
    for example, conversation in zip(ds.examples, report.conversations, strict=True):
        assert conversation[-1]["content"] == NOT_IN_SOURCES
        for source in conversation[0]["content"].split("Sources:\n", 1)[1].split("\n\n["):
            assert answer_support(example.answer, source.split("\n", 1)[-1]) < MAX_DISTRACTOR_SUPPORT


def test_prompt_endpoint_needs_a_key_and_a_known_model(gateway: Any) -> None:
    body = {"model": gateway.base_model, "messages": [{"role": "user", "content": "lock hours"}]}
    with gateway.client(key="wrong") as http:
        assert http.post("/v1/chat/prompt", json=body).status_code == 401
    with gateway.client() as http:
        resp = http.post("/v1/chat/prompt", json={**body, "model": "nope"})
        assert resp.status_code == 404
        resp = http.post("/v1/chat/prompt", json={**body, "rag": False})
        assert resp.json() == {"messages": body["messages"], "retrieved": [], "rag": False, "decoding": {}}

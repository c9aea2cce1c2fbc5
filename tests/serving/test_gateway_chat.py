"""The official openai client against the gateway: answers with citations, streaming, limits and auth."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest

from components.prompting import attributed_sources, cited_sources

Gateway = Any  # the `gateway` fixture (tests/serving/conftest.py)
ALIAS = "gwtest"

pytestmark = pytest.mark.vllm

QUESTION = "When does Corran Lock open for transits?"


def _client(gateway: Gateway, key: str = "") -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key or gateway.api_key, max_retries=0, timeout=120)


def _attributed(gateway: Gateway, retrieved: list[dict[str, Any]], answer: str) -> list[dict[str, Any]]:
    """What the gateway's attributions must be for this answer: the rule over the retrieved chunks' own text."""
    with gateway.client() as client:
        chunks = client.post("/v1/retrieve", json={"query": QUESTION}).json()["chunks"]
    assert [c["chunk_id"] for c in chunks] == [r["chunk_id"] for r in retrieved]
    return attributed_sources(retrieved, [SimpleNamespace(text=c["text"]) for c in chunks], answer)


def test_answer_with_citations(gateway: Gateway) -> None:
    raw = _client(gateway).chat.completions.with_raw_response.create(
        model=ALIAS, messages=[{"role": "user", "content": QUESTION}], max_tokens=8
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    data = completion.model_dump()
    retrieved = data["retrieved"]  # every source in the prompt; "citations" only those the answer cites
    assert retrieved and retrieved[0]["index"] == 1
    assert retrieved[0]["document_path"] == "lock.md"
    assert {"chunk_id", "source", "title", "heading", "score"} <= set(retrieved[0])
    assert data["citations"] == cited_sources(retrieved, completion.choices[0].message.content or "")
    assert data["attributions"] == _attributed(gateway, retrieved, completion.choices[0].message.content or "")
    assert data["tandem"] == {
        "alias": ALIAS,
        "adapter_version": data["tandem"]["adapter_version"],
        "served_model": f"{ALIAS}-v{data['tandem']['adapter_version']}",
        "rag": True,
        "fallback": False,
        "gateway_cited": data["tandem"]["gateway_cited"],  # [0] or []: test_gateway_citing checks the markers
    }
    assert "x-tandem-fallback" not in raw.headers


def test_streaming_ends_with_citations_event(gateway: Gateway) -> None:
    stream = _client(gateway).chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": QUESTION}], max_tokens=8, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = chunks[-1].model_dump()
    assert text
    assert final["object"] == "tandem.citations"
    assert final["retrieved"][0]["document_path"] == "lock.md"
    assert final["citations"] == cited_sources(final["retrieved"], text)
    assert final["attributions"] == _attributed(gateway, final["retrieved"], text)
    assert final["tandem"]["rag"] is True and final["tandem"]["alias"] == ALIAS


def test_stream_usage_only_when_asked(gateway: Gateway) -> None:
    stream = _client(gateway).chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"rag": False},
    )
    chunks = list(stream)
    assert any(c.usage and c.usage.completion_tokens > 0 for c in chunks)
    assert chunks[-1].model_dump()["tandem"] == {
        "alias": None,
        "adapter_version": None,
        "served_model": "smollm2-135m",
        "rag": False,
        "fallback": False,
    }


def test_rag_off_and_base_model(gateway: Gateway) -> None:
    completion = _client(gateway).chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=4,
        extra_body={"rag": False},
    )
    data = completion.model_dump()
    assert data["citations"] == [] and data["attributions"] == [] and data["retrieved"] == []
    assert data["tandem"]["rag"] is False and data["tandem"]["served_model"] == "smollm2-135m"


def test_retrieve_with_filters_as_bind_parameters(gateway: Gateway) -> None:
    with gateway.client() as client:
        found = client.post("/v1/retrieve", json={"query": "berth booking surcharge", "top_k": 2}).json()
        assert found["chunks"][0]["document_path"] == "berths.md"
        assert len(found["chunks"]) <= 2
        source = found["chunks"][0]["source"]
        same = client.post("/v1/retrieve", json={"query": "berth booking", "filters": {"source": source}})
        assert same.status_code == 200 and same.json()["chunks"]
        hostile = client.post("/v1/retrieve", json={"query": "berth", "filters": {"source": "x' OR '1'='1"}})
        assert hostile.status_code == 200 and hostile.json()["chunks"] == []


def test_unknown_model_is_404(gateway: Gateway) -> None:
    with pytest.raises(openai.NotFoundError, match="not found"):
        _client(gateway).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"max_tokens": 10_000}, 400, "max_tokens"),
        ({"top_k": 500}, 400, "top_k"),
        ({"messages": [{"role": "user", "content": "hi"}] * 9}, 400, "messages"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "x" * 70_000}]}, 413, None),
    ],
)
def test_limits_are_4xx_with_one_line_message(gateway: Gateway, body: dict, status: int, param: str | None) -> None:
    request = {"model": ALIAS, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
    with gateway.client() as client:
        response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"] and "\n" not in error["message"]


def test_api_keys(gateway: Gateway) -> None:
    body = {"query": "lock"}
    assert httpx.post(gateway.url + "/v1/retrieve", json=body).status_code == 401
    with gateway.client("wrong") as client:
        assert client.post("/v1/retrieve", json=body).json()["error"]["code"] == "invalid_api_key"
    with gateway.client() as client:
        assert client.post("/v1/retrieve", json=body).status_code == 200
        assert client.get("/v1/admin/adapters").status_code == 403
    with gateway.admin() as client:
        assert client.post("/v1/retrieve", json=body).status_code == 200  # admin keys are API keys too
        assert client.get("/v1/admin/adapters").status_code == 200
    assert httpx.get(gateway.url + "/health").json()["replicas"]["healthy"] == 1


def test_models_lists_base_and_alias(gateway: Gateway) -> None:
    ids = [m.id for m in _client(gateway).models.list()]
    assert ids[0] == "smollm2-135m"
    assert ALIAS in ids


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/admin/adapters/promote", {"alias": "bad\x00alias", "version": 1}, "alias"),
        ("/v1/admin/adapters/rollback", {"alias": "../etc"}, "alias"),
        ("/v1/retrieve", {"query": "lock\x00"}, "query"),
    ],
)
def test_text_postgres_cannot_hold_is_400(gateway: Gateway, path: str, body: dict, param: str) -> None:
    """Found by schemathesis: a NUL in an alias reached Postgres and came back as a 500."""
    with gateway.admin() as admin:
        response = admin.post(path, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_nul_in_question_still_answers(gateway: Gateway) -> None:
    request = {"model": ALIAS, "messages": [{"role": "user", "content": "lock\x00 hours"}], "max_tokens": 4}
    with gateway.client() as client:
        response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text

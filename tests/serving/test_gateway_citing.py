"""The gateway cites, for a grounded answer that cites nothing, the sources its sentences stand on."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import openai
import pytest

from components.prompting import citations_for, cited_numbers
from serving import metrics as m
from serving.routers.chat import _cite_in_stream, _citer
from serving.routes import Route

Gateway = Any  # the `gateway` fixture (tests/serving/conftest.py)
QUESTION = "When does Corran Lock open for transits?"
SOURCE = "Corran Lock opens for transits two hours either side of high water."


def _counted(alias: str, by: str) -> float:
    return m.REGISTRY.get_sample_value("tandem_rag_answer_citations_total", {"alias": alias, "cited_by": by}) or 0.0


def test_every_grounded_answer_is_counted_by_who_cited_it() -> None:
    chunk = {"chunk_id": 1, "document_path": "lock.md", "source": "s", "title": None, "heading": None, "score": 0.5}
    chunks = [SimpleNamespace(**chunk, text=SOURCE)]
    retrieved = citations_for(chunks)
    route = Route("citing-test", 1, "citing-test-v1")
    on = _citer(SimpleNamespace(settings=SimpleNamespace(rag_cite_attributed=True)), route, retrieved, chunks)
    off = _citer(SimpleNamespace(settings=SimpleNamespace(rag_cite_attributed=False)), route, retrieved, chunks)
    before = {by: _counted("citing-test", by) for by in ("model", "gateway", "none")}
    assert on(SOURCE) == " [1]"
    assert on(SOURCE[:-1] + " [1].") == ""  # the model cited: nothing added
    assert on("I do not know.") == ""  # no source holds it
    assert off(SOURCE) == ""  # citing off: the text stays the model's
    after = {by: _counted("citing-test", by) for by in ("model", "gateway", "none")}
    assert {by: after[by] - before[by] for by in after} == {"model": 1, "gateway": 1, "none": 2}


@pytest.mark.parametrize("marker", [" [1]", ""])
def test_a_stream_sends_the_text_a_non_streamed_answer_has(marker: str) -> None:
    deltas = ["Corran Lock", " opens at high water.\n", "\n", "\n"]
    said: list[str] = []
    held: dict[int, str] = {}
    cited: list[int] = []
    sent = []
    for i, delta in enumerate(deltas):
        choice = {"index": 0, "delta": {"content": delta}, "finish_reason": "length" if i == len(deltas) - 1 else None}
        said.append(delta)
        _cite_in_stream(choice, delta, said, held, lambda text: marker, cited)
        sent.append(choice["delta"]["content"])
    whole = "".join(deltas)
    # with a marker: right after the text, as in a non-streamed answer; without: the text as the model wrote it
    assert "".join(sent) == (whole.rstrip() + marker if marker else whole) == "".join(said)
    assert cited == ([0] if marker else [])


@pytest.mark.vllm
def test_an_answer_that_copies_its_source_is_cited_in_both_kinds_of_answer(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.api_key, max_retries=0, timeout=120)
    ask = {"model": gateway.base_model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16}
    before = _counted(gateway.base_model, "gateway")
    data = client.chat.completions.create(**ask).model_dump()  # type: ignore[call-overload]
    text = data["choices"][0]["message"]["content"]
    retrieved = data["retrieved"]
    assert retrieved[0]["document_path"] == "lock.md"
    # The base model copies the lock's opening rule without a marker; the gateway cites the source holding it.
    assert data["tandem"]["gateway_cited"] == [0], text
    assert text.endswith(" [1]") and cited_numbers(text, len(retrieved)) == [1]
    assert data["citations"] == [retrieved[0]] == data["attributions"]
    assert _counted(gateway.base_model, "gateway") == before + 1

    chunks = list(client.chat.completions.create(**ask, stream=True))  # type: ignore[call-overload]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = chunks[-1].model_dump()
    assert streamed == text  # the marker went out with the stream's last text
    assert final["citations"] == data["citations"] and final["tandem"]["gateway_cited"] == [0]


@pytest.mark.vllm
def test_an_answer_without_retrieval_is_not_cited(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.api_key, max_retries=0, timeout=120)
    data = client.chat.completions.create(
        model=gateway.base_model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=8,
        extra_body={"rag": False},
    ).model_dump()
    assert "gateway_cited" not in data["tandem"] and data["citations"] == []

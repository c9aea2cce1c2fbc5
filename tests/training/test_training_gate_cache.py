"""The gate's answer cache on the real Postgres and the real vLLM: a model asked the same prompt again is not
asked twice, a sampled answer is never reused, rewritten weights are a new model, and unused rows expire."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from components.db import connect
from components.models import base_model_path
from components.settings import Settings
from components.training.answer_cache import AnswerCache, answer_key, cacheable, model_identity
from components.training.gate import Question, answer_all
from components.training.vllm_client import VllmClient

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?", "What colour is the sky?"]


def _sets() -> dict[str, list[Question]]:
    return {"general": [Question([{"role": "user", "content": q}], "x", True) for q in QUESTIONS]}


class Counted:
    """The real vLLM client, counting what is asked of it."""

    def __init__(self, client: VllmClient) -> None:
        self.client, self.asked = client, 0

    def chat(self, *args: Any, **kwargs: Any) -> str:
        self.asked += 1
        return self.client.chat(*args, **kwargs)


@pytest.mark.vllm
def test_a_second_gate_asks_vllm_nothing_the_model_already_answered(
    pg_url: str, vllm_server: str, settings: Settings
) -> None:
    settings = settings.model_copy(update={"gate_max_tokens": 8})
    model = settings.served_model_name
    identity = model_identity(settings, model, base_model_path(settings)) + uuid.uuid4().hex  # this test's own
    cache = AnswerCache(settings)
    with VllmClient.for_settings(settings) as real:
        client = Counted(real)
        first = answer_all(client, model, _sets(), settings, cache, identity)  # type: ignore[arg-type]
        assert client.asked == 3 and cache.looked_up == 3 and cache.found == 0
        again = answer_all(client, model, _sets(), settings, cache, identity)  # type: ignore[arg-type]
        assert again == first and all(first["general"])
        assert client.asked == 3 and cache.found == 3  # nothing asked the second time

        other = answer_all(client, model, _sets(), settings, cache, identity + "-other")  # type: ignore[arg-type]
        assert client.asked == 6 and other["general"]  # another model identity: asked again

        sampled = _sets()
        sampled["general"][0].rag = True  # with decoding that samples: never reused
        hot = settings.model_copy(update={"rag_decoding_base": {"temperature": 0.8, "max_tokens": 8}})
        answer_all(client, model, sampled, hot, cache, identity)  # type: ignore[arg-type]
        answer_all(client, model, sampled, hot, cache, identity)  # type: ignore[arg-type]
        assert client.asked == 8  # the sampled question twice; the other two came from the cache both times


def test_only_a_deterministic_answer_is_cacheable() -> None:
    assert cacheable({}) and cacheable({"temperature": 0.0, "repetition_penalty": 1.1})
    assert not cacheable({"temperature": 0.7})


def test_rewritten_weights_are_a_new_model(tmp_path: Path, settings: Settings) -> None:
    weights = tmp_path / "adapter"
    weights.mkdir()
    (weights / "adapter_model.safetensors").write_bytes(b"one")
    before = model_identity(settings, "a-v1", str(weights))
    assert model_identity(settings, "a-v1", str(weights)) == before
    (weights / "adapter_model.safetensors").write_bytes(b"two")
    os.utime(weights / "adapter_model.safetensors", ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = model_identity(settings, "a-v1", str(weights))
    assert changed != before
    messages = [{"role": "user", "content": "q"}]
    assert answer_key(before, messages, 8, {}) != answer_key(changed, messages, 8, {})
    assert answer_key(before, messages, 8, {}) != answer_key(before, messages, 9, {})  # max_tokens decides too
    assert model_identity(settings, "a-v2", str(weights)) != changed  # another served name
    assert model_identity(settings.model_copy(update={"vllm_dtype": "bfloat16"}), "a-v1", str(weights)) != changed


def test_answers_unused_for_the_set_days_expire(pg_url: str, settings: Settings) -> None:
    cache = AnswerCache(settings.model_copy(update={"gate_answer_cache_days": 30}))
    old, fresh = uuid.uuid4().hex * 2, uuid.uuid4().hex * 2
    cache.put([(old, "m", "old answer"), (fresh, "m", "fresh answer")])
    with connect(settings, vector=False) as conn:
        conn.execute("UPDATE gate_answers SET used_at = now() - interval '31 days' WHERE key = %s", (old,))
    assert cache.prune() >= 1
    assert cache.get([old, fresh]) == {fresh: "fresh answer"}
    with pytest.raises(Exception, match="gate_answers_key_check"):
        cache.put([("not a digest", "m", "x")])

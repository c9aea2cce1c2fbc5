"""Request bodies of the gateway's API.

The chat body is an allowlist: the OpenAI chat-completion fields listed in ``ChatCompletionRequest`` and
Tandem's own (``rag``, ``top_k``, ``filters``, ``repetition_penalty``); any other field is answered 400
"unsupported parameter 'NAME'" before anything reaches vLLM, so vLLM's own options (``ignore_eos``,
``chat_template``, ``min_tokens``, guided decoding, ...) cannot lift the gateway's limits or replace its prompt.
Left out on purpose: ``tools``/``functions`` (nothing here runs them), ``response_format`` and ``logit_bias``
(guided decoding and biases vLLM compiles per request), ``prediction``, ``audio``, ``modalities``.
Static bounds live here; the bounds an operator sets (n, message length, filters) are checked with the
settings in serving/limits.py.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


def _no_nul(value: str) -> str:
    # Postgres text cannot hold U+0000; say so instead of failing deep in a query.
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
Alias = Annotated[str, Field(min_length=1, max_length=63, pattern=ALIAS_PATTERN, description="letters, digits, . _ -")]

FilterScalar = Annotated[Text, Field(max_length=1024)] | int | float | bool
FilterValue = FilterScalar | Annotated[list[FilterScalar], Field(max_length=1024)]
Filters = Annotated[
    dict[Annotated[Text, Field(min_length=1, max_length=128)], FilterValue],
    Field(max_length=256, description="metadata filters, e.g. {'source': 'policies'}; values are bind parameters"),
]
Stop = Annotated[str, Field(min_length=1, max_length=256)]


class Strict(BaseModel):
    """Unknown fields are refused (answered 400 "unsupported parameter 'NAME'")."""

    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str  # a NUL is dropped before retrieval (components/prompting.py), vLLM takes it as it is


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(max_length=64)] | None = None
    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None


class StreamOptions(Strict):
    include_usage: bool | None = None


class RagOptions(Strict):
    """Tandem's extra body fields (``extra_body=`` in the openai client)."""

    rag: bool = Field(True, description="retrieve chunks and ground the answer in them")
    top_k: int | None = Field(None, ge=1, le=1000, description="chunks to retrieve (default TANDEM_RAG_TOP_K)")
    filters: Filters | None = None


class ChatCompletionRequest(RagOptions):
    model: Text = Field(min_length=1, max_length=200, description="an alias, a served adapter name or the base model")
    messages: list[Message] = Field(min_length=1, max_length=1024)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    n: int | None = Field(None, ge=1, le=128, description="choices to generate (at most TANDEM_MAX_N)")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=5)
    user: Annotated[str, Field(max_length=256)] | None = None
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)

    def choices(self) -> int:
        return self.n or 1


class RetrieveRequest(Strict):
    query: Text = Field(min_length=1, max_length=8192)
    top_k: int | None = Field(None, ge=1, le=1000)
    filters: Filters | None = None


class PromoteRequest(BaseModel):
    alias: Alias
    version: int = Field(ge=1, le=2**31 - 1)
    force: bool = Field(False, description="promote a version the evaluation gate rejected (a human override)")
    reason: Text | None = Field(None, max_length=500, description="recorded in the registry with the promotion")


class StageRequest(BaseModel):
    alias: Alias
    version: int = Field(ge=1, le=2**31 - 1)
    force: bool = Field(False, description="stage a version the evaluation gate rejected")


class RollbackRequest(BaseModel):
    alias: Alias

"""Request bodies of the gateway's API. OpenAI fields Tandem does not look at pass through to vLLM unchanged."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


def _no_nul(value: str) -> str:
    # Postgres text cannot hold U+0000; say so instead of failing deep in a query.
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
Alias = Annotated[str, Field(min_length=1, max_length=63, pattern=ALIAS_PATTERN, description="letters, digits, . _ -")]

FilterScalar = Text | int | float | bool
FilterValue = FilterScalar | list[FilterScalar]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class RagOptions(BaseModel):
    """Tandem's extra body fields (``extra_body=`` in the openai client)."""

    rag: bool = Field(True, description="retrieve chunks and ground the answer in them")
    top_k: int | None = Field(None, ge=1, description="chunks to retrieve (default TANDEM_RAG_TOP_K)")
    filters: dict[Text, FilterValue] | None = Field(
        None, description="metadata filters, e.g. {'source': 'policies'}; values are bind parameters"
    )


class ChatCompletionRequest(RagOptions):
    model_config = ConfigDict(extra="allow")

    model: Text = Field(min_length=1, max_length=200, description="an alias, a served adapter name or the base model")
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stop: str | list[str] | None = None
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    stream_options: dict[str, Any] | None = None


class RetrieveRequest(BaseModel):
    query: Text = Field(min_length=1, max_length=8192)
    top_k: int | None = Field(None, ge=1)
    filters: dict[Text, FilterValue] | None = None


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

"""Request bodies of the gateway's API. OpenAI fields Tandem does not look at pass through to vLLM unchanged."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FilterScalar = str | int | float | bool
FilterValue = FilterScalar | list[FilterScalar]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class RagOptions(BaseModel):
    """Tandem's extra body fields (``extra_body=`` in the openai client)."""

    rag: bool = Field(True, description="retrieve chunks and ground the answer in them")
    top_k: int | None = Field(None, ge=1, description="chunks to retrieve (default TANDEM_RAG_TOP_K)")
    filters: dict[str, FilterValue] | None = Field(
        None, description="metadata filters, e.g. {'source': 'policies'}; values are bind parameters"
    )


class ChatCompletionRequest(RagOptions):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=200, description="an alias, a served adapter name or the base model")
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stop: str | list[str] | None = None
    stream_options: dict[str, Any] | None = None


class RetrieveRequest(BaseModel):
    query: str = Field(min_length=1, max_length=8192)
    top_k: int | None = Field(None, ge=1)
    filters: dict[str, FilterValue] | None = None


class PromoteRequest(BaseModel):
    alias: str = Field(min_length=1, max_length=63)
    version: int = Field(ge=1, le=2**31 - 1)


class RollbackRequest(BaseModel):
    alias: str = Field(min_length=1, max_length=63)

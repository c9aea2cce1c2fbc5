"""The RAG prompt: one system message with numbered sources, shared by the gateway and the training data.

The format is a contract: the fine-tuned adapter is trained on prompts built here, so the gateway must send
exactly the same text at inference time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class ChunkLike(Protocol):
    """The fields of ``components.retrieval.RetrievedChunk`` that prompting reads."""

    @property
    def chunk_id(self) -> Any: ...
    @property
    def document_path(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def title(self) -> str | None: ...
    @property
    def heading(self) -> Any: ...  # "A > B" or the heading path as a list
    @property
    def text(self) -> str: ...
    @property
    def score(self) -> float: ...


INSTRUCTION = (
    "You are the assistant of {org}. Answer the question using only the numbered sources below and cite them "
    "like [1]. If the sources do not contain the answer, say that you do not know."
)


def heading_text(heading: Any) -> str:
    """A heading path as one line: ``Part > Section`` (lists are joined, None is empty)."""
    if not heading:
        return ""
    if isinstance(heading, str):
        return heading
    return " > ".join(str(h) for h in heading if h)


def source_label(chunk: ChunkLike) -> str:
    """``document_path > heading`` (just the path when the chunk has no heading)."""
    heading = heading_text(chunk.heading)
    return f"{chunk.document_path} > {heading}" if heading else chunk.document_path


def system_prompt(chunks: Sequence[ChunkLike], org: str) -> str:
    """The system message text: the instruction, then each source as ``[n] path > heading`` and its text."""
    sources = "\n\n".join(f"[{i}] {source_label(c)}\n{c.text.strip()}" for i, c in enumerate(chunks, 1))
    return f"{INSTRUCTION.format(org=org)}\n\nSources:\n{sources}"


def build_rag_messages(messages: list[dict[str, Any]], chunks: Sequence[ChunkLike], org: str) -> list[dict[str, Any]]:
    """Messages with the RAG system prompt first; a caller's own system message is kept after it.

    The caller's system text is appended to ours (one system message, since many chat templates accept only
    one, and first), so instructions like "answer in French" survive. The input list is not modified.
    """
    prompt = system_prompt(chunks, org)
    rest = [dict(m) for m in messages]
    if rest and rest[0].get("role") == "system":
        own = rest.pop(0).get("content")
        if isinstance(own, list):  # content parts: keep the text ones
            own = "\n".join(p.get("text", "") for p in own if isinstance(p, dict) and p.get("type") == "text")
        if own:
            prompt = f"{prompt}\n\n{own}"
    return [{"role": "system", "content": prompt}, *rest]


def query_text(messages: Sequence[dict[str, Any]]) -> str:
    """What retrieval is asked: the text of the last user message (text parts joined, NULs dropped: it becomes
    a Postgres query), or ''. The gateway and the training data both retrieve with it."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            text = ""
            if isinstance(content, str):
                text = content
            elif isinstance(content, list):
                text = " ".join(
                    str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
                )
            return text.replace("\x00", "").strip()
    return ""


def decoding_defaults(settings: Any, adapter: bool) -> dict[str, Any]:
    """The sampling fields an answer grounded in sources gets where the caller leaves them unset."""
    return dict(settings.rag_decoding_adapter if adapter else settings.rag_decoding_base)


def citations_for(chunks: Sequence[ChunkLike]) -> list[dict[str, Any]]:
    """The response's ``citations`` list: numbered like the sources in the prompt."""
    return [
        {
            "index": i,
            "chunk_id": c.chunk_id,
            "source": c.source,
            "document_path": c.document_path,
            "title": c.title,
            "heading": heading_text(c.heading) or None,
            "score": round(float(c.score), 6),
        }
        for i, c in enumerate(chunks, 1)
    ]

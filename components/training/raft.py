"""Train as you serve: domain examples rendered into the exact prompt the gateway will send for them.

Retrieval-augmented fine-tuning (RAFT, arXiv 2403.10131): each question is asked of Tandem's own retriever on
the live index, and the example becomes the gateway's RAG prompt for those chunks (``build_rag_messages``, the
one prompt builder) with a target that takes its facts from the chunk holding the answer and cites it by
number. A share of examples get sources that lack the answer and a target that says so. The adapter learns to
find and copy the right span among distractors, which a small model can learn, rather than to memorise facts
that change.

Which chunk holds the answer: a chunk of the document the example names (``"source"``) when it has one, else
the retrieved chunk whose text covers most of the answer's content words. An example whose answer is in no
retrieved chunk and that names no source is reported with its line and left out: trained on, it would teach the
model to answer without evidence. Examples marked ``"rag": false`` (vocabulary, format, tone) stay plain.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from components.attribution import MIN_SUPPORT, answer_support
from components.evaluation.scoring import key_words, normalize, source_matches
from components.prompting import ChunkLike, build_rag_messages, is_rag_prompt, query_text, strip_citations
from components.training.data import Example

Retrieve = Callable[[str, int], Sequence[ChunkLike]]
DocumentChunks = Callable[[str], Sequence[ChunkLike]]

# The target of an example whose sources lack the answer: the instruction's own words, no domain in it.
NOT_IN_SOURCES = "The sources do not contain the answer, so I do not know."
# Chunks covering at least this share are kept out of the sources of an "answer is not here" example.
MAX_DISTRACTOR_SUPPORT = 0.34
_FIRST_STOP = re.compile(r"[.!?](?=\s|$)")


@dataclass
class RenderReport:
    """Rendered conversations plus what happened to each input example."""

    conversations: list[list[dict[str, Any]]] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)  # grounded, not_in_sources, plain, oracle_added
    problems: list[str] = field(default_factory=list)  # "file:line: why", examples left out
    # Per grounded example, the document its answer was taken from and the answer's words that chunk held: the
    # lineage the staleness check (components/evaluation/staleness.py) reads after documents change.
    grounding: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"rendered": len(self.conversations), **dict(self.kinds), "left_out": len(self.problems)}


def cite(answer: str, number: int) -> str:
    """The answer with its old citation markers dropped and ``[number]`` at the end of its first sentence."""
    body = strip_citations(answer)
    stop = _FIRST_STOP.search(body)
    if stop is None:
        return f"{body} [{number}]"
    return f"{body[: stop.start()]} [{number}]{body[stop.start() :]}"


def _share(example: Example) -> float:
    """A number in [0, 1) fixed by the example, independent of the one that decides its split."""
    return int(hashlib.sha256(f"raft:{example.digest}".encode()).hexdigest()[:12], 16) / float(1 << 48)


def _best_chunk(answer: str, chunks: Sequence[ChunkLike], source: str | None) -> tuple[int, float] | None:
    """Index and support of the chunk that holds the answer (ties go to the higher-ranked chunk)."""
    best: tuple[int, float] | None = None
    for i, chunk in enumerate(chunks):
        if source and not source_matches(chunk.document_path, source):
            continue
        support = answer_support(answer, chunk.text)
        if support >= MIN_SUPPORT and (best is None or support > best[1]):
            best = (i, support)
    return best


def without_old_sources(example: Example) -> list[dict[str, Any]]:
    """The conversation minus a system message that is an old rendering of the RAG prompt."""
    messages = example.as_messages()
    if messages and messages[0]["role"] == "system" and is_rag_prompt(str(messages[0]["content"])):
        return messages[1:]
    return messages


def render_example(
    example: Example,
    retrieve: Retrieve,
    org: str,
    top_k: int,
    *,
    unanswerable_share: float = 0.1,
    document_chunks: DocumentChunks | None = None,
) -> tuple[list[dict[str, Any]] | None, str]:
    """One example as the gateway would prompt it, and its kind; (None, why) when it must be left out."""
    conversation, kind, _ = _render(
        example, retrieve, org, top_k, unanswerable_share=unanswerable_share, document_chunks=document_chunks
    )
    return conversation, kind


def grounding_record(example: Example, chunk: ChunkLike) -> dict[str, Any]:
    """What a grounded example was trained on: its question and answer, the chunk's document, and the answer's
    content words that chunk held (so a later check can tell which of them the document no longer holds)."""
    answer = strip_citations(example.answer)
    held = set(normalize(chunk.text).split())
    return {
        "question": query_text(without_old_sources(example)[:-1]),
        "answer": answer,
        "document": chunk.document_path,
        "source": chunk.source,
        "evidence": sorted({w for w in key_words(answer, whole=True) if w in held}),
    }


def _render(
    example: Example,
    retrieve: Retrieve,
    org: str,
    top_k: int,
    *,
    unanswerable_share: float,
    document_chunks: DocumentChunks | None,
) -> tuple[list[dict[str, Any]] | None, str, ChunkLike | None]:
    """``render_example`` plus the chunk the target cites (None when it cites none)."""
    messages = without_old_sources(example)
    if example.plain:
        return messages, "plain", None
    *prompt, answer_turn = messages
    answer = str(answer_turn["content"])
    query = query_text(prompt)
    if not query:
        return None, "no user text to retrieve with", None
    if _share(example) < unanswerable_share:
        pool = retrieve(query, top_k * 3)
        distractors = [
            c
            for c in pool
            if answer_support(answer, c.text) < MAX_DISTRACTOR_SUPPORT
            and not (example.source and source_matches(c.document_path, example.source))
        ][:top_k]
        if distractors:
            return (
                [*build_rag_messages(prompt, distractors, org), {"role": "assistant", "content": NOT_IN_SOURCES}],
                "not_in_sources",
                None,
            )
    chunks = list(retrieve(query, top_k))
    found = _best_chunk(answer, chunks, example.source)
    kind = "grounded"
    if found is None and example.source and document_chunks is not None:
        # The named document was not retrieved: put its best chunk in place of the last one (RAFT's oracle).
        own = _best_chunk(answer, document_chunks(example.source), None)
        if own is not None and chunks:
            chunks[-1] = document_chunks(example.source)[own[0]]
            found, kind = (len(chunks) - 1, own[1]), "oracle_added"
    if found is None:
        where = f"named source {example.source} has no chunk" if example.source else "no retrieved chunk"
        return None, f'{where} that holds the answer (and it is not marked "rag": false)', None
    target = cite(answer, found[0] + 1)
    return [*build_rag_messages(prompt, chunks, org), {"role": "assistant", "content": target}], kind, chunks[found[0]]


def render_examples(
    examples: Sequence[Example],
    retrieve: Retrieve,
    org: str,
    top_k: int,
    *,
    unanswerable_share: float = 0.1,
    document_chunks: DocumentChunks | None = None,
) -> RenderReport:
    """Every example through ``render_example``; the left-out ones are reported as ``file:line: why``."""
    report = RenderReport()
    for example in examples:
        conversation, kind, chunk = _render(
            example,
            retrieve,
            org,
            top_k,
            unanswerable_share=unanswerable_share,
            document_chunks=document_chunks,
        )
        if conversation is None:
            report.problems.append(f"{example.origin}: {kind}")
            continue
        report.kinds[kind] += 1
        report.conversations.append(conversation)
        if chunk is not None:
            report.grounding.append(grounding_record(example, chunk))
    return report

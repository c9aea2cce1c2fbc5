"""Token-aware chunking with the embedding model's own tokenizer.

Text is split into blocks (headings, paragraphs, fenced code); blocks are packed into chunks of at most
``max_tokens`` tokens that never cross a heading, with ``overlap`` tokens of whole trailing paragraphs or
sentences repeated at the start of the next chunk. Oversized paragraphs split at sentences, oversized
sentences at token windows. Each chunk keeps its heading path and its [char_start, char_end) span in the
document text, so ``text == document_text[char_start:char_end]`` (citations point at the exact place).
"""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_left
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

_HEADING_START = re.compile(r"(#{1,6})[ \t]+")  # the title is cut with rstrip: see _heading
_FENCE = re.compile(r"^(```|~~~)")
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+(?=\S)")
CHUNKER_VERSION = "1"


@dataclass(frozen=True)
class Chunk:
    ordinal: int
    heading: tuple[str, ...]
    text: str
    char_start: int
    char_end: int
    token_count: int
    embed_text: str  # what the model sees: heading path (or title), a blank line, then the text
    text_hash: str  # of embed_text: equal hash, equal embedding


def chunking_signature(max_tokens: int, overlap: int) -> str:
    """Stored with each indexed document: other chunking settings mean the document is chunked again."""
    return f"v{CHUNKER_VERSION}:max{max_tokens}:overlap{overlap}"


@lru_cache(maxsize=4)
def load_tokenizer(model_path: str) -> Any:
    """The embedding model's fast tokenizer (no model weights loaded), without truncation or padding."""
    from tokenizers import Tokenizer

    file = Path(model_path) / "tokenizer.json"
    if file.exists():
        tokenizer = Tokenizer.from_file(str(file))
    else:  # a hub id: let transformers find the tokenizer
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path).backend_tokenizer
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


class _Tokens:
    """Token start offsets of one text, to count the tokens of any character span by bisection."""

    def __init__(self, tokenizer: Any, text: str) -> None:
        offsets = tokenizer.encode(text, add_special_tokens=False).offsets
        self.starts = [s for s, _ in offsets]

    def count(self, start: int, end: int) -> int:
        return bisect_left(self.starts, end) - bisect_left(self.starts, start)

    def window_ends(self, start: int, end: int, size: int, step: int) -> list[tuple[int, int]]:
        """Split [start, end) into windows of `size` tokens advancing by `step` tokens (char spans)."""
        first, last = bisect_left(self.starts, start), bisect_left(self.starts, end)
        spans = []
        i = first
        while i < last:
            j = min(i + size, last)
            span_end = self.starts[j] if j < last else end
            spans.append((self.starts[i] if i > first else start, span_end))
            if j >= last:
                break
            i += step
        return spans


def _heading(line: str) -> tuple[int, str] | None:
    """(level, title) of a stripped Markdown heading line, else None.

    Reads the line as ``^(#{1,6})[ \\t]+(.*?)[ \\t#]*$`` would, in linear time: that pattern backtracks
    quadratically on a long run of spaces (a 100 KB line took minutes), so the trailing part is cut with rstrip.
    """
    match = _HEADING_START.match(line)
    if match is None:
        return None
    return len(match.group(1)), line[match.end() :].rstrip(" \t#")


def _blocks(text: str, start: int) -> list[tuple[str, int, int, int]]:
    """(kind, start, end, level) for headings ('h') and paragraphs ('p') of text[start:]."""
    blocks: list[tuple[str, int, int, int]] = []
    para_start: int | None = None
    para_end = 0
    in_fence = False
    pos = start
    for line in text[start:].splitlines(keepends=True):
        line_start, pos = pos, pos + len(line)
        stripped = line.strip()
        content_end = line_start + len(line.rstrip("\r\n"))
        if _FENCE.match(stripped):
            in_fence = not in_fence
        heading = None if in_fence else _heading(stripped)
        if heading or (not stripped and not in_fence):
            if para_start is not None:
                blocks.append(("p", para_start, para_end, 0))
                para_start = None
            if heading:
                blocks.append(("h", line_start, content_end, heading[0]))
            continue
        if para_start is None:
            para_start = line_start + (len(line) - len(line.lstrip()))
        para_end = content_end
    if para_start is not None:
        blocks.append(("p", para_start, para_end, 0))
    return blocks


def _units(text: str, tokens: _Tokens, start: int, end: int, budget: int, overlap: int) -> list[tuple[int, int, int]]:
    """(start, end, tokens) pieces of one paragraph, each within the budget."""
    n = tokens.count(start, end)
    if n <= budget:
        return [(start, end, n)]
    units: list[tuple[int, int, int]] = []
    sentence_start = start
    bounds = [m.start() + start for m in _SENTENCE_END.finditer(text[start:end])] + [end]
    for bound in bounds:
        piece_end = len(text[sentence_start:bound].rstrip()) + sentence_start
        if piece_end <= sentence_start:
            continue
        m = tokens.count(sentence_start, piece_end)
        if m <= budget:
            units.append((sentence_start, piece_end, m))
        else:
            step = max(1, budget - overlap)
            for a, b in tokens.window_ends(sentence_start, piece_end, budget, step):
                units.append((a, b, tokens.count(a, b)))
        rest = text[bound:end]
        sentence_start = bound + (len(rest) - len(rest.lstrip()))
    return units


def chunk_text(
    text: str,
    *,
    tokenizer: Any,
    max_tokens: int,
    overlap: int,
    title: str = "",
    body_start: int = 0,
) -> list[Chunk]:
    """Chunks of `text` (see the module docstring); empty when there is no body text."""
    if overlap >= max_tokens:
        raise ValueError("overlap must be smaller than max_tokens")
    tokens = _Tokens(tokenizer, text)
    heading_tokens: dict[str, int] = {}
    path: list[tuple[int, str]] = []
    sections: list[tuple[tuple[str, ...], list[tuple[int, int]]]] = [((), [])]
    for kind, start, end, level in _blocks(text, body_start):
        if kind == "h":
            while path and path[-1][0] >= level:
                path.pop()
            path.append((level, _heading(text[start:end].strip())[1].strip()))  # type: ignore[index]
            sections.append((tuple(h for _, h in path), []))
        else:
            sections[-1][1].append((start, end))

    chunks: list[Chunk] = []
    for heading, paragraphs in sections:
        if not paragraphs:
            continue
        prefix = " > ".join(heading) if heading else title
        if prefix not in heading_tokens:
            heading_tokens[prefix] = len(tokenizer.encode(prefix, add_special_tokens=False).ids) + 2
        budget = max(16, max_tokens - heading_tokens[prefix])
        units = [u for s, e in paragraphs for u in _units(text, tokens, s, e, budget, overlap)]
        for span_start, span_end in _pack(units, budget, overlap):
            body = text[span_start:span_end]
            embed_text = f"{prefix}\n\n{body}" if prefix else body
            chunks.append(
                Chunk(
                    ordinal=len(chunks),
                    heading=heading,
                    text=body,
                    char_start=span_start,
                    char_end=span_end,
                    token_count=tokens.count(span_start, span_end),
                    embed_text=embed_text,
                    text_hash=hashlib.sha256(embed_text.encode()).hexdigest()[:32],
                )
            )
    return chunks


def _pack(units: list[tuple[int, int, int]], budget: int, overlap: int) -> list[tuple[int, int]]:
    """Greedy packing of consecutive units into spans of <= budget tokens, with trailing-unit overlap."""
    spans: list[tuple[int, int]] = []
    current: list[tuple[int, int, int]] = []
    total = 0
    fresh = 0  # units in `current` not already emitted in a previous chunk
    for unit in units:
        if current and total + unit[2] > budget:
            spans.append((current[0][0], current[-1][1]))
            carried: list[tuple[int, int, int]] = []
            carried_tokens = 0
            for prev in reversed(current[1:]):  # never carry the whole chunk: each chunk must advance
                if carried_tokens + prev[2] > overlap or carried_tokens + prev[2] + unit[2] > budget:
                    break
                carried.insert(0, prev)
                carried_tokens += prev[2]
            current, total, fresh = carried, carried_tokens, 0
        current.append(unit)
        total += unit[2]
        fresh += 1
    if current and fresh:
        spans.append((current[0][0], current[-1][1]))
    return spans

"""How an answer or a ranking is scored: normalised contained match, recall@k and reciprocal rank."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower-case, strip accents, punctuation and articles, collapse spaces (SQuAD-style)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = _PUNCT.sub(" ", text)
    text = _ARTICLES.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def answer_matches(prediction: str, expected: str) -> bool:
    """True when the normalised expected answer equals, or appears as whole words in, the prediction."""
    want = normalize(expected)
    got = normalize(prediction)
    if not want:
        return False
    return got == want or f" {want} " in f" {got} "


def accuracy(predictions: Sequence[str], expected: Sequence[str]) -> float:
    if len(predictions) != len(expected):
        raise ValueError("predictions and expected answers differ in length")
    if not expected:
        return 0.0
    return sum(answer_matches(p, e) for p, e in zip(predictions, expected, strict=True)) / len(expected)


def recall_at_k(ranked_sources: Sequence[str], expected_source: str, k: int) -> float:
    """1.0 when the expected source is among the first k retrieved sources."""
    return 1.0 if expected_source in list(ranked_sources)[:k] else 0.0


def reciprocal_rank(ranked_sources: Sequence[str], expected_source: str) -> float:
    """1/rank of the first hit of the expected source, 0.0 when it is absent."""
    for rank, source in enumerate(ranked_sources, start=1):
        if source == expected_source:
            return 1.0 / rank
    return 0.0

"""How an answer or a ranking is scored: normalised contained match, recall@k and reciprocal rank."""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence

from components.prompting import strip_citations

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PER_CENT = re.compile(r"%|\bper cent\b")
_PUNCT = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
_STOPWORD_TEXT = (
    "a an the and or of to in on at for by with from is are was were be been it its this that these those as "
    "which who whom what when where how not no yes do does did has have had can could should would will may "
    "must shall than then there their they you your our we us he she his her them if so also any all each"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def normalize(text: str) -> str:
    """Lower-case, strip accents, punctuation and articles, collapse spaces (SQuAD-style); ``%`` and "per cent"
    are written "percent" first, so "1.5%" and "1.5 percent" are the same answer."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = _PER_CENT.sub(" percent ", text)
    text = _PUNCT.sub(" ", text)
    text = _ARTICLES.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def _singular(normalized: str) -> str:
    """Each word of a normalised text without a plural -s (not -ss, nor words of three letters or fewer), so a
    unit read in the singular is the same answer: "a 110 metre vessel" holds "110 metres"."""
    words = normalized.split()
    return " ".join(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words)


def answer_matches(prediction: str, expected: str) -> bool:
    """True when the normalised expected answer equals, or appears as whole words in, the prediction; words are
    compared without a plural -s."""
    want = _singular(normalize(expected))
    got = _singular(normalize(prediction))
    if not want:
        return False
    return got == want or f" {want} " in f" {got} "


def key_words(reference: str, whole: bool = False) -> list[str]:
    """The content words of a reference answer's first sentence (or all of it with ``whole``); citation markers
    and stop words dropped."""
    text = strip_citations(reference)
    if not whole:
        text = _SENTENCE_END.split(text, maxsplit=1)[0]
    return [w for w in normalize(text).split() if w not in _STOPWORDS and (len(w) > 2 or w.isdigit())]


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


def source_matches(document_path: str, expected_source: str) -> bool:
    """True when a cited document path names the expected source file.

    Paths are compared relative to the documents root; a path stored with a prefix (an absolute path or the
    source folder) still matches when it ends with the expected relative path on a path boundary.
    """
    got = document_path.replace("\\", "/").strip().removeprefix("./")
    want = expected_source.replace("\\", "/").strip().removeprefix("./")
    if not got or not want:
        return False
    return got == want or got.endswith("/" + want) or want.endswith("/" + got)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError("percentile q must be within 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default); honest on small samples and at 0 or 1."""
    if total <= 0:
        return (0.0, 0.0)
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_p(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> float:
    """Two-sided exact McNemar test on paired outcomes (same questions, two arms): the chance that a gap at
    least this large between the discordant counts appears when the arms are in truth equally accurate."""
    if len(a_correct) != len(b_correct):
        raise ValueError("paired outcomes differ in length")
    only_a = sum(1 for a, b in zip(a_correct, b_correct, strict=True) if a and not b)
    only_b = sum(1 for a, b in zip(a_correct, b_correct, strict=True) if b and not a)
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)

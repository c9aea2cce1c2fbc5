"""Which retrieved source holds an answer's words: the lexical support rule shared by training and serving.

Training as you serve (``components.training.raft``) uses it to find the chunk a target answer is taken from;
the gateway uses it to report, beside the sources an answer cites by ``[n]``, the sources its sentences stand on
(the response's ``attributions``), which a reader can check whatever the model wrote; the staleness check uses it
to tell whether an answer still stands on a changed document. It is word overlap, not entailment: a sentence whose
words a source holds is attributed to it, so a sentence that swaps one name in a copied span still is. Numbers
are the exception, being the facts a small model most often gets wrong: every number a sentence states must be in
the source.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from components.evaluation.scoring import key_words, normalize
from components.prompting import strip_citations

# A source holds an answer when it contains the answer's text, or this share of its content words.
MIN_SUPPORT = 0.6
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def answer_support(answer: str, text: str) -> float:
    """How much of ``answer`` the chunk ``text`` holds: 1.0 when it contains the answer outright, else the share
    of the content words of the answer's first sentence (or of the whole answer when that sentence has fewer
    than three) that appear in the text."""
    got = normalize(text)
    return _support(strip_citations(answer), got, set(got.split()))


def _support(plain: str, got: str, present: set[str]) -> float:
    """``answer_support`` of an answer without markers against a normalised text and that text's words."""
    want = normalize(plain)
    if want and f" {want} " in f" {got} ":
        return 1.0
    words = key_words(plain)
    if len(words) < 3:
        words = key_words(plain.replace("\n", " "), whole=True)
    if not words:
        return 0.0
    return sum(w in present for w in words) / len(words)


def attribute(answer: str, sources: Sequence[str]) -> list[int]:
    """The 1-based numbers of the sources the answer's sentences stand on, in order of first mention.

    Each sentence with at least three content words (the whole answer when no sentence has) goes to the source
    holding the largest share of it, at least ``MIN_SUPPORT`` (ties go to the higher-ranked source), and only if
    that source also holds every number the sentence states. A sentence no source holds is attributed to none.
    """
    plain = " ".join(strip_citations(answer or "").split())
    if not plain:
        return []
    sentences = [s for s in _SENTENCE_END.split(plain) if len(key_words(s, whole=True)) >= 3] or [plain]
    texts = [normalize(s) for s in sources]  # once per source, not once per sentence
    vocab = [set(t.split()) for t in texts]
    found: list[int] = []
    for sentence in sentences:
        numbers = {w for w in normalize(sentence).split() if any(ch.isdigit() for ch in w)}
        best: tuple[int, float] | None = None
        for n, (text, words) in enumerate(zip(texts, vocab, strict=True), 1):
            if not numbers <= words:
                continue
            support = _support(sentence, text, words)
            if support >= MIN_SUPPORT and (best is None or support > best[1]):
                best = (n, support)
        if best is not None and best[0] not in found:
            found.append(best[0])
    return found

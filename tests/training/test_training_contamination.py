"""No evaluation data leaks into training: held-out and general questions, and held-out answer sentences.

A domain's training examples and the shipped replay set are what its adapter is trained on; its held-out QA set
and the general-knowledge set are what the gate and `tandem eval` score it on. A question or an answer sentence
in both would score memorisation, not learning. Checked for the sample and for the second domain
(data/quillfern).
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import pytest

from components.evaluation.scoring import normalize
from components.ingest.loaders import load_document
from components.settings import GENERAL_SET, REPLAY_SET, Settings
from components.training.data import Example, load_dataset

DATA = Path(__file__).resolve().parents[2] / "data"
SAMPLE = DATA / "sample"
DOMAINS = ("sample", "quillfern")  # each: docs/, train/, qa/heldout.jsonl
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")


def _heldout(domain: str) -> Path:
    return DATA / domain / "qa" / "heldout.jsonl"


HELDOUT = _heldout("sample")


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _contains(haystack: str, needle: str) -> bool:
    """Whole-word containment of normalised text."""
    return f" {needle} " in f" {haystack} "


@cache
def _training_examples(domain: str = "sample") -> dict[str, list[Example]]:
    out = {}
    for name, location in (("train", DATA / domain / "train"), ("replay", REPLAY_SET)):
        data = load_dataset(str(location))
        assert data.examples and not data.problems, (name, data.problems[:3])
        out[name] = data.examples
    return out


def _turns(role: str, domain: str) -> list[tuple[str, str]]:
    """(file:line, normalised content) of every ``role`` turn in the domain's training data and the replay set."""
    return [
        (example.origin, normalize(content))
        for examples in _training_examples(domain).values()
        for example in examples
        for turn_role, content in example.messages
        if turn_role == role
    ]


def _sentences(text: str) -> list[str]:
    return [s.strip() for line in text.splitlines() for s in _SENTENCE_END.split(line) if s.strip()]


@cache
def _document_text(domain: str, source: str) -> str:
    path = DATA / domain / "docs" / source
    return load_document(source, path.read_bytes()).text  # the ingest loaders: PDF and HTML become text


def test_the_sets_compared_are_tandems_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TRAIN_DATA", "QA_SET", "GENERAL_SET", "TRAIN_REPLAY_DATA"):
        monkeypatch.delenv(f"TANDEM_{name}", raising=False)
    settings = Settings(_env_file=None)
    assert Path(settings.general_set) == GENERAL_SET and Path(settings.train_replay_data) == REPLAY_SET
    assert Path(settings.train_data).resolve() == (SAMPLE / "train").resolve()
    assert Path(settings.qa_set).resolve() == HELDOUT.resolve()
    counts = {name: len(examples) for name, examples in _training_examples().items()}
    assert counts["train"] >= 170 and counts["replay"] >= 30
    assert len(_rows(HELDOUT)) >= 45 and len(_rows(GENERAL_SET)) == 30


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("evaluation_set", ["heldout", "general"])
def test_no_evaluation_question_is_asked_in_training(domain: str, evaluation_set: str) -> None:
    path = _heldout(domain) if evaluation_set == "heldout" else GENERAL_SET
    asked = _turns("user", domain)
    leaks = [
        f"{row['id']} {row['question']!r} in {origin}"
        for row in _rows(path)
        for origin, user in asked
        if _contains(user, normalize(row["question"]))
    ]
    assert not leaks, f"{evaluation_set} questions in training data:\n" + "\n".join(leaks)


@pytest.mark.parametrize("domain", DOMAINS)
def test_no_heldout_answer_sentence_is_a_training_target(domain: str) -> None:
    targets = _turns("assistant", domain)
    leaks = []
    for row in _rows(_heldout(domain)):
        answer = normalize(row["answer"])
        sentences = {
            normalize(s)
            for s in _sentences(_document_text(domain, row["source"]))
            if _contains(normalize(s), answer) and normalize(s) != answer
        }
        assert sentences, f"{row['id']}: answer {row['answer']!r} is in no sentence of {row['source']}"
        leaks += [
            f"{row['id']} ({row['source']}): {sentence!r} in {origin}"
            for sentence in sorted(sentences)
            for origin, target in targets
            if _contains(target, sentence)
        ]
    assert not leaks, "held-out answer sentences in training targets:\n" + "\n".join(leaks)

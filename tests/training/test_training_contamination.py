"""No evaluation data leaks into training: held-out, gate and general questions, and held-out answer sentences;
and the gate's questions are not the reported ones.

A domain's training examples and the shipped replay set are what its adapter is trained on; its held-out QA set
is what `tandem eval` reports on, its gate set (qa/gate.jsonl) and the general-knowledge set are what the gate
decides on. A question or an answer sentence in both would score memorisation, not learning; a gate question
that is also a held-out one would let the promotion decision pick adapters on the reported questions. Checked for
the sample and for the second domain (data/quillfern).
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


def _gate(domain: str) -> Path:
    return DATA / domain / "qa" / "gate.jsonl"


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
@pytest.mark.parametrize("evaluation_set", ["heldout", "gate", "general"])
def test_no_evaluation_question_is_asked_in_training(domain: str, evaluation_set: str) -> None:
    path = {"heldout": _heldout(domain), "gate": _gate(domain), "general": GENERAL_SET}[evaluation_set]
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


@pytest.mark.parametrize("domain", DOMAINS)
def test_the_gate_asks_nothing_the_report_asks(domain: str) -> None:
    """No gate question is a held-out question, and none asks for a held-out fact (the same answer from the same
    document); every gate answer is in its document, as the held-out ones are."""
    heldout, gate = _rows(_heldout(domain)), _rows(_gate(domain))
    assert len(gate) >= 20
    questions = {normalize(r["question"]) for r in heldout}
    facts = {(normalize(r["answer"]), r["source"]) for r in heldout}
    shared = [
        r["id"] for r in gate if normalize(r["question"]) in questions or (normalize(r["answer"]), r["source"]) in facts
    ]
    assert not shared, f"gate questions the held-out set also asks: {shared}"
    missing = [r["id"] for r in gate if normalize(r["answer"]) not in normalize(_document_text(domain, r["source"]))]
    assert not missing, f"gate answers not in their source document: {missing}"

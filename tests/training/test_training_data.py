"""Domain data: validation with file:line, dedup, dataset version, stable hashed split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.errors import ConfigError
from components.training.data import load_dataset, split_dataset

from .conftest import FACTS, chat_line, write_examples


def test_bad_lines_are_reported_with_file_and_line_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join(
            [
                chat_line(*FACTS[0]),
                "{not json",
                json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
                json.dumps({"question": "What is berth 7?", "answer": "A berth."}),
                json.dumps({"messages": [{"role": "pirate", "content": "arr"}]}),
            ]
        )
    )
    ds = load_dataset(str(tmp_path))
    assert len(ds.examples) == 2
    assert [p.split(": ", 1)[0].rsplit(":", 1)[1] for p in ds.problems] == ["2", "3", "5"]
    assert all(p.startswith(f"{path}:") for p in ds.problems)
    assert "last message must be the assistant" in ds.problems[1]


def test_duplicates_after_normalisation_count_once_and_version_ignores_order(tmp_path: Path) -> None:
    write_examples(tmp_path / "a", FACTS[:4])
    q, a = FACTS[0]
    (tmp_path / "a" / "more.jsonl").write_text(chat_line(q + "  ", "  " + a.replace(" ", "   ")) + "\n")
    write_examples(tmp_path / "b", list(reversed(FACTS[:4])))
    one, two = load_dataset(str(tmp_path / "a")), load_dataset(str(tmp_path / "b"))
    assert len(one.examples) == 4 and one.duplicates == 1
    assert one.version == two.version
    write_examples(tmp_path / "b", FACTS[:5])
    assert load_dataset(str(tmp_path / "b")).version != one.version


def test_split_is_stable_when_examples_are_added(tmp_path: Path) -> None:
    pairs = [(f"What is item {i}?", f"Item {i} is number {i * 7}.") for i in range(200)]
    small = split_dataset(load_dataset(str(write_examples(tmp_path / "s", pairs[:100]))).examples, 0.1)
    big = split_dataset(load_dataset(str(write_examples(tmp_path / "b", pairs))).examples, 0.1)
    small_test = {e.digest for e in small.test}
    assert small_test and small_test <= {e.digest for e in big.test}
    assert {e.digest for e in small.train} <= {e.digest for e in big.train}
    assert not small_test & {e.digest for e in small.train} & {e.digest for e in small.validation}
    assert 5 <= len(big.test) <= 40 and len(big.validation) >= 5


def test_tiny_data_still_has_a_validation_example(tmp_path: Path) -> None:
    split = split_dataset(load_dataset(str(write_examples(tmp_path, FACTS[:3]))).examples, 0.1)
    assert len(split.validation) >= 1 and split.train


def test_missing_or_empty_data_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "bad.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="no valid examples"):
        load_dataset(str(tmp_path / "bad.jsonl"))


def test_replay_set_goes_to_training_only_and_never_is_the_gate_set(tmp_path: Path) -> None:
    from components.settings import Settings
    from components.training.pipeline import load_replay

    general = tmp_path / "general.jsonl"
    general.write_text(json.dumps({"id": "g1", "question": "What is 2 + 2?", "answer": "4"}) + "\n")
    replay = write_examples(tmp_path / "replay", FACTS[:3])
    domain = load_dataset(str(write_examples(tmp_path / "domain", FACTS[2:5])))
    settings = Settings(general_set=str(general), train_replay_data=str(replay))

    mixed = load_replay(settings, exclude=domain.digests)
    assert mixed is not None and len(mixed.examples) == 2  # FACTS[2] is domain data already: not added twice
    assert not {e.digest for e in mixed.examples} & domain.digests
    assert load_replay(settings.model_copy(update={"train_replay_data": ""})) is None
    with pytest.raises(ConfigError, match="is the gate's general-knowledge set"):
        load_replay(settings.model_copy(update={"train_replay_data": str(general)}))

"""Lineage rules against the real Postgres: the gate's held-out set is fixed per alias and versioned, pickled
adapters are refused, rollbacks walk back and never return to a version rolled back from, and a `tandem`
command whose reader goes away ends quietly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from components import registry
from components.db import connect
from components.errors import ConfigError
from components.settings import get_settings
from components.training import artifacts, heldout, pipeline, promotion
from tests.conftest import free_port

from .conftest import FACTS, chat_line, write_examples

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def lineage_env(train_env: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    # a fifth of the examples held out: FACTS then has 3 held-out questions (the split is by content hash)
    monkeypatch.setenv("TANDEM_TRAIN_HELDOUT_FRACTION", "0.2")
    # promotions here go straight into the registry: no gateway on this port, whatever else the session runs
    monkeypatch.setenv("TANDEM_GATEWAY_PORT", str(free_port()))
    get_settings.cache_clear()
    return train_env


def _fake_adapter(folder: Path, weights: str = "adapter_model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "peft_type": "LORA"}))
    (folder / weights).write_bytes(b"\x00" * 16)
    return folder


def _register(alias: str, uri: str) -> int:
    with connect() as conn:
        av = registry.register_candidate(
            conn,
            alias=alias,
            base_model="smollm2-135m",
            dataset_version="test",
            dataset_size=1,
            hyperparameters={},
            metrics={},
            artifact_uri=uri,
            lora_rank=8,
        )
        conn.commit()
    return av.version


def _states(alias: str) -> list[tuple[int, str, str | None]]:
    with connect() as conn:
        return [(v.version, v.status, v.reason) for v in registry.list_versions(conn, alias)]


def test_heldout_set_is_fixed_at_first_training_and_data_cannot_change_it(lineage_env: Path) -> None:
    settings = get_settings()
    alias = "fixedset"
    write_examples(lineage_env / "domain" / alias, FACTS)
    with connect() as conn:
        assert heldout.current(conn, alias) is None
        first = heldout.ensure(conn, settings, alias)
    asked = {e.messages[0][1] for e in first.examples}
    assert first.version == 1 and first.reason == "first training" and len(asked) == 3

    # a caller's data: the held-out questions with answers to memorise, plus two genuinely new examples
    evil = lineage_env / "evil.jsonl"
    leaked = [(q, a) for q, a in FACTS if q in asked]
    fresh = [("Where do tugs wait?", "Tugs wait at the north mole."), ("Who signs off ballast?", "The port chemist.")]
    evil.write_text("".join(chat_line(q, "Memorised: " + a) + "\n" for q, a in leaked + fresh))
    with connect() as conn:
        again = heldout.ensure(conn, settings, alias, str(evil))
        ds = pipeline._load(settings, alias, str(evil))
        kept, dropped = heldout.drop_contaminated(settings, ds.examples, again)
        rows = conn.execute("SELECT count(*) FROM gate_heldout_sets WHERE alias = %s", (alias,)).fetchone()
    assert (again.version, again.content_hash) == (first.version, first.content_hash)  # the gate asks the same
    assert rows == (1,)
    assert {e.messages[0][1] for e in kept} == {q for q, _ in fresh}
    assert len(dropped) == 3 and all("asked by the gate (the held-out set)" in d for d in dropped)

    # only the admin action makes a new version, recorded with who asked; unchanged content makes none
    with connect() as conn:
        same = heldout.renew(conn, settings, alias, None, "tester")
        assert same.version == 1
        renewed = heldout.renew(conn, settings, alias, str(REPO / "data" / "sample" / "train"), "tester")
    assert renewed.version == 2 and renewed.reason == "--new-heldout by tester"
    assert renewed.content_hash != first.content_hash and renewed.lineage()["size"] == len(renewed.examples)


def test_a_new_alias_without_data_of_its_own_draws_from_the_first_run(lineage_env: Path) -> None:
    settings = get_settings()
    data = write_examples(lineage_env / "elsewhere", FACTS)
    with connect() as conn:
        with pytest.raises(ConfigError, match="not found"):
            heldout.ensure(conn, settings, "nodata")  # no data at all: a clear error, nothing stored
        assert heldout.current(conn, "nodata") is None
        made = heldout.ensure(conn, settings, "nodata", str(data))
    assert made.version == 1 and made.origin == str(data) and len(made.examples) == 3


def test_an_empty_set_is_refilled_once_from_the_alias_own_data_only(lineage_env: Path) -> None:
    settings = get_settings()
    alias = "growing"
    folder = lineage_env / "domain" / alias
    write_examples(folder, FACTS[:3])  # too few examples for a test split at a fifth
    bigger = write_examples(lineage_env / "callers", FACTS)
    with connect() as conn:
        empty = heldout.ensure(conn, settings, alias)
        assert empty.version == 1 and not empty.examples
        assert heldout.ensure(conn, settings, alias, str(bigger)).version == 1  # a run's data never fills it
        write_examples(folder, FACTS)  # the alias's own data grew
        filled = heldout.ensure(conn, settings, alias)
        assert filled.version == 2 and len(filled.examples) == 3 and "v1 was empty" in filled.reason
        assert heldout.ensure(conn, settings, alias).version == 2  # and then it stays


def test_pickled_adapter_is_refused_everywhere_and_nothing_changes(lineage_env: Path, tmp_path: Path) -> None:
    from serving.adapters import AdapterError, check_artifact

    settings = get_settings()
    alias = "pickles"
    good = _fake_adapter(tmp_path / "good")
    pickled = _fake_adapter(tmp_path / "pickled", weights="adapter_model.bin")
    champion = _register(alias, str(good))
    promotion.promote(settings, alias, champion, reason="test")  # no gateway here: straight into the registry

    uri = artifacts.artifact_uri(settings, alias, "pickled")
    with pytest.raises(ConfigError, match=r"pickled weights \(adapter_model.bin\) and no adapter_model.safetensors"):
        artifacts.publish(pickled, uri)  # registration by the pipeline publishes first
    assert not Path(uri.removeprefix("file://")).exists()

    version = _register(alias, str(pickled))  # registered by hand, bypassing the pipeline
    before = _states(alias)
    with pytest.raises(ConfigError, match="refused, a pickle can run code") as refused:
        promotion.promote(settings, alias, version, reason="test")
    assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match="refused, a pickle"):
        artifacts.local_path(settings, str(pickled))  # the gate would load it from here
    with connect() as conn:
        av = registry.get_version(conn, alias, version)
        assert registry.get_champion(conn, alias).version == champion  # type: ignore[union-attr]
    with pytest.raises(AdapterError, match="refused, a pickle") as gateway_refused:  # the gateway's check
        check_artifact(av, settings.max_lora_rank)
    assert gateway_refused.value.status == 422
    assert _states(alias) == before


def test_rollback_walks_back_and_never_returns_to_a_version_rolled_back_from(lineage_env: Path, tmp_path: Path) -> None:
    settings = get_settings()
    alias = "walkback"
    folder = str(_fake_adapter(tmp_path / "adapter"))
    v1, v2, v3 = (_register(alias, folder) for _ in range(3))
    for version in (v1, v2, v3):
        promotion.promote(settings, alias, version, reason="test")

    assert promotion.rollback(settings, alias).version == v2
    assert promotion.rollback(settings, alias).version == v1  # not back to v3, the version just left
    states = {v: (s, r) for v, s, r in _states(alias)}
    assert states[v1][0] == "champion"
    assert states[v2] == ("rolled_back", f"rolled back to v{v1}") and states[v3][0] == "rolled_back"

    before = _states(alias)
    with pytest.raises(ConfigError, match="no earlier champion to roll back to") as nothing_left:
        promotion.rollback(settings, alias)
    assert "\n" not in str(nothing_left.value)
    assert _states(alias) == before  # nothing changed

    promotion.promote(settings, alias, v3, reason="by hand")  # an explicit promotion may still bring it back
    assert promotion.rollback(settings, alias).version == v1


def test_cli_output_into_a_closed_pipe_ends_quietly(lineage_env: Path, tmp_path: Path) -> None:
    folder = str(_fake_adapter(tmp_path / "adapter"))
    for _ in range(3):
        _register("piped", folder)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write, as `| head` is after its lines
    try:
        done = subprocess.run(
            [sys.executable, "-m", "components.cli", "adapters", "--json"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
            cwd=REPO,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr[-2000:]
    assert done.returncode == 141

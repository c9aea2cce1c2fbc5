"""Domain data intake against the real Postgres: bad files refused whole with file:line, duplicates skipped,
add -> pending -> review -> versioned snapshots of the approved examples only, landing files imported once each,
feedback context shown to the reviewer, and the pipeline training on the alias's snapshot."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from components.db import connect
from components.errors import ConfigError
from components.settings import Settings, get_settings
from components.training import intake, landing, pipeline
from tests.conftest import free_port

from .conftest import FACTS, chat_line

ALIASES = "intake-a,intake-b,intake-c,intake-d,landed,trains,fed,clia"


@pytest.fixture
def env(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    monkeypatch.setenv("TANDEM_ALIASES", ALIASES)
    monkeypatch.setenv("TANDEM_DOMAIN_DATA_URL", str(tmp_path / "landing" / "{alias}"))
    monkeypatch.setenv("TANDEM_INTAKE_MAX_LINE_BYTES", str(1 << 20))
    # announcements go nowhere: a port no Airflow listens on, with a token so a call is really tried
    monkeypatch.setenv("TANDEM_AIRFLOW_PORT", str(free_port()))
    monkeypatch.setenv("TANDEM_AIRFLOW_TOKEN", "test-token")
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


def _count(alias: str) -> int:
    with connect() as conn:
        row = conn.execute("SELECT count(*) FROM domain_examples WHERE alias = %s", (alias,)).fetchone()
    return int(row[0]) if row else 0


def _write(path: Path, lines: list[str | bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    from components.cli import main

    code = main(["data", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip().startswith(("{", "[")) else out), err


GOOD = [chat_line(q, a) for q, a in FACTS[:3]]


@pytest.mark.parametrize(
    ("name", "lines", "bad_line", "why"),
    [
        ("malformed", [GOOD[0], '{"question": "Where is berth 9?", "answer": ', GOOD[1]], 2, "not JSON"),
        ("empty-answer", [GOOD[0], GOOD[1], json.dumps({"question": "Who?", "answer": "  "})], 3, "non-empty"),
        ("huge-line", [GOOD[0], json.dumps({"question": "Big?", "answer": "x" * (10 << 20)}), GOOD[1]], 2, "longer"),
        ("no-answer", [GOOD[0], json.dumps({"messages": [{"role": "user", "content": "Hi"}]})], 2, "assistant"),
    ],
)
def test_a_bad_line_refuses_the_whole_file_naming_it_and_stores_nothing(
    env: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, lines: list[str], bad_line: int,
    why: str,
) -> None:  # fmt: skip
    path = _write(tmp_path / f"{name}.jsonl", list(lines))
    code, out, err = _cli(capsys, "add", "--alias", "intake-a", str(path), "--approve", "--json")
    assert code == 2 and not out
    assert err.startswith(f"error: {path}:{bad_line}: ") and why in err and "nothing was stored" in err
    assert err.count("\n") == 1  # one line
    assert _count("intake-a") == 0


def test_an_over_long_line_is_refused_without_reading_it_into_memory(env: Settings, tmp_path: Path) -> None:
    path = _write(tmp_path / "huge.jsonl", [GOOD[0], json.dumps({"question": "Big?", "answer": "x" * (10 << 20)})])
    tracemalloc.start()
    try:
        with pytest.raises(intake.IntakeError) as refused:
            intake.read_file(str(path), 1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.problems == [f"{path}:2: line longer than 1048576 bytes (TANDEM_INTAKE_MAX_LINE_BYTES)"]
    assert peak < 4 << 20, f"peak {peak} bytes while refusing a 10 MB line"


def test_an_unknown_alias_is_refused_and_nothing_is_stored(
    env: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "ok.jsonl", GOOD)
    code, _, err = _cli(capsys, "add", "--alias", "nobody-knows", str(path))
    assert code == 2 and err.startswith("error: unknown alias 'nobody-knows': expected one of ")
    assert "TANDEM_ALIASES" in err and env.default_alias in err and err.count("\n") == 1
    assert _count("nobody-knows") == 0


def test_duplicates_in_the_file_and_in_the_store_are_skipped_and_named(
    env: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _write(tmp_path / "first.jsonl", [GOOD[0], GOOD[1], GOOD[0]])
    code, out, _ = _cli(capsys, "add", "--alias", "intake-b", str(first), "--json")
    assert code == 0 and out["added"] == 2 and out["status"] == "pending"
    assert out["skipped_lines"] == [f"{first}:3: duplicate of line 1"]
    # the same example again, written differently (whitespace is normalised), beside a new one
    spaced = json.dumps({"question": "  " + FACTS[1][0], "answer": FACTS[1][1] + "  "})
    second = _write(tmp_path / "second.jsonl", [spaced, GOOD[2]])
    code, out, _ = _cli(capsys, "add", "--alias", "intake-b", str(second), "--json")
    assert code == 0 and out["added"] == 1
    assert len(out["skipped_lines"]) == 1 and out["skipped_lines"][0].startswith(f"{second}:1: already stored as #")
    assert _count("intake-b") == 3


def test_add_review_and_snapshot_hold_the_approved_examples_only(
    env: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "four.jsonl", [chat_line(q, a) for q, a in FACTS[:4]])
    code, out, _ = _cli(capsys, "add", "--alias", "intake-c", str(path), "--json")
    assert code == 0 and out["added"] == 4
    a, b, c, d = out["ids"]
    code, listed, _ = _cli(capsys, "list", "--alias", "intake-c", "--status", "pending", "--json")
    assert [r["id"] for r in listed] == [a, b, c, d] and listed[0]["origin"] == f"cli:{path}:1"
    with connect() as conn, pytest.raises(ConfigError, match="no approved examples"):
        intake.snapshot(conn, "intake-c")

    code, out, err = _cli(
        capsys, "review", "--approve", str(a), str(b), "--reject", str(c), "--note", "wrong", "--json"
    )
    assert code == 0
    assert [r["changed"] for r in out["reviews"]] == [{"intake-c": [a, b]}, {"intake-c": [c]}]
    assert out["announced"] == [] and "not reachable" in out["warnings"][0] and "scheduled poll" in err
    with connect() as conn:
        rows = {r.id: r for r in intake.list_examples(conn, "intake-c")}
        first = intake.snapshot(conn, "intake-c")
        again = intake.snapshot(conn, "intake-c")
    assert rows[c].status == "rejected" and rows[c].review_note == "wrong" and rows[a].reviewed_by.startswith("cli:")
    assert first.example_ids == [a, b] and again.version == first.version  # unchanged set: no new version

    # the rejected example sent again is a duplicate, never pending again; a second review of it is skipped
    code, out, _ = _cli(capsys, "add", "--alias", "intake-c", str(_write(tmp_path / "c.jsonl", [GOOD[2]])), "--json")
    assert out["added"] == 0 and "(rejected)" in out["skipped_lines"][0]
    code, out, _ = _cli(capsys, "review", "--approve", str(c), str(d), "--json")
    assert out["reviews"][0]["changed"] == {"intake-c": [d]}
    assert out["reviews"][0]["skipped"] == [f"#{c}: already rejected by {rows[c].reviewed_by}"]
    with connect() as conn:
        second = intake.snapshot(conn, "intake-c")
        ds = intake.load_snapshot(conn, second)
    assert second.version == first.version + 1 and second.example_ids == [a, b, d]
    assert ds.version == second.content_hash and len(ds.examples) == 3
    assert {e.messages[0][1] for e in ds.examples} == {FACTS[0][0], FACTS[1][0], FACTS[3][0]}
    # an approved example withdrawn: rejected, and gone from the next snapshot
    code, out, _ = _cli(capsys, "review", "--reject", str(a), "--note", "outdated", "--json")
    assert out["reviews"][0]["changed"] == {"intake-c": [a]}
    with connect() as conn:
        third = intake.snapshot(conn, "intake-c")
    assert third.version == second.version + 1 and third.example_ids == [b, d]
    code, _, err = _cli(capsys, "review", "--approve", "999999999")
    assert code == 2 and "no domain example with id 999999999" in err


def test_a_feedback_correction_waits_with_its_context_and_a_rejected_one_never_trains(env: Settings) -> None:
    context = {
        "question": "What is the speed limit at Ballast Quay?",
        "answer_given": "The limit is 12 knots [1].",
        "correction": "The speed limit at Ballast Quay is 4 knots.",
        "sources": [{"n": 1, "path": "rules/speed.md", "heading": "Quays", "chunk_id": 42}],
        "rating": -1,
        "alias": "fed",
        "version": 3,
    }
    lines = [
        intake.Line("feedback", (("user", context["question"]), ("assistant", context["correction"])), None, False)
    ]
    wrong = [intake.Line("feedback", (("user", "Who chairs it?"), ("assistant", "Nobody.")), None, False)]
    with connect() as conn:
        (good_id,), _ = intake.store(conn, "fed", lines, "feedback:resp-1", submitted_by="key:app", context=context)
        (bad_id,), _ = intake.store(conn, "fed", wrong, "feedback:resp-2", submitted_by="key:app", context=context)
        conn.commit()
        shown = {ex.id: intake.describe(ex) for ex in intake.pending(conn, "fed")}
        intake.review(conn, [good_id], "approve", "airflow:reviewer")
        intake.review(conn, [bad_id], "reject", "airflow:reviewer", "not true")
        snap = intake.snapshot(conn, "fed")
    text = shown[good_id]
    assert "**Answer given (adapter v3):** The limit is 12 knots [1]." in text
    assert "**Correction:** The speed limit at Ballast Quay is 4 knots." in text
    assert "**Cited sources:** [1] rules/speed.md > Quays" in text and "feedback:resp-1" in text
    assert snap.example_ids == [good_id]


def test_landing_files_are_imported_once_each_and_a_bad_one_is_remembered_as_refused(
    env: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "landing" / "landed"
    assert landing.landing_url(env, "landed") == str(folder)
    _write(folder / "a.jsonl", GOOD[:2])
    bad = _write(folder / "sub" / "b.jsonl", [GOOD[2], "not json"])
    with connect() as conn:
        first = landing.import_landing(conn, env, "landed")
        again = landing.import_landing(conn, env, "landed")
    assert first.added == first.approved == 2 and [f["added"] for f in first.imported] == [2]
    assert len(first.refused) == 1 and f"{bad}:2: not JSON" in first.refused[0]
    assert again.added == 0 and not again.imported and not again.refused  # both files remembered by content
    assert _count("landed") == 2

    _write(bad, [GOOD[2], chat_line(*FACTS[4])])  # fixed: new content, imported now
    monkeypatch.setenv("TANDEM_INTAKE_AUTO_APPROVE", "false")
    get_settings.cache_clear()
    with connect() as conn:
        fixed = landing.import_landing(conn, get_settings(), "landed")
        statuses = sorted(r.status for r in intake.list_examples(conn, "landed"))
    assert fixed.added == 2 and fixed.approved == 0
    assert statuses == ["approved", "approved", "pending", "pending"]


def test_the_pipeline_trains_on_the_alias_snapshot_and_an_explicit_path_as_before(
    env: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_MIN_NEW_EXAMPLES", "3")
    get_settings.cache_clear()
    settings = get_settings()
    _write(tmp_path / "landing" / "trains" / "x.jsonl", [chat_line(q, a) for q, a in FACTS[:5]])
    check = pipeline.check_new_data(settings, "trains")
    assert check.data == "domain_snapshots:trains:v1" and check.examples == 5 and check.should_train
    assert check.snapshot is not None and check.snapshot["version"] == 1 and check.snapshot["size"] == 5
    assert check.dataset_version == check.snapshot["hash"]
    with connect() as conn:
        assert intake.snapshot(conn, "trains").version == 1  # unchanged: the same version
    path = _write(tmp_path / "elsewhere.jsonl", GOOD)
    direct = pipeline.check_new_data(settings, "trains", data=str(path))
    assert direct.data == str(path) and direct.snapshot is None and direct.examples == 3


def test_any_fsspec_url_is_a_landing_location(env: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    monkeypatch.setenv("TANDEM_DOMAIN_DATA_URL", "memory://tandem-landing")  # one subfolder per alias
    get_settings.cache_clear()
    settings = get_settings()
    assert landing.landing_url(settings, "intake-d") == "memory://tandem-landing/intake-d"
    with fsspec.open("memory://tandem-landing/intake-d/batch.jsonl", "w") as fh:
        fh.write("".join(line + "\n" for line in GOOD))
    with connect() as conn:
        report = landing.import_landing(conn, settings, "intake-d")
        origins = [r.origin for r in intake.list_examples(conn, "intake-d")]
    assert report.approved == 3 and origins[0] == "landing:memory:///tandem-landing/intake-d/batch.jsonl:1"
    monkeypatch.setenv("TANDEM_DOMAIN_DATA_URL", "nosuchproto://x")
    get_settings.cache_clear()
    with connect() as conn, pytest.raises(ConfigError, match="not a usable fsspec URL"):
        landing.import_landing(conn, get_settings(), "intake-d")

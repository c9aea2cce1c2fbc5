"""`tandem eval` refusals: one line, non-zero, nothing written (no services needed)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from components.cli import main
from components.settings import get_settings


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(argv: list[str], capsys: Any) -> tuple[int, str]:
    get_settings.cache_clear()
    try:
        code = main(argv)
    finally:
        get_settings.cache_clear()
    return code, capsys.readouterr().err.strip()


def test_without_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setenv("TANDEM_GATEWAY_PORT", str(_closed_port()))
    code, err = _run(["eval", "--limit", "1", "--out", str(tmp_path / "r")], capsys)
    assert code != 0 and len(err.splitlines()) == 1
    assert err.startswith("error: gateway not reachable at http://127.0.0.1:") and "`tandem up`" in err
    assert not (tmp_path / "r").exists()


def test_bad_qa_file_names_file_and_line(tmp_path: Path, capsys: Any) -> None:
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"id": "a", "question": "Q?", "answer": "A", "source": "x.md"}\n{"id": "b", "question": "Q2?"}\n')
    code, err = _run(["eval", "--qa", str(qa)], capsys)
    assert code != 0
    assert err == f"error: {qa}:2: missing or empty answer, source"
    code, err = _run(["eval", "--qa", str(tmp_path / "none.jsonl")], capsys)
    assert code != 0 and "not found" in err and len(err.splitlines()) == 1
    code, err = _run(["eval", "--limit", "0"], capsys)
    assert err == "error: --limit must be a positive number of questions, got 0"


def test_sample_qa_set_is_valid_and_sourced() -> None:
    """Every held-out question of the sample domain loads and names a document that exists."""
    from components.evaluation.qa import load_qa
    from components.evaluation.run import resolve_qa_path

    get_settings.cache_clear()
    path = resolve_qa_path(get_settings(), None)
    items = load_qa(path)
    assert len(items) >= 30
    docs = path.parents[1] / "docs"
    missing = [i.source for i in items if not (docs / i.source).is_file()]
    assert missing == []


def test_unknown_arm_is_refused(capsys: Any) -> None:
    code, err = _run(["eval", "--arms", "adapter,hybrid"], capsys)
    assert code != 0
    assert err == "error: unknown arm(s) hybrid; expected some of base, base_rag, adapter, adapter_rag"

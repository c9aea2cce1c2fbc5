"""Hybrid retrieval over a real index: ranking, filters as bind parameters, citations, model switch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from components.db import connect
from components.embedding import Embedder, get_embedder
from components.errors import ConfigError
from components.ingest import store, sync
from components.ingest.sync import sync_documents
from components.retrieval import hybrid_search, retrieve
from components.settings import Settings


def test_retrieve_ranks_the_right_section_and_cites_it(ingest_db: Settings, corpus: Path) -> None:
    sync_documents(str(corpus), settings=ingest_db)
    with connect(ingest_db) as conn:
        top = retrieve(conn, "How long may a vessel stay on a Heron Berth?", top_k=3, settings=ingest_db)
        assert top[0].document_path == "procedures/berth-booking.md"
        assert top[0].heading == "Berth Booking > Length of stay"
        assert top[0].source == str(corpus) and top[0].metadata["owner"] == "Marine Operations"
        text = (corpus / top[0].document_path).read_text()
        assert text[top[0].char_start : top[0].char_end] == top[0].text
        assert [r.score for r in top] == sorted((r.score for r in top), reverse=True)

        only_safety = retrieve(conn, "permit", top_k=5, filters={"owner": "Safety"}, settings=ingest_db)
        assert only_safety and {r.document_path for r in only_safety} == {"procedures/hot-works.md"}
        faq = retrieve(conn, "fees", top_k=5, filters={"path_prefix": "faq/"}, settings=ingest_db)
        assert {r.document_path for r in faq} == {"faq/fees.html"}
        # A hostile value is only ever a bind parameter: it matches nothing and breaks nothing.
        assert retrieve(conn, "berth", filters={"owner": "x' OR '1'='1"}, settings=ingest_db) == []
        with pytest.raises(ConfigError):
            hybrid_search(conn, "berth", np.zeros(384, dtype=np.float32), filters={"bad key;": "x"})
        with pytest.raises(ConfigError):
            hybrid_search(conn, "berth", np.zeros(384, dtype=np.float32), filters={"owner": ["a"]})  # type: ignore[dict-item]


class _RenamedModel(Embedder):
    """The same weights under another model_id: to Tandem, a different embedding model."""

    def __init__(self, inner: Embedder) -> None:
        self.__dict__.update(inner.__dict__)
        self.model_id = "renamed-minilm:384"


def test_model_change_builds_beside_and_switches_atomically(
    ingest_db: Settings, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync_documents(str(corpus), settings=ingest_db)
    new_model = _RenamedModel(get_embedder(ingest_db))
    real_write = store.write_documents
    calls = {"n": 0}

    def crash_after_two(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("interrupted")
        real_write(*args, **kwargs)

    monkeypatch.setattr(sync, "_FIRST_WINDOW", 1)  # one document per window and transaction
    monkeypatch.setattr(sync, "_WINDOW", 1)
    monkeypatch.setattr(store, "write_documents", crash_after_two)
    with pytest.raises(RuntimeError):
        sync_documents(str(corpus), settings=ingest_db, embedder=new_model)
    with connect(ingest_db) as conn:
        gens = dict(conn.execute("SELECT model_id, status FROM embedding_generations").fetchall())
        assert gens == {"all-MiniLM-L6-v2:384": "active", "renamed-minilm:384": "building"}
        # Half-built new generation: retrieval still answers from the old one, whole.
        during = retrieve(conn, "Heron Berth stay", top_k=10, settings=ingest_db)
        assert len({r.document_path for r in during}) >= 3

    monkeypatch.setattr(store, "write_documents", real_write)
    report = sync_documents(str(corpus), settings=ingest_db, embedder=new_model)
    assert report.activated and report.unchanged == 2 and report.updated == 2
    assert report.index_build_seconds == 0  # same dimension: the live generation's index was never dropped
    with connect(ingest_db) as conn:
        gens = dict(conn.execute("SELECT model_id, status FROM embedding_generations").fetchall())
        assert gens == {"all-MiniLM-L6-v2:384": "retired", "renamed-minilm:384": "active"}
        left = conn.execute(
            "SELECT count(*) FROM chunks c JOIN embedding_generations g ON g.id = c.generation_id "
            "WHERE g.status = 'retired'"
        ).fetchone()
        assert left == (0,)
        assert retrieve(conn, "Heron Berth stay", top_k=1, settings=ingest_db)[0].document_path == (
            "procedures/berth-booking.md"
        )

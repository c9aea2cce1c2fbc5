"""The gateway's query encoder: ONNX Runtime over the real embedding model, checked against torch."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from components import query_encoder
from components.embedding import get_embedder
from components.query_encoder import MIN_COSINE, OnnxQueryEncoder, load_query_encoder
from components.settings import Settings


@pytest.fixture
def onnx_settings(settings: Settings, tmp_path: Path) -> Settings:
    # The model comes from the shared install; only the exported graph goes to a private state dir.
    return settings.model_copy(update={"state_dir": tmp_path})


def test_onnx_vectors_match_the_document_model(onnx_settings: Settings) -> None:
    encoder = load_query_encoder(onnx_settings)
    assert encoder.runtime == "onnx"
    torch_model = get_embedder(onnx_settings)
    assert (encoder.model_id, encoder.dim) == (torch_model.model_id, torch_model.dim)
    queries = ["Who handles a diesel spill?", "berth", "   ", "Hot works: permits, fire watch & gas tests " * 60]
    for q in queries:
        got, want = encoder.encode_query(q), torch_model.encode_query(q)
        assert got.dtype == np.float32 and got.shape == (torch_model.dim,)
        assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5
        assert float(np.dot(got, want)) >= MIN_COSINE, q[:40]


def test_exported_graph_is_cached_and_reused(onnx_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    first = OnnxQueryEncoder(get_embedder(onnx_settings), onnx_settings.models_dir / "onnx")
    assert first.path.is_file() and first.path.parent == onnx_settings.models_dir / "onnx"
    assert not list(first.path.parent.glob("*.tmp"))  # written under a temporary name, then renamed

    def no_export(*_: object, **__: object) -> None:
        raise AssertionError("exported again although the cached graph matches the model")

    monkeypatch.setattr("torch.onnx.export", no_export)
    second = OnnxQueryEncoder(get_embedder(onnx_settings), onnx_settings.models_dir / "onnx")
    assert second.path == first.path


def test_mismatched_vectors_fall_back_to_torch(
    onnx_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A graph whose vectors drift from the document vectors must never serve queries.
    real = OnnxQueryEncoder.encode_query

    def drifted(self: OnnxQueryEncoder, text: str) -> np.ndarray:
        vector = real(self, text)
        vector[0] += 0.05
        return vector / np.linalg.norm(vector)

    monkeypatch.setattr(OnnxQueryEncoder, "encode_query", drifted)
    with caplog.at_level(logging.WARNING, logger=query_encoder.__name__):
        encoder = load_query_encoder(onnx_settings)
    assert encoder.runtime == "torch"
    assert "vectors differ from torch's" in caplog.text


def test_torch_runtime_setting_skips_onnx(onnx_settings: Settings) -> None:
    encoder = load_query_encoder(onnx_settings.model_copy(update={"query_embed_runtime": "torch"}))
    assert encoder.runtime == "torch"
    assert not (onnx_settings.models_dir / "onnx").exists()


def test_training_retrieval_leaves_torch_its_threads(onnx_settings: Settings) -> None:
    """Training renders its prompts with the gateway's retriever in the process that then trains: the gateway's
    one-thread cap must not follow it there (it halved training's speed on two cores)."""
    import torch

    from components.retrieval import serving_retriever

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        serving_retriever(None, onnx_settings)  # type: ignore[arg-type]  # the connection is used only by a search
        assert torch.get_num_threads() == 2
        load_query_encoder(onnx_settings)  # the gateway's way: capped at TANDEM_QUERY_EMBED_THREADS
        assert torch.get_num_threads() == onnx_settings.query_embed_threads == 1
    finally:
        torch.set_num_threads(before)

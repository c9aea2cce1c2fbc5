"""Single-query embeddings for the gateway: the embedding model's transformer run by ONNX Runtime.

A query is one short text. Through torch, most of its time on a CPU core goes to per-operator dispatch, not
arithmetic: on the 2-core test host one query took 22 ms through sentence-transformers, 17 ms as a bare torch
forward and 9 ms in ONNX Runtime, with the same vectors. The graph is exported from the very model that embedded
the documents, cached under ``state_dir/models/onnx``, and checked against torch every time it is loaded: a
query vector that drifted from the document vectors would quietly hurt recall, so any probe with a cosine
below MIN_COSINE means torch is used instead (logged), as does a model whose pipeline this module cannot mirror.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from components.embedding import Embedder, get_embedder, limit_query_threads
from components.settings import Settings

log = logging.getLogger(__name__)

MIN_COSINE = 0.9999
_PROBES = (
    "How are berths booked?",
    "What is the maximum draught for vessels entering the inner harbour at low tide, and who decides?",
    "Überstunden im Hafen — ¿qué pasa con los permisos de trabajos en caliente? 港口",
    "permit " * 400,  # longer than the model's limit: truncation must match too
)


class QueryEncoder(Protocol):
    model_id: str
    dim: int
    runtime: str

    def encode_query(self, text: str) -> np.ndarray: ...


class UnsupportedModelError(Exception):
    """The model's sentence-transformers pipeline has a step this module does not reproduce."""


class OnnxQueryEncoder:
    """Tokenizer -> ONNX transformer -> the model's pooling -> L2 normalisation, as Embedder.encode_query."""

    runtime = "onnx"

    def __init__(self, embedder: Embedder, cache_dir: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        st = embedder._model
        self._pooling = _pooling_mode(st)
        self._tokenizer = st.tokenizer
        self._max_length = int(st.max_seq_length or 256)
        self.path = _export(embedder, cache_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self._inputs = [i.name for i in self._session.get_inputs()]
        self.model_id = embedder.model_id
        self.dim = embedder.dim

    def encode_query(self, text: str) -> np.ndarray:
        enc = self._tokenizer([text], truncation=True, max_length=self._max_length, return_tensors="np")
        hidden = self._session.run(None, {name: enc[name].astype(np.int64) for name in self._inputs})[0][0]
        if self._pooling == "cls":
            vector = hidden[0]
        else:
            mask = enc["attention_mask"][0].astype(np.float32)[:, None]
            vector = (hidden * mask).sum(axis=0) / max(float(mask.sum()), 1e-9)
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        return np.ascontiguousarray(vector, dtype=np.float32)


def _pooling_mode(st: Any) -> str:
    names = [type(module).__name__ for module in st]
    if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise UnsupportedModelError(f"pipeline {' -> '.join(names)} (only Transformer -> Pooling [-> Normalize])")
    pooling = st[1]
    mode = getattr(pooling, "pooling_mode", None)
    if mode is None:  # sentence-transformers 5 spelled it as flags
        mode = "cls" if getattr(pooling, "pooling_mode_cls_token", False) else "mean"
    if mode not in ("mean", "cls"):
        raise UnsupportedModelError(f"pooling {mode!r} (only mean or cls)")
    return str(mode)


def _fingerprint(embedder: Embedder) -> str:
    """Changes whenever the model's files do, so a replaced model never meets a stale graph."""
    import torch

    digest = hashlib.sha256(f"{Path(embedder.path).resolve()}\0{embedder.model_id}\0{torch.__version__}".encode())
    folder = Path(embedder.path)
    if folder.is_dir():
        for f in sorted(folder.rglob("*")):
            if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".txt"):
                stat = f.stat()
                digest.update(f"{f.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _export(embedder: Embedder, cache_dir: Path) -> Path:
    """The ONNX file for this model, exported once (written to a temporary name, then renamed into place)."""
    import torch

    target = cache_dir / f"{embedder.model_id.replace(':', '-').replace('/', '_')}-{_fingerprint(embedder)}.onnx"
    if target.exists():
        return target
    st = embedder._model
    transformer = st[0].auto_model.eval()
    sample = st.tokenizer(["a probe sentence"], return_tensors="pt")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in sample]

    class _Hidden(torch.nn.Module):  # positional inputs in a fixed order -> the last hidden state
        def __init__(self) -> None:
            super().__init__()
            self.inner = transformer

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.inner(**dict(zip(names, inputs, strict=True))).last_hidden_state

    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".onnx.tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Hidden(),
                tuple(sample[n] for n in names),
                tmp,
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]},
                opset_version=17,
                dynamo=False,
            )
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    log.info("exported the query encoder to %s", target)
    return target


class EncoderMismatchError(Exception):
    """The query encoder is not the model the active embedding generation's vectors were made with."""


def check_generation(conn: Any, model_id: str, dim: int) -> None:
    """Raise EncoderMismatchError (one line) unless the active embedding generation was embedded with
    ``model_id`` at ``dim``; no active generation (nothing indexed yet) passes. A mismatched query vector would
    find nothing (another dimension) or the wrong chunks (same dimension), and retrieval would quietly become
    full-text only."""
    row = conn.execute("SELECT id, model_id, dim FROM embedding_generations WHERE status = 'active'").fetchone()
    if row is not None and (row[1] != model_id or int(row[2]) != dim):
        raise EncoderMismatchError(
            f"the query encoder is {model_id} ({dim} dims) but the active embedding generation {row[0]} is "
            f"{row[1]} ({row[2]} dims); set TANDEM_EMBEDDING_MODEL to the index's model and restart the gateway, "
            "or re-ingest with the new model"
        )


def load_query_encoder(settings: Settings, limit_threads: bool = True) -> QueryEncoder:
    """The fastest encoder whose vectors match the document vectors: ONNX if it checks out, else torch.

    ``limit_threads`` caps torch's threads for the whole process at ``TANDEM_QUERY_EMBED_THREADS``, which suits a
    process that only embeds queries (the gateway). A process that also trains must pass False: the cap stayed
    on there and halved LoRA training's speed on two cores. The ONNX session gets its own thread count either
    way, so the query vectors are the same."""
    if limit_threads:
        limit_query_threads(settings)
    embedder = get_embedder(settings)
    if settings.query_embed_runtime == "torch":
        return embedder
    try:
        encoder = OnnxQueryEncoder(embedder, settings.models_dir / "onnx", settings.query_embed_threads)
        worst = min(float(np.dot(encoder.encode_query(p), embedder.encode_query(p))) for p in _PROBES)
        if worst < MIN_COSINE:
            raise UnsupportedModelError(f"its vectors differ from torch's (cosine {worst:.5f} < {MIN_COSINE})")
    except Exception as exc:  # ImportError, an export the model does not survive, a mismatch: torch still works
        log.warning("query embeddings stay in torch, ONNX Runtime is not used: %s", str(exc).splitlines()[0][:300])
        return embedder
    log.info("query embeddings run in ONNX Runtime (checked against torch: cosine >= %.4f)", worst)
    return encoder

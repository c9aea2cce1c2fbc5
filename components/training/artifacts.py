"""The adapter store: a folder or any fsspec URL (``s3://``, ``gs://``, ``file://``, a shared mount) holding one
folder per trained adapter, ``<store>/<alias>/<run_id>/``, so several vLLM replicas can load the same files.

Each folder holds what ``save_pretrained`` wrote plus ``tandem-dataset.json``: the dataset version and the
hashes of the examples it was trained on, which is how "new examples beyond the champion's" is counted.

Weights must be safetensors: ``weights_problem`` is the one rule, called when an adapter is published, loaded
for the gate, promoted or rolled back to, and by the gateway before it asks vLLM to load one. A pickle
(``adapter_model.bin``) can run code when it is loaded, so an adapter that has only that is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fsspec

from components.errors import ConfigError
from components.settings import Settings

MANIFEST = "tandem-dataset.json"
WEIGHTS = "adapter_model.safetensors"
_PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle")


def weights_problem(names: Iterable[str], where: str) -> str | None:
    """Why the files ``names`` of the adapter at ``where`` may not be loaded (None when they may): the weights
    must be in adapter_model.safetensors; pickled weights alone are refused."""
    names = {Path(n).name for n in names}
    if WEIGHTS in names:
        return None
    pickles = sorted(n for n in names if n.endswith(_PICKLES))
    if pickles:
        return (
            f"adapter at {where} has pickled weights ({', '.join(pickles)}) and no {WEIGHTS}: refused, a pickle can "
            "run code when loaded; save it with safetensors (save_pretrained(safe_serialization=True))"
        )
    return f"adapter at {where} has no {WEIGHTS}"


def check_weights(uri: str) -> None:
    """Raise ConfigError (one line) unless the adapter at ``uri`` has safetensors weights."""
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError as exc:
        raise ConfigError(f"adapter files missing at {uri}") from exc
    problem = weights_problem(names, uri)
    if problem:
        raise ConfigError(problem)


def artifact_uri(settings: Settings, alias: str, run_id: str) -> str:
    return f"{settings.adapter_store_url}/{alias}/{run_id}"


def publish(local_dir: Path, uri: str) -> None:
    """Copy a finished adapter folder to the store (written to a temporary name first, then renamed on local disk).
    An adapter without safetensors weights is refused before anything is written."""
    problem = weights_problem((f.name for f in local_dir.iterdir()), str(local_dir))
    if problem:
        raise ConfigError(problem)
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    if _is_local(fs):
        partial = path + ".partial"
        if fs.exists(partial):
            fs.rm(partial, recursive=True)
        fs.makedirs(partial, exist_ok=True)
        for f in sorted(local_dir.iterdir()):
            fs.put_file(str(f), f"{partial}/{f.name}")
        fs.mv(partial, path, recursive=True)
    else:
        fs.makedirs(path, exist_ok=True)
        for f in sorted(local_dir.iterdir()):
            fs.put_file(str(f), f"{path}/{f.name}")


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def local_path(settings: Settings, uri: str) -> str:
    """A path on this machine vLLM can load the adapter from (remote stores are cached under state_dir)."""
    fs, path = fsspec.core.url_to_fs(uri)
    if _is_local(fs):
        if not fs.exists(f"{path}/adapter_config.json"):
            raise ConfigError(f"adapter files missing at {uri} (no adapter_config.json)")
        check_weights(uri)
        return str(path)
    cache = settings.state_dir / "adapter-cache" / path.strip("/").replace("/", "_")
    if not (cache / "adapter_config.json").exists():
        check_weights(uri)  # before anything is fetched
        cache.mkdir(parents=True, exist_ok=True)
        fs.get(f"{path}/", str(cache) + "/", recursive=True)
    problem = weights_problem((f.name for f in cache.iterdir()), uri)
    if problem:
        raise ConfigError(problem)
    return str(cache)


def read_manifest(uri: str) -> dict[str, Any] | None:
    """The dataset manifest stored with an adapter, or None when it is absent (an adapter made elsewhere)."""
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        with fs.open(f"{path}/{MANIFEST}", "r") as fh:
            data: dict[str, Any] = json.load(fh)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data


def adapter_rank(uri: str) -> int:
    """The LoRA rank written in an adapter's adapter_config.json."""
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(f"{path}/adapter_config.json", "r") as fh:
        return int(json.load(fh)["r"])

"""What may be served: the rules every adapter version passes before vLLM loads it, in one place.

Training (the gate, ``tandem promote``/``rollback``, the retraining DAG) and the gateway (promotion, staging,
the reconciler) call these and nothing else:

- its LoRA rank fits the servers' ``--max-lora-rank`` (``max_lora_rank``);
- its weights are safetensors, never a pickle (``adapter_model.bin`` can run code when loaded);
- a version the evaluation gate rejected is promoted only with ``force``, and the override is recorded;
- a version marked failed is never promoted.

A refusal is an ``AdapterError``: a one-line ConfigError (the CLI prints it and exits non-zero) that also
carries the HTTP status and code the gateway's admin API answers with.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from components.errors import ConfigError
from components.registry import AdapterVersion
from components.training import artifacts


class AdapterError(ConfigError):
    """An adapter operation refused; ``status`` and ``code`` are what the admin API answers."""

    def __init__(self, status: int, message: str, code: str = "adapter_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def rank_problem(name: str, rank: int, max_rank: int) -> str | None:
    """Why vLLM would refuse an adapter of this rank (None when it fits)."""
    if rank <= max_rank:
        return None
    return (
        f"adapter {name} has LoRA rank {rank}, above the servers' max_lora_rank {max_rank}; "
        f"retrain with lora_r <= {max_rank} or raise TANDEM_MAX_LORA_RANK"
    )


def check_rank(name: str, rank: int, max_rank: int) -> None:
    problem = rank_problem(name, rank, max_rank)
    if problem:
        raise AdapterError(422, problem, "rank_too_high")


def config_rank(config: dict[str, Any]) -> int:
    """The largest rank an adapter_config.json declares (``r`` and any per-module ``rank_pattern``)."""
    return max([int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


def check_weights(names: Iterable[str], where: str) -> None:
    """Refuse an adapter whose files (``names``) hold no safetensors weights, a pickle above all."""
    problem = artifacts.weights_problem(names, where)
    if problem:
        raise AdapterError(422, problem, "bad_artifact")


def check_servable(av: AdapterVersion, max_rank: int) -> None:
    """The rules the registry and the store can answer for any artifact URL (rank recorded at registration,
    safetensors weights), checked before a promotion or rollback changes anything."""
    check_rank(av.served_name, av.lora_rank, max_rank)
    try:
        artifacts.check_weights(av.artifact_uri)  # lists the folder wherever the store is (fsspec)
    except ConfigError as exc:
        raise AdapterError(422, str(exc), "bad_artifact") from exc


def check_promotable(av: AdapterVersion, force: bool, force_hint: str = "send force=true") -> None:
    """Refuse a version marked failed (409), or one the gate rejected unless ``force`` (409)."""
    if av.status == "failed":
        raise AdapterError(409, f"adapter {av.served_name} is marked failed ({av.reason})", "version_failed")
    if av.status == "rejected" and not force:
        raise AdapterError(
            409,
            f"adapter {av.served_name} was rejected by the evaluation gate ({av.reason}); "
            f"{force_hint} to promote it anyway",
            "version_rejected",
        )


def override_reason(av: AdapterVersion, reason: str | None, force: bool) -> str | None:
    """The reason to record: a forced promotion of a rejected version says it went past the gate, and why."""
    if av.status == "rejected" and force:
        return f"{reason or 'promoted'}, overriding the gate's rejection ({av.reason})"
    return reason


def local_folder(uri: str) -> Path:
    """The folder vLLM loads from: a path or a ``file://`` URL (the gateway's replicas read the same store)."""
    if uri.startswith("file://"):
        return Path(unquote(urlparse(uri).path))
    if "://" in uri:
        raise AdapterError(422, f"artifact {uri!r} is not a local folder or file:// URL", "bad_artifact")
    return Path(uri)


def check_artifact(av: AdapterVersion, max_rank: int) -> Path:
    """The version's folder, after every rule that its files can answer: readable peft config, rank, weights."""
    folder = local_folder(av.artifact_uri)
    config_file = folder / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text())
        files = [f.name for f in folder.iterdir() if f.is_file()]
    except (OSError, ValueError) as exc:
        raise AdapterError(
            422, f"adapter {av.served_name}: cannot read {config_file.name} in {folder} ({exc})", "bad_artifact"
        ) from exc
    check_rank(av.served_name, max(config_rank(config), av.lora_rank), max_rank)
    check_weights(files, av.served_name)
    return folder

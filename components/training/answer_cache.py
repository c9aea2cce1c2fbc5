"""The gate's answer cache: what a model answered to a prompt, reused when a later gate asks it the same thing.

The gate asks a candidate and its baseline (the champion, or the base model) the same prompts at temperature 0.
The baseline's answers are the part that repeats: every retrain against an unchanged champion asks it the same
prompts again, and a promoted candidate's own answers are the next gate's baseline. On a CPU the gate's time is
mostly prefill of those prompts, so reusing the baseline's answers halves what vLLM is asked.

An answer is kept under a digest of everything that decides it: the model's identity (the served name and the
weights behind it: the files of the adapter's or base model's folder, by name, size and modification time),
the dtype vLLM runs, the whole prompt (the retrieved sources are in it, so a changed index is a different prompt)
and the sampling. Sampled answers (temperature above 0) are never cached: a second draw is a new answer. The
table lives in Postgres, so every worker and every machine that runs a gate shares it; rows unused for
``gate_answer_cache_days`` are dropped at the next gate.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.db import connect
from components.settings import Settings


def model_identity(settings: Settings, served_name: str, weights: str) -> str:
    """What a served name stands for: the weights behind it and the dtype vLLM runs them in. ``weights`` is the
    adapter's or base model's local folder (a hub id stays as it is); the name, size and modification time of
    each of its files go in, so weights rewritten in place are a new identity."""
    folder = Path(weights)
    files = sorted(f for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    body = {"served": served_name, "weights": weights, "files": stamp, "dtype": settings.vllm_dtype}
    return json.dumps(body, sort_keys=True)


def answer_key(identity: str, messages: Sequence[dict[str, Any]], max_tokens: int, sampling: dict[str, Any]) -> str:
    body = {"model": identity, "messages": list(messages), "max_tokens": max_tokens, "sampling": sampling}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def cacheable(sampling: dict[str, Any]) -> bool:
    """Only deterministic answers are reused (the client asks at temperature 0 unless told otherwise)."""
    return float(sampling.get("temperature", 0.0)) == 0.0


class AnswerCache:
    """Reads and writes ``gate_answers`` (migration 0017), one short transaction per call."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.looked_up = 0  # keys asked for, and how many of them were found: the gate's notes report both
        self.found = 0

    def get(self, keys: Sequence[str]) -> dict[str, str]:
        """The cached answers among ``keys``; the ones found are marked used now."""
        if not keys:
            return {}
        with connect(self.settings, vector=False) as conn:
            rows = conn.execute(
                "UPDATE gate_answers SET used_at = now() WHERE key = ANY(%s) RETURNING key, answer", (list(keys),)
            ).fetchall()
        self.looked_up += len(keys)
        self.found += len(rows)
        return {str(k): str(a) for k, a in rows}

    def put(self, rows: Sequence[tuple[str, str, str]]) -> None:
        """Store (key, model, answer) rows; a key another gate stored meanwhile is only marked used."""
        if not rows:
            return
        with connect(self.settings, vector=False) as conn, conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO gate_answers (key, model, answer) VALUES (%s, %s, %s) "
                "ON CONFLICT (key) DO UPDATE SET used_at = now()",
                list(rows),
            )

    def prune(self) -> int:
        """Drop answers unused for ``gate_answer_cache_days``; returns how many went."""
        with connect(self.settings, vector=False) as conn:
            cur = conn.execute(
                "DELETE FROM gate_answers WHERE used_at < now() - make_interval(days => %s)",
                (self.settings.gate_answer_cache_days,),
            )
            return cur.rowcount or 0

"""`tandem bench train`: LoRA training throughput here, and the time from new data landing to the promoted
adapter answering requests (through the gateway when it is up, else straight from vLLM).

Writes bench/results/train.json. The second figure needs Postgres and vLLM; vLLM is started for the run (and
stopped after) when it is not already up.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from components.cli._output import add_json_flag, print_json
from components.errors import TandemError
from components.keys import bearer, client_secret
from components.settings import Settings, get_settings
from components.vllm_client import first_vllm_url

RESULTS = Path("bench/results/train.json")
ALIAS = "benchtrain"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="LoRA training tokens/s and new-data-to-serving time")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps for the throughput run (default 8)")
    p.add_argument("--e2e-steps", type=int, default=4, help="optimizer steps in the end-to-end run (default 4)")
    p.add_argument("--data", help="training data (default: settings.train_data)")
    p.add_argument("--gate-questions", type=int, default=20, help="questions per gate set (default 20)")
    p.add_argument("--skip-e2e", action="store_true", help="only measure training throughput")
    add_json_flag(p)
    p.set_defaults(func=cmd_bench_train)


def throughput(settings: Settings, data: str, steps: int) -> dict[str, Any]:
    """Tokens/s of LoRA training with the configured r, batch size and sequence length."""
    from components.models import base_model_path
    from components.training.data import load_dataset, split_dataset
    from components.training.lora import TrainConfig, train_adapter

    ds = load_dataset(data)
    split = split_dataset(ds.examples, settings.train_heldout_fraction)
    config = TrainConfig.from_settings(settings, max_steps=steps, early_stopping_patience=0, eval_steps=steps)
    work = Path(tempfile.mkdtemp(prefix="tandem-bench-train-"))
    try:
        r = train_adapter(
            base_model_path(settings),
            [e.as_messages() for e in split.train],
            [e.as_messages() for e in split.validation],
            config,
            work,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "device": r.device,
        "dtype": r.dtype,
        "steps": r.global_step,
        "batch_size": config.batch_size,
        "max_seq_len": config.max_seq_len,
        "lora_r": config.r,
        "train_tokens": r.train_tokens,
        "tokens_per_s": r.tokens_per_s,
        "seconds": r.seconds,
        "train_loss": r.train_loss,
        "val_loss": r.best_val_loss,
    }


def _first_answer(settings: Settings, alias: str, served: str) -> tuple[str, float]:
    """Ask the promoted adapter one question: through the gateway if it is up, else vLLM. Returns (via, s)."""
    from components.training import artifacts
    from components.training.vllm_client import VllmClient

    started = time.monotonic()
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is a DON?"}]
    body = {"messages": messages, "max_tokens": 16, "temperature": 0}
    headers = bearer(client_secret(settings))
    try:
        resp = httpx.post(
            f"{settings.gateway_url}/v1/chat/completions", json={**body, "model": alias}, headers=headers, timeout=120
        )
        if resp.status_code == 200:
            return "gateway", time.monotonic() - started
    except httpx.ConnectError:
        pass
    from components import registry
    from components.db import connect

    with connect(settings) as conn:
        champ = registry.get_champion(conn, alias)
    assert champ is not None
    with VllmClient.for_settings(settings) as client:
        client.load_adapter(served, artifacts.local_path(settings, champ.artifact_uri))
        client.chat(served, messages, 16)
    return "vllm", time.monotonic() - started


def new_data_to_serving(settings: Settings, data: str, steps: int) -> dict[str, Any]:
    """Land a fresh copy of the data for a bench alias and time each stage until the adapter answers."""
    from components.training import pipeline
    from components.training.promotion import promote

    folder = Path(tempfile.mkdtemp(prefix="tandem-bench-data-"))
    stamp = time.strftime("%Y%m%d%H%M%S")
    try:
        src = Path(data)
        for f in [src] if src.is_file() else sorted(src.glob("*.jsonl")):
            shutil.copy(f, folder / f.name)
        marker = {"question": f"What is bench run {stamp}?", "answer": f"Bench run {stamp}."}
        (folder / "landed.jsonl").write_text(json.dumps(marker) + "\n")  # new data: a new dataset version
        t0 = time.monotonic()
        stages: dict[str, float] = {}
        check = pipeline.check_new_data(settings, ALIAS, str(folder))
        stages["check_new_data"] = time.monotonic() - t0
        t = time.monotonic()
        trained = pipeline.train_candidate(settings, ALIAS, str(folder), {"max_steps": steps})
        stages["train"] = time.monotonic() - t
        t = time.monotonic()
        cand = pipeline.register_candidate(settings, pipeline.pick_best([trained]))
        stages["register"] = time.monotonic() - t
        t = time.monotonic()
        gate = pipeline.evaluate_gate(settings, ALIAS, cand.version, str(folder))
        stages["gate"] = time.monotonic() - t
        t = time.monotonic()
        forced = not gate.promote
        done = promote(settings, ALIAS, cand.version, reason="bench", force=forced)
        stages["promote"] = time.monotonic() - t
        via, first = _first_answer(settings, ALIAS, cand.served_name)
        stages["first_answer"] = first
        total = time.monotonic() - t0
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "total_s": round(total, 1),
        "stages_s": {k: round(v, 2) for k, v in stages.items()},
        "examples": check.examples,
        "gate_max_questions": settings.gate_max_questions,
        "steps": steps,
        "gate_promoted": not forced,
        "gate_reasons": gate.reasons,
        "gate_questions": gate.counts,
        "promoted_via": done.via,
        "served_via": via,
    }


def cmd_bench_train(args: argparse.Namespace) -> int:
    from components.stack import manager
    from components.stack.health import http_ok

    settings = get_settings().model_copy(update={"gate_max_questions": args.gate_questions})
    data = args.data or settings.train_data
    say = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"training throughput: {args.steps} steps on {data}...")
    result: dict[str, Any] = {
        "host": {"machine": platform.machine(), "python": platform.python_version()},
    }
    measured = throughput(settings, data, args.steps)
    result["throughput"] = {"gpu" if measured["device"] == "cuda" else "cpu": measured}
    import torch

    result["host"]["cpu_threads"] = torch.get_num_threads()
    if not args.skip_e2e:
        from components.db import migrate

        migrate(settings)  # a fresh state dir has no registry yet
        started_vllm = False
        if not http_ok(f"{first_vllm_url(settings)}/health"):
            say("starting vLLM for the end-to-end run...")
            manager.up(settings, only=["vllm"])
            started_vllm = True
        try:
            say("new data -> train -> gate -> promote -> first answer...")
            result["new_data_to_serving"] = new_data_to_serving(settings, data, args.e2e_steps)
        except TandemError as exc:  # keep the throughput figure; say why the second one is missing
            result["new_data_to_serving"] = {"error": str(exc)}
        finally:
            if started_vllm:
                manager.down(settings, only=["vllm"])
    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for dev, figure in old.get("throughput", {}).items():
        result["throughput"].setdefault(dev, figure)  # keep a figure measured on the other kind of host
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print_json(result)
    else:
        for dev, t in result["throughput"].items():
            print(f"training {dev}: {t['tokens_per_s']} tokens/s ({t['train_tokens']} tokens, {t['seconds']} s)")
        e2e = result.get("new_data_to_serving")
        if e2e and "error" in e2e:
            print(f"new data -> serving not measured: {e2e['error']}")
        elif e2e:
            print(f"new data -> promoted adapter serving ({e2e['served_via']}): {e2e['total_s']} s {e2e['stages_s']}")
        print(f"written to {RESULTS}")
    return 0

"""`tandem bench gateway`: direct vLLM vs the gateway (retrieval off, then on) at 1 and 16 clients, embed and
retrieve latency, and promotion time with errors counted under load. Needs vLLM, Postgres and the gateway
(started if they are not up) and an ingested corpus.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from components.cli._output import add_json_flag, print_json, table
from components.errors import ServiceError
from components.keys import admin_secret, bearer, vllm_secret
from components.settings import Settings, get_settings
from components.vllm_client import first_vllm_url

QUESTION = "When does Corran Lock open for transits?"
TARGETS = {
    "overhead_p50_ms": 5.0,
    "throughput_loss_pct_16": 5.0,
    "embed_retrieve_p50_ms": 25.0,
    "promotion_staged_s": 2.0,
    "promotion_cold_s": 2.0,
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("gateway", help="gateway overhead, RAG cost, promotion time (vLLM vs gateway)")
    p.add_argument("--requests", type=int, default=40, help="requests per variant at 1 client")
    p.add_argument("--requests-16", type=int, default=48, help="requests per variant at 16 clients")
    p.add_argument("--rounds-16", type=int, default=3, help="rounds of the 16-client variants, in rotated order")
    p.add_argument("--max-tokens", type=int, default=8, help="most tokens generated per request")
    p.add_argument(
        "--promotions", type=int, default=3, help="promotions of each kind (cold, staged) timed under 8 clients"
    )
    p.add_argument("--out", default="bench/results/gateway.json", help="where to write the results JSON")
    add_json_flag(p)
    p.set_defaults(func=run)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def _auth(s: Settings, url: str) -> dict[str, str]:
    """vLLM's key for a vLLM URL, else the gateway's admin key (it is also a client key)."""
    if any(url.startswith(v) for v in s.vllm_endpoints):
        return bearer(vllm_secret(s))
    return bearer(admin_secret(s))


async def _load(url: str, body: dict[str, Any], headers: dict[str, str], n: int, clients: int) -> dict[str, Any]:
    """n requests from ``clients`` concurrent clients: their latencies, errors and the wall time."""
    latencies: list[float] = []
    errors = 0
    queue = list(range(n))
    async with httpx.AsyncClient(timeout=600, headers=headers) as http:

        async def worker() -> None:
            nonlocal errors
            while queue:
                queue.pop()
                started = time.perf_counter()
                try:
                    r = await http.post(url, json=body)
                    r.raise_for_status()
                    latencies.append(time.perf_counter() - started)
                except httpx.HTTPError:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - started
    return {"clients": clients, "latencies": latencies, "errors": errors, "wall": wall}


def _row(runs: list[dict[str, Any]], cpu: dict[str, float] | None = None) -> dict[str, Any]:
    """One table row from one or more runs of a variant: percentiles, throughput over their summed wall time."""
    latencies = [x for r in runs for x in r["latencies"]]
    row = {
        "clients": runs[0]["clients"],
        "requests": len(latencies) + sum(r["errors"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "p50_ms": round(1000 * _pct(latencies, 0.5), 2),
        "p95_ms": round(1000 * _pct(latencies, 0.95), 2),
        "req_per_s": round(len(latencies) / sum(r["wall"] for r in runs), 3),
    }
    if cpu:
        row |= {
            f"{name}_cpu_ms_per_request": round(1000 * sec / max(1, row["requests"]), 1) for name, sec in cpu.items()
        }
    return row


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process and its descendants so far (Linux /proc; 0 where unreadable)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += _cpu_seconds(int(child))
    except (OSError, ValueError, IndexError):
        return 0.0
    return total


async def _rounds_at_16(
    s: Settings, variants: dict[str, tuple[str, dict[str, Any]]], n: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """The 16-client variants in ``rounds`` rounds, each in a rotated order, so the host's drift from minute to
    minute spreads over all of them; the CPU the gateway and vLLM spend on each variant is summed as well."""
    from components.stack import manager

    pids = {c.name: c.pid for c in manager.status(s, ["vllm", "gateway"])}
    names = list(variants)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in names}
    cpu: dict[str, dict[str, float]] = {k: {"gateway": 0.0, "vllm": 0.0} for k in names}
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            url, body = variants[name]
            before = {k: _cpu_seconds(pids.get(k)) for k in ("gateway", "vllm")}
            runs[name].append(await _load(url, body, _auth(s, url), n, 16))
            for k in ("gateway", "vllm"):
                cpu[name][k] += _cpu_seconds(pids.get(k)) - before[k]
    return {name: _row(runs[name], cpu[name]) for name in names}


async def _overhead_pairs(s: Settings, n: int) -> dict[str, Any]:
    """1 client, 1 token: a direct and a gateway request per pair, in alternating order so that neither side
    always follows the other (vLLM's prefix cache, drift); the overhead is the median of the pairs' differences."""
    direct_body = {
        "model": s.served_model_name,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 1,
    }
    targets = {
        "direct": (first_vllm_url(s) + "/v1/chat/completions", direct_body),
        "gateway": (s.gateway_url + "/v1/chat/completions", {**direct_body, "rag": False}),
    }
    times: dict[str, list[float]] = {"direct": [], "gateway": []}
    async with httpx.AsyncClient(timeout=120) as http:
        for _ in range(3):  # warm both paths
            for url, body in targets.values():
                await http.post(url, json=body, headers=_auth(s, url))
        for i in range(n):
            for side in ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct"):
                url, body = targets[side]
                headers = _auth(s, url)
                t = time.perf_counter()
                (await http.post(url, json=body, headers=headers)).raise_for_status()
                times[side].append(time.perf_counter() - t)
    d, g = statistics.median(times["direct"]), statistics.median(times["gateway"])
    diffs = [b - a for a, b in zip(times["direct"], times["gateway"], strict=True)]
    return {
        "pairs": n,
        "direct_p50_ms": round(1000 * d, 2),
        "gateway_p50_ms": round(1000 * g, 2),
        "overhead_p50_ms": round(1000 * statistics.median(diffs), 2),
    }


def _embed_retrieve(s: Settings, n: int) -> dict[str, Any]:
    from components.db import connect
    from components.query_encoder import load_query_encoder
    from components.retrieval import hybrid_search

    embedder = load_query_encoder(s)  # as the gateway does
    questions = [QUESTION, "How are berths booked?", "Who handles a diesel spill?", "What is a hot works permit?"]
    embedder.encode_query(questions[0])
    embed, retrieve, total, found = [], [], [], 0
    with connect(s) as conn:
        for i in range(n):
            q = questions[i % len(questions)]
            t0 = time.perf_counter()
            vector = embedder.encode_query(q)
            t1 = time.perf_counter()
            found += len(hybrid_search(conn, q, vector, top_k=s.rag_top_k, candidates=s.rag_candidates))
            t2 = time.perf_counter()
            embed.append(t1 - t0)
            retrieve.append(t2 - t1)
            total.append(t2 - t0)
    if not found:
        raise ServiceError("retrieval found no chunks: run `tandem ingest` first")
    return {
        "queries": n,
        "runtime": embedder.runtime,
        "embed_p50_ms": round(1000 * statistics.median(embed), 2),
        "retrieve_p50_ms": round(1000 * statistics.median(retrieve), 2),
        "embed_retrieve_p50_ms": round(1000 * statistics.median(total), 2),
    }


def _bench_adapters(s: Settings) -> list[Path]:
    """Two tiny random adapter folders (made once); each promotion registers a new version of one of them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from components.models import base_model_path

    folders = []
    for seed in (1, 2):
        folder = s.adapters_dir / "bench" / f"seed{seed}"
        if not (folder / "adapter_model.safetensors").exists():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_pretrained(base_model_path(s), torch_dtype=torch.float32)
            config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            get_peft_model(model, config).save_pretrained(str(folder))
        folders.append(folder)
    return folders


def _register(s: Settings, folder: Path) -> int:
    """A new version of the alias 'bench' (removed again at the end): a name vLLM has never loaded."""
    from components import registry
    from components.db import connect

    with connect(s) as conn:
        av = registry.register_candidate(
            conn,
            alias="bench",
            base_model=s.served_model_name,
            dataset_version="bench",
            dataset_size=0,
            hyperparameters={"r": 8},
            metrics={},
            artifact_uri=str(folder),
            lora_rank=8,
        )
        conn.commit()
    return av.version


async def _promotions(s: Settings, headers: dict[str, str], folders: list[Path], rounds: int) -> dict[str, Any]:
    """Promotions under 8 clients, each of a version never loaded before: `rounds` cold (load, warm and switch
    in the one request) and `rounds` staged (loaded and warmed by /stage first, untimed, as the retraining
    pipeline does for a candidate that passes the gate). Failed requests are counted throughout."""
    stop = asyncio.Event()
    ok = errors = 0
    body = {"model": "bench", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "rag": False}
    admin = s.gateway_url + "/v1/admin/adapters"
    async with httpx.AsyncClient(timeout=600, headers=headers) as http:

        async def client() -> None:
            nonlocal ok, errors
            while not stop.is_set():
                try:
                    (await http.post(s.gateway_url + "/v1/chat/completions", json=body)).raise_for_status()
                    ok += 1
                except httpx.HTTPError:
                    errors += 1

        async def version(i: int) -> dict[str, Any]:
            return {"alias": "bench", "version": await asyncio.to_thread(_register, s, folders[i % len(folders)])}

        (await http.post(admin + "/promote", json=await version(0))).raise_for_status()
        tasks = [asyncio.create_task(client()) for _ in range(8)]
        await asyncio.sleep(2.0)
        timed: dict[str, list[float]] = {"cold": [], "staged": []}
        stages: dict[str, list[dict[str, float]]] = {"cold": [], "staged": []}
        for i in range(2 * rounds):
            kind = "cold" if i % 2 == 0 else "staged"
            target = await version(i + 1)
            if kind == "staged":
                (await http.post(admin + "/stage", json=target)).raise_for_status()
            t = time.perf_counter()
            r = await http.post(admin + "/promote", json=target)
            r.raise_for_status()
            timed[kind].append(time.perf_counter() - t)
            stages[kind].append(r.json().get("stages_s", {}))
            await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*tasks)
    out: dict[str, Any] = {"promotions_each": rounds, "requests_during": ok + errors, "failed_requests": errors}
    for kind, times in timed.items():
        out[f"{kind}_p50_s"] = round(statistics.median(times), 3)
        out[f"{kind}_max_s"] = round(max(times), 3)
        out[f"{kind}_stages_s"] = stages[kind]
    return out


def _cleanup(s: Settings) -> None:
    from components.db import connect

    with connect(s) as conn:
        conn.execute("DELETE FROM adapter_versions WHERE alias = 'bench'")
        conn.commit()
    headers = bearer(vllm_secret(s))
    for url in s.vllm_endpoints:
        models = httpx.get(url + "/v1/models", headers=headers).json()["data"]
        for name in [m["id"] for m in models if m["id"].startswith("bench-v")]:
            httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": name}, headers=headers)


def run(args: argparse.Namespace) -> int:
    from components.stack import manager

    s = get_settings()
    manager.up(s, only=["postgres", "vllm", "gateway"])
    headers = bearer(admin_secret(s))  # the gateway's admin API (promotions) and /v1
    base = {
        "model": s.served_model_name,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": args.max_tokens,
        # No ignore_eos: the gateway refuses vLLM-only options (400), so both sides send the same body.
    }
    direct_url, gw_url = first_vllm_url(s) + "/v1/chat/completions", s.gateway_url + "/v1/chat/completions"
    results: dict[str, Any] = {"settings": {"max_tokens": args.max_tokens, "vllm": s.vllm_endpoints}}
    results["embed_retrieve"] = _embed_retrieve(s, 40)
    results["overhead_1_client"] = asyncio.run(_overhead_pairs(s, args.requests))
    variants = {
        "direct": (direct_url, base),
        "gateway_rag_off": (gw_url, {**base, "rag": False}),
        "gateway_rag_on": (gw_url, {**base, "rag": True}),
    }
    n1 = max(8, args.requests // 4)
    load: dict[str, Any] = {
        f"{k}_1": _row([asyncio.run(_load(u, b, _auth(s, u), n1, 1))]) for k, (u, b) in variants.items()
    }
    at16 = asyncio.run(_rounds_at_16(s, variants, args.requests_16, args.rounds_16))
    load |= {f"{k}_16": v for k, v in at16.items()}
    results["load"] = load
    folders = _bench_adapters(s)
    try:
        results["promotion"] = asyncio.run(_promotions(s, headers, folders, args.promotions))
    finally:
        _cleanup(s)
    loss = 100 * (1 - load["gateway_rag_off_16"]["req_per_s"] / load["direct_16"]["req_per_s"])
    gw_cpu = load["gateway_rag_off_16"].get("gateway_cpu_ms_per_request", 0.0)
    vllm_cpu = load["gateway_rag_off_16"].get("vllm_cpu_ms_per_request", 0.0)
    results["summary"] = {
        # What the gateway itself costs, free of the host's drift: its CPU per request beside vLLM's.
        "gateway_cpu_share_pct_16": round(100 * gw_cpu / (gw_cpu + vllm_cpu), 2) if gw_cpu + vllm_cpu else None,
        "overhead_p50_ms": results["overhead_1_client"]["overhead_p50_ms"],
        "throughput_loss_pct_16": round(loss, 2),
        "embed_retrieve_p50_ms": results["embed_retrieve"]["embed_retrieve_p50_ms"],
        "promotion_staged_s": results["promotion"]["staged_max_s"],
        "promotion_cold_s": results["promotion"]["cold_max_s"],
        "promotion_failed_requests": results["promotion"]["failed_requests"],
    }
    results["targets"] = {
        k: {"target": v, "measured": results["summary"][k], "met": results["summary"][k] <= v}
        for k, v in TARGETS.items()
    }
    results["targets"]["promotion_zero_errors"] = {"met": results["promotion"]["failed_requests"] == 0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if args.json:
        print_json(results)
        return 0
    rows = [
        (k, v["clients"], v["requests"], v["errors"], v["p50_ms"], v["p95_ms"], v["req_per_s"],
         v.get("gateway_cpu_ms_per_request", ""), v.get("vllm_cpu_ms_per_request", ""))
        for k, v in load.items()
    ]  # fmt: skip
    heads = ["variant", "clients", "requests", "errors", "p50 ms", "p95 ms", "req/s", "gateway CPU ms/req",
             "vLLM CPU ms/req"]  # fmt: skip
    print(table(rows, heads))
    print()
    print(
        table(
            [(k, v.get("target", 0), v.get("measured", ""), v["met"]) for k, v in results["targets"].items()],
            ["target", "limit", "measured", "met"],
        )
    )
    print(f"\nwritten to {out}")
    return 0

"""`tandem bench fleet`: a fleet on one machine, side by side in one run.

- switch propagation, registry commit (``promoted_at``) to both gateways serving the new version: gateways that
  LISTEN for the registry's NOTIFY against gateways that only poll (TANDEM_REGISTRY_NOTIFY=false, the reconcile
  round every reconcile_interval_s);
- gateway CPU per request with 2 gateways against 1 (the same requests, spread or not);
- requests per second through one gateway with 2 vLLM replicas against 1, at 16 clients.

Starts (or reuses) 2 vLLM replicas and 2 gateways with `tandem up`'s manager and restarts the gateways between
the variants. Results go to bench/results/fleet.json.
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

from components.bench.gateway import QUESTION, _bench_adapters, _cpu_seconds, _load, _pct, _register, _row
from components.cli._output import add_json_flag, print_json, table
from components.errors import ServiceError
from components.keys import admin_secret, bearer
from components.settings import Settings, get_settings

ALIAS = "bench"
PROPAGATION_TARGET_S = 1.0  # issue 16: p95 <= 1 s with NOTIFY


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fleet", help="2 gateways x 2 vLLM replicas: switch propagation, CPU, throughput")
    p.add_argument("--switches", type=int, default=5, help="promotions timed per propagation variant")
    p.add_argument("--requests", type=int, default=32, help="requests per load variant")
    p.add_argument("--max-tokens", type=int, default=8, help="at most this many tokens per answer")
    p.add_argument("--out", default="bench/results/fleet.json", help="where to write the results JSON")
    add_json_flag(p)
    p.set_defaults(func=run)


def _fleet(s: Settings) -> Settings:
    return s.model_copy(update={"vllm_replicas": 2, "gateway_replicas": 2})


def _gateways(s: Settings) -> list[str]:
    return [f"http://{s.host}:{s.gateway_port + i}" for i in range(s.gateway_replicas)]


def _restart_gateways(s: Settings, env: dict[str, str]) -> None:
    """Stop the gateways and start them again with ``env`` (their settings come from the environment)."""
    from components.stack import manager

    manager.down(s, only=["gateway"])
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        manager.up(s, only=["gateway"])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _serves(http: httpx.Client, gateway: str, version: int) -> bool:
    """True when ``gateway`` routes the alias to ``version`` on a replica (not the base model)."""
    entry = next((a for a in http.get(gateway + "/v1/admin/adapters").json()["aliases"] if a["alias"] == ALIAS), None)
    return bool(entry and entry["champion_version"] == version and not entry["fallback"])


def _propagation(s: Settings, folders: list[Path], switches: int) -> dict[str, Any]:
    """Promote new versions through gateway A; seconds from the registry commit until both gateways serve each.

    The commit is seen by reading the registry in the same loop that watches the gateways (every ~10 ms), while
    the promotion runs: ``promoted_at`` is the transaction's start, before the load and warm-up, not its commit.
    """
    from concurrent.futures import ThreadPoolExecutor

    from components import registry
    from components.db import connect

    gateways = _gateways(s)
    delays: list[float] = []
    with (
        httpx.Client(headers=bearer(admin_secret(s)), timeout=120) as http,
        ThreadPoolExecutor(1) as pool,
        connect(s) as conn,
    ):
        for i in range(switches + 1):
            version = _register(s, folders[i % len(folders)])
            body = {"alias": ALIAS, "version": version}
            promotion = pool.submit(http.post, gateways[0] + "/v1/admin/adapters/promote", json=body)
            committed: float | None = None
            seen_at: dict[str, float] = {}
            deadline = time.monotonic() + 120
            while len(seen_at) < len(gateways) and time.monotonic() < deadline:
                if promotion.done() and promotion.result().status_code >= 400:
                    reply = promotion.result()
                    raise ServiceError(f"promotion of {ALIAS} v{version} refused ({reply.status_code}): {reply.text}")
                if committed is None:
                    champion = registry.get_champion(conn, ALIAS)
                    conn.rollback()
                    if champion is not None and champion.version == version:
                        committed = time.time()
                for gw in gateways:
                    if gw not in seen_at and _serves(http, gw, version):
                        seen_at[gw] = time.time()
                time.sleep(0.01)
            promotion.result().raise_for_status()
            if committed is None or len(seen_at) < len(gateways):
                raise ServiceError(f"the gateways did not all serve {ALIAS} v{version} within 120 s")
            if i > 0:  # the first switch only puts the alias in place
                delays.append(max(0.0, max(seen_at.values()) - committed))
    return {
        "switches": len(delays),
        "p50_s": round(statistics.median(delays), 3),
        "p95_s": round(_pct(delays, 0.95), 3),
        "max_s": round(max(delays), 3),
    }


def _cpu_per_request(s: Settings, body: dict[str, Any], n: int, spread: bool) -> dict[str, Any]:
    """n requests at 8 clients through gateway A, or spread over both; CPU of every gateway process summed."""
    from components.stack import manager

    gateways = _gateways(s) if spread else _gateways(s)[:1]
    pids = [c.pid for c in manager.status(s, ["gateway"])][: len(gateways)]  # the gateways that get requests
    headers = bearer(admin_secret(s))
    before = sum(_cpu_seconds(p) for p in pids)

    async def both() -> list[dict[str, Any]]:
        share = n // len(gateways)
        runs = [_load(gw + "/v1/chat/completions", body, headers, share, 8 // len(gateways)) for gw in gateways]
        return list(await asyncio.gather(*runs))

    runs = asyncio.run(both())
    cpu = sum(_cpu_seconds(p) for p in pids) - before
    row = _row(runs)
    row["wall_s"] = round(max(r["wall"] for r in runs), 2)
    row["req_per_s"] = round((row["requests"] - row["errors"]) / row["wall_s"], 3)
    row["gateway_cpu_ms_per_request"] = round(1000 * cpu / max(1, row["requests"]), 1)
    row["gateways"] = len(gateways)
    return row


def _at_16(s: Settings, body: dict[str, Any], n: int) -> dict[str, Any]:
    """n requests from 16 clients through gateway A."""
    url = _gateways(s)[0] + "/v1/chat/completions"
    return _row([asyncio.run(_load(url, body, bearer(admin_secret(s)), n, 16))])


def run(args: argparse.Namespace) -> int:
    from components.stack import manager

    s = _fleet(get_settings())
    manager.up(s, only=["postgres", "vllm", "gateway"])
    folders = _bench_adapters(s)
    body = {
        "model": ALIAS,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": args.max_tokens,
        "rag": False,  # retrieval costs the same per request whatever the fleet; `tandem bench gateway` measures it
    }
    replicas = s.vllm_endpoints
    results: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores, no GPU" if not os.path.exists("/dev/nvidia0") else "GPU host",
        "settings": {"max_tokens": args.max_tokens, "replicas": replicas, "gateways": _gateways(s)},
    }
    try:
        _restart_gateways(s, {"TANDEM_REGISTRY_NOTIFY": "true"})
        results["propagation_notify"] = _propagation(s, folders, args.switches)
        _cpu_per_request(s, body, 8, spread=True)  # warm-up, not counted: both gateways finish loading at start
        results["cpu_1_gateway"] = _cpu_per_request(s, body, args.requests, spread=False)
        results["cpu_2_gateways"] = _cpu_per_request(s, body, args.requests, spread=True)
        one = s.model_copy(update={"gateway_replicas": 1})
        results["replicas_2_16_clients"] = _at_16(s, body, args.requests)
        _restart_gateways(s, {"TANDEM_REGISTRY_NOTIFY": "false"})
        results["propagation_polling"] = _propagation(s, folders, args.switches)
        manager.down(s, only=["gateway"])
        manager.up(one.model_copy(update={"vllm_urls": replicas[:1]}), only=["gateway"])
        results["replicas_1_16_clients"] = _at_16(one, body, args.requests)
    finally:
        _cleanup(s)
        manager.down(s, only=["gateway"])
        manager.up(s, only=["gateway"])  # the fleet as configured again
    notify, polling = results["propagation_notify"], results["propagation_polling"]
    results["summary"] = {
        "propagation_notify_p95_s": notify["p95_s"],
        "propagation_polling_p95_s": polling["p95_s"],
        "gateway_cpu_ms_per_request_1": results["cpu_1_gateway"]["gateway_cpu_ms_per_request"],
        "gateway_cpu_ms_per_request_2": results["cpu_2_gateways"]["gateway_cpu_ms_per_request"],
        "req_per_s_1_replica": results["replicas_1_16_clients"]["req_per_s"],
        "req_per_s_2_replicas": results["replicas_2_16_clients"]["req_per_s"],
        "caveat": "the replicas share this host's cores: a second replica adds no compute here (on a GPU host, "
        "one GPU per replica, throughput is expected to scale with the replicas)",
    }
    results["targets"] = {
        "propagation_notify_p95_s": {
            "target": PROPAGATION_TARGET_S,
            "measured": notify["p95_s"],
            "met": notify["p95_s"] <= PROPAGATION_TARGET_S,
        }
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if args.json:
        print_json(results)
        return 0
    rows = [(k, v) for k, v in results["summary"].items() if k != "caveat"]
    print(table(rows, ["figure", "value"]))
    print(f"\n{results['summary']['caveat']}\nwritten to {out}")
    return 0


def _cleanup(s: Settings) -> None:
    """Remove the bench alias from the registry and its versions from every replica."""
    from components.bench.gateway import _cleanup as cleanup_bench_alias

    try:
        cleanup_bench_alias(s)
    except (httpx.HTTPError, OSError) as exc:
        print(f"cleanup: {exc}")

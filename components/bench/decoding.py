"""`tandem bench decoding`: the retrieval arms (base + retrieval, adapter + retrieval) on the held-out set under
several decoding settings, in one run, to choose the gateway's RAG decoding defaults per arm.

Each variant is a full arm run through the gateway (the real serving path): accuracy, how often the answer
cites the expected source, answer length and latency. Writes bench/results/decoding.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from components.cli._output import add_json_flag, print_json, table
from components.settings import get_settings

RESULTS = Path("bench/results/decoding.json")
# Each adds one change to the one before it, so the table says what each change did. Every variant names its
# repetition penalty: the gateway fills a field the caller leaves unset with its own default (rag_decoding_*), so a
# variant without one would be measured with whatever penalty the gateway was started with.
VARIANTS: dict[str, dict[str, Any]] = {
    "greedy-48": {"temperature": 0, "max_tokens": 48, "repetition_penalty": 1.0},
    "greedy-96": {"temperature": 0, "max_tokens": 96, "repetition_penalty": 1.0},
    # a branch from greedy-96: a penalty on the answer's own repeats only (vLLM applies frequency_penalty to the
    # generated tokens, repetition_penalty to the prompt's as well)
    "freq0.3-96": {"temperature": 0, "max_tokens": 96, "repetition_penalty": 1.0, "frequency_penalty": 0.3},
    "rep1.1-96": {"temperature": 0, "max_tokens": 96, "repetition_penalty": 1.1},
    "rep1.1-96-stop": {"temperature": 0, "max_tokens": 96, "repetition_penalty": 1.1, "stop": ["\n\n"]},
    "rep1.3-96-stop": {"temperature": 0, "max_tokens": 96, "repetition_penalty": 1.3, "stop": ["\n\n"]},
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("decoding", help="RAG arms under several decoding settings, to choose the defaults")
    p.add_argument("--alias", help="alias whose champion is the adapter arm (default: settings.default_alias)")
    p.add_argument("--qa", help="QA set (default: settings.qa_set)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--variants", help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    add_json_flag(p)
    p.set_defaults(func=cmd_bench_decoding)


def run(alias: str, qa: str | None, limit: int | None, names: list[str]) -> dict[str, Any]:
    from components.db import connect
    from components.evaluation.qa import load_qa
    from components.evaluation.run import check_gateway, resolve_qa_path, run_arms
    from components.registry import get_champion

    settings = get_settings()
    check_gateway(settings)
    items = load_qa(resolve_qa_path(settings, qa), limit=limit)
    with connect(settings) as conn:
        champion = get_champion(conn, alias)
    rows = []
    for name in names:
        print(f"variant {name}: {VARIANTS[name]}", file=sys.stderr, flush=True)
        arms, _ = asyncio.run(
            run_arms(settings, items, alias, champion is not None, None, ["base_rag", "adapter_rag"], VARIANTS[name])
        )
        for arm in arms:
            if not arm.measured:
                continue
            rows.append(
                {
                    "variant": name,
                    "decoding": VARIANTS[name],
                    "arm": arm.arm,
                    "accuracy": arm.accuracy,
                    "source_cited": arm.source_hit_rate,
                    "completion_tokens_mean": arm.completion_tokens_mean,
                    "latency_p50_s": arm.latency_p50_s,
                    "errors": arm.errors,
                }
            )
    return {
        "questions": len(items),
        "alias": alias,
        "adapter_version": champion.version if champion else None,
        "rows": rows,
    }


def cmd_bench_decoding(args: argparse.Namespace) -> int:
    settings = get_settings()
    names = [n.strip() for n in (args.variants or ",".join(VARIANTS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(
            f"error: unknown variant(s) {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}", file=sys.stderr
        )
        return 2
    result = run(args.alias or settings.default_alias, args.qa, args.limit, names)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print_json(result)
        return 0

    def pct(v: float | None) -> str:
        return "" if v is None else f"{100 * v:.0f}%"

    rows = [
        [r["variant"], r["arm"], pct(r["accuracy"]), pct(r["source_cited"]), r["completion_tokens_mean"],
         r["latency_p50_s"] and round(r["latency_p50_s"], 2)]
        for r in result["rows"]
    ]  # fmt: skip
    print(table(rows, ["variant", "arm", "accuracy", "cites source", "tokens", "p50 s"]))
    print(f"\nresults: {args.out}")
    return 0

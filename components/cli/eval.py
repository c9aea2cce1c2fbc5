"""`tandem eval`: RAG vs fine-tune vs hybrid, measured through the gateway on a held-out QA set."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from components.cli._output import add_json_flag, print_json, show_progress
from components.settings import get_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="measure base, base + retrieval, adapter and adapter + retrieval on held-out questions",
        description="Runs four arms through the gateway (base model alone, base + retrieval, adapter alone, "
        "adapter + retrieval) and retrieval alone; writes a Markdown report and a chart, and stores the scores.",
    )
    p.add_argument("--qa", type=Path, help="QA set, JSONL of {id, question, answer, source} (default: TANDEM_QA_SET)")
    p.add_argument("--alias", help="adapter alias for the adapter arms (default: TANDEM_DEFAULT_ALIAS)")
    p.add_argument("--out", type=Path, help="report folder (default: STATE_DIR/eval/<timestamp>/)")
    p.add_argument("--limit", type=int, help="use only the first N questions")
    p.add_argument(
        "--arms",
        type=lambda v: [a.strip() for a in v.split(",") if a.strip()],
        help="comma-separated subset of base,base_rag,adapter,adapter_rag (default: all four)",
    )
    p.add_argument("--no-store", action="store_true", help="do not store the scores in Postgres")
    add_json_flag(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from components.evaluation.report import format_table
    from components.evaluation.run import run_evaluation

    settings = get_settings()
    progress = show_progress(args.json)
    report = run_evaluation(
        settings,
        qa_path=args.qa,
        alias=args.alias,
        limit=args.limit,
        out_dir=args.out,
        store=not args.no_store,
        arms=args.arms,
        on_progress=(lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else None,
    )
    if args.json:
        print_json(report.to_dict())
        return 0
    print(format_table(report))
    print()
    print(report.recommendation.replace("**", ""))
    print(
        f"\nreport: {Path(report.out_dir or '') / 'report.md'}" + (f" (run {report.run_id})" if report.run_id else "")
    )
    return 0

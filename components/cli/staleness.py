"""`tandem staleness check`: ask each champion about the documents changed since it was trained."""

from __future__ import annotations

import argparse

from components.cli._output import add_json_flag, print_json, table
from components.settings import get_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("staleness", help="check champions against documents changed since their training")
    sub = p.add_subparsers(dest="staleness_command", metavar="ACTION", required=True)
    check = sub.add_parser(
        "check",
        help="ask the questions about changed documents through the hybrid, adapter and base+RAG arms",
        description="For the champion of each alias (or --alias), finds the documents changed since it was trained, "
        "asks the questions about them through the gateway and flags the champion when its hybrid answers score "
        "below base + retrieval. With TANDEM_AUTO_ROLLBACK=true a flagged champion is rolled back.",
    )
    check.add_argument("--alias", help="only this alias (default: every alias with a champion)")
    add_json_flag(check)
    check.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    from components.evaluation.staleness import check_all

    checks = check_all(get_settings(), args.alias, trigger="cli")
    if args.json:
        print_json([c.to_dict() for c in checks])
        return 0
    if not checks:
        print("no champion to check")
        return 0
    rows = [
        [
            c.alias,
            f"v{c.adapter_version}",
            len(c.changed_documents),
            c.questions,
            *(("" if c.scores.get(arm) is None else f"{c.scores[arm]:.2f}") for arm in ("adapter_rag", "base_rag")),
            "STALE" if c.stale else "ok",
            f"v{c.rolled_back_to}" if c.rolled_back_to else "",
        ]
        for c in checks
    ]
    print(table(rows, ["alias", "champion", "changed_docs", "questions", "hybrid", "base_rag", "verdict", "rolled_to"]))
    for c in checks:
        print(f"{c.alias}: {c.reason}" + (" (earlier check reused)" if c.reused else ""))
        if c.rollback_error:
            print(f"{c.alias}: not rolled back: {c.rollback_error}")
    return 0

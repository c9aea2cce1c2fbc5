"""`tandem data add|list|review`: training examples per alias into the intake store, and their review.

Approved examples announce the alias's domain-data asset to Airflow (``components.airflow_api``), which starts
`retrain_adapter` for that alias; when Airflow cannot be reached the data stays stored and the scheduled poll
picks it up.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from components.cli._output import add_json_flag, print_json, table
from components.errors import ConfigError, TandemError
from components.settings import Settings, get_settings

STATUSES = ("pending", "approved", "rejected")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="add domain training examples per alias, list them, review them")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    add = sub.add_parser("add", help="validate a JSONL file and store its new examples (all or nothing)")
    add.add_argument("file", metavar="FILE", help='JSONL of {"messages": [...]} or {"question", "answer"} lines')
    add.add_argument("--alias", help="adapter alias (default: settings.default_alias)")
    add.add_argument("--approve", action="store_true", help="approve them now (you are the reviewer)")
    add_json_flag(add)
    add.set_defaults(func=cmd_add)

    ls = sub.add_parser("list", help="list stored examples")
    ls.add_argument("--alias", help="only this alias")
    ls.add_argument("--status", choices=STATUSES, help="only this status")
    ls.add_argument("--limit", type=int, default=200, help="at most this many (default 200)")
    add_json_flag(ls)
    ls.set_defaults(func=cmd_list)

    rv = sub.add_parser(
        "review", help="approve or reject pending examples by id, or one by one on a terminal (without ids)"
    )
    rv.add_argument("--alias", help="only this alias's pending examples (interactive review)")
    rv.add_argument("--approve", type=int, nargs="+", default=[], metavar="ID", help="approve these ids")
    rv.add_argument("--reject", type=int, nargs="+", default=[], metavar="ID", help="reject these ids")
    rv.add_argument("--note", help="why (recorded with the decision)")
    add_json_flag(rv)
    rv.set_defaults(func=cmd_review)


def _user() -> str:
    return f"cli:{getpass.getuser()}"


def _connect(settings: Settings) -> Any:
    """A connection to a schema that is current (the first command on a fresh database creates it)."""
    from components.db import connect, migrate

    migrate(settings)
    return connect(settings)


def announce(settings: Settings, alias: str, extra: dict[str, Any]) -> str | None:
    """Post the alias's domain-data asset event; a one-line warning (not an error) when that fails."""
    try:
        from components.airflow_api import announce_domain_data
    except ImportError:
        return "components.airflow_api is missing: the asset event was not sent; the scheduled poll will pick it up"
    try:
        announce_domain_data(settings, alias, extra)
    except TandemError as exc:
        return f"{exc}; the data is stored and the scheduled poll of retrain_adapter will pick it up"
    return None


def cmd_add(args: argparse.Namespace) -> int:
    from components.training.intake import add_examples

    settings = get_settings()
    alias = args.alias or settings.default_alias
    with _connect(settings) as conn:
        report = add_examples(conn, settings, alias, args.file, submitted_by=_user(), approve=args.approve)
    out = report.to_dict()
    warning = None
    if report.added and args.approve:
        warning = announce(settings, alias, {"source": "tandem data add", "approved": len(report.added)})
        out["announced"] = warning is None
    if args.json:
        print_json({**out, "warning": warning})
    else:
        print(f"{alias}: {len(report.added)} examples added ({report.status}), {len(report.skipped)} skipped")
        for line in report.skipped[:10]:
            print(f"  skipped {line}")
        if report.added and not args.approve:
            print("they train once approved: `tandem data review` (or the review_domain_data DAG in Airflow)")
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from components.training.intake import list_examples

    with _connect(get_settings()) as conn:
        rows = list_examples(conn, args.alias, args.status, args.limit)
    if args.json:
        print_json([r.to_dict() for r in rows])
        return 0
    body = [
        (r.id, r.alias, r.status, r.question[:50], r.origin[-40:], r.reviewed_by or "", r.created_at.strftime("%F %R"))
        for r in rows
    ]
    header = ["id", "alias", "status", "question", "origin", "reviewed_by", "created"]
    print(table(body, header) if body else "no examples: add some with `tandem data add --alias A FILE`")
    return 0


def _interactive(settings: Settings, alias: str | None) -> list[dict[str, Any]]:
    """One prompt per pending example; each decision is stored as it is made."""
    from components.training.intake import describe, pending, review

    reports = []
    with _connect(settings) as conn:
        todo = pending(conn, alias)
        if not todo:
            print("nothing pending")
        for n, ex in enumerate(todo, 1):
            print(f"\n--- {n}/{len(todo)}\n{describe(ex).replace('**', '')}")
            answer = ""
            while answer not in ("a", "r", "s", "q"):
                answer = input("[a]pprove, [r]eject, [s]kip, [q]uit? ").strip().lower()[:1]
            if answer == "q":
                break
            if answer == "s":
                continue
            note = input("note (optional): ").strip() or None
            decision = "approve" if answer == "a" else "reject"
            reports.append(review(conn, [ex.id], decision, _user(), note).to_dict())
    return reports


def cmd_review(args: argparse.Namespace) -> int:
    from components.training.intake import review

    settings = get_settings()
    if set(args.approve) & set(args.reject):
        raise ConfigError(f"ids both approved and rejected: {sorted(set(args.approve) & set(args.reject))}")
    if args.approve or args.reject:
        reports = []
        with _connect(settings) as conn:
            for decision, ids in (("approve", args.approve), ("reject", args.reject)):
                if ids:
                    reports.append(review(conn, ids, decision, _user(), args.note).to_dict())
    elif sys.stdin.isatty() and not args.json:
        reports = _interactive(settings, args.alias)
    else:
        raise ConfigError("expected --approve ID ... or --reject ID ..., or a terminal to review one by one")
    approved: dict[str, list[int]] = {}
    for r in reports:
        if r["decision"] == "approve":
            for alias, ids in r["changed"].items():
                approved.setdefault(alias, []).extend(ids)
    announced, warnings = [], []
    for alias, ids in sorted(approved.items()):
        warning = announce(settings, alias, {"source": "tandem data review", "approved": len(ids)})
        announced += [] if warning else [alias]
        warnings += [warning] if warning else []
    if args.json:
        print_json({"reviews": reports, "announced": announced, "warnings": warnings})
    else:
        for r in reports:
            done = sum(len(ids) for ids in r["changed"].values())
            skipped = f"; {len(r['skipped'])} skipped" if r["skipped"] else ""
            print(f"{r['decision'].rstrip('e')}ed {done} examples{skipped}")
            for line in r["skipped"][:10]:
                print(f"  skipped {line}")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0

"""`tandem train`, `tandem adapters`, `tandem promote`, `tandem rollback`: the fine-tuning half from a terminal."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from components.cli._output import add_json_flag, print_json, table
from components.settings import get_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a LoRA adapter on new domain data, gate it and promote it")
    p.add_argument("--alias", help="adapter alias (default: settings.default_alias)")
    p.add_argument("--data", help="JSONL file, folder or fsspec URL (default: the alias's domain data)")
    p.add_argument("--force", action="store_true", help="train even without enough new examples")
    p.add_argument("--max-steps", type=int, help="cap the optimizer steps (default: settings.train_max_steps)")
    p.add_argument("--sweep-lr", type=float, nargs="+", metavar="LR", help="train once per learning rate")
    p.add_argument("--sweep-rank", type=int, nargs="+", metavar="R", help="train once per LoRA rank")
    p.add_argument(
        "--new-heldout",
        action="store_true",
        help="admin: replace the gate's held-out set with a new version drawn from the test split of --data "
        "(recorded with your user name; otherwise the set fixed at the alias's first training is asked)",
    )
    add_json_flag(p)
    p.set_defaults(func=cmd_train)

    a = subparsers.add_parser("adapters", help="list adapter versions in the registry with status and scores")
    a.add_argument("--alias", help="only this alias")
    add_json_flag(a)
    a.set_defaults(func=cmd_adapters)

    pr = subparsers.add_parser("promote", help="make an adapter version its alias's champion (hot-swapped)")
    pr.add_argument("alias")
    pr.add_argument("version", type=int)
    pr.add_argument(
        "--force", action="store_true", help="promote a version the evaluation gate rejected (recorded as an override)"
    )
    add_json_flag(pr)
    pr.set_defaults(func=cmd_promote)

    rb = subparsers.add_parser("rollback", help="return an alias to its previous champion")
    rb.add_argument("alias")
    add_json_flag(rb)
    rb.set_defaults(func=cmd_rollback)


def _progress_printer() -> Any:
    def show(event: dict[str, Any]) -> None:
        if "message" in event:
            print(event["message"], file=sys.stderr, flush=True)
            return
        where = f"step {event['step']}/{event['max_steps']}  epoch {event['epoch']:.2f}"
        if event.get("eval_loss") is not None:
            print(f"{where}  val_loss {event['eval_loss']:.4f}", file=sys.stderr, flush=True)
        else:
            print(f"{where}  loss {event['loss']:.4f}", file=sys.stderr, flush=True)

    return show


def cmd_train(args: argparse.Namespace) -> int:
    import getpass

    from components.training.pipeline import retrain, sweep_points

    settings = get_settings()
    alias = args.alias or settings.default_alias
    sweep = sweep_points(args.sweep_lr, args.sweep_rank)
    if args.max_steps is not None:
        sweep = [{**point, "max_steps": args.max_steps} for point in sweep]
    # one plain line per step, also into logs (make demo, CI): a silent 10-minute CPU run looks hung
    progress = None if args.json else _progress_printer()
    if not args.json:
        print(f"checking new data for {alias}...", file=sys.stderr, flush=True)
    new_heldout_by = getpass.getuser() if args.new_heldout else None
    result = retrain(settings, alias, args.data, args.force, sweep, progress, new_heldout_by)
    if args.json:
        print_json(result.to_dict())
        return 0
    check = result.check
    print(
        f"data: {check.examples} examples ({check.new_examples} new, {check.duplicates} duplicates, "
        f"{check.bad_lines} bad lines), dataset {check.dataset_version}"
    )
    for problem in check.problems[:5]:
        print(f"  skipped {problem}")
    if not result.trained or result.training is None or result.candidate is None or result.gate is None:
        print(f"nothing to do: {check.reason} (use --force to train anyway)")
        return 0
    trained, run = result.training, result.training.run
    print(
        f"trained {result.candidate.served_name}: {run.global_step} steps, val_loss {run.best_val_loss}, "
        f"{run.tokens_per_s} tokens/s on {run.device}"
    )
    rendering = trained.rendering
    if rendering.get("with_sources"):
        index = rendering.get("index") or {}
        print(
            f"trained on the prompts it will serve: {rendering['summary']} from index generation "
            f"{index.get('generation')} ({index.get('chunks')} chunks, last ingest {index.get('last_ingest_at')})"
        )
        for problem in rendering.get("left_out", [])[:5]:
            print(f"  left out {problem}")
    if trained.contaminated:
        print(f"dropped {len(trained.contaminated)} training examples the gate asks:")
        for problem in trained.contaminated[:5]:
            print(f"  {problem}")
    gate = result.gate
    held = gate.heldout
    print(
        f"gate vs {gate.baseline_model} ({gate.seconds:.0f} s), held-out set v{held.get('version')} "
        f"({held.get('size')} questions):"
    )
    for c in gate.comparisons:
        print(
            f"  {c['name']:<16} {c['candidate']:.3f} vs {c['baseline']:.3f} on {c['n']:>3}  "
            f"diff {c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]  p={c['p']:.3g}  ({c['against']})"
        )
    for note in gate.notes:
        print(f"  note: {note}")
    decision = result.decision
    reason = decision.reason.split("; ")[0] if decision else ""
    if decision is not None and decision.promotion is not None:
        print(f"promoted {decision.promotion.served_name} via {decision.promotion.via}: {reason}")
    else:
        print(f"rejected: {reason}")
        for name, lost in gate.regressions.items():
            for q in lost[:3]:
                expected, got = q["reference"][:40], q["candidate"][:80]
                print(f"  lost on {name}: {q['question'][:80]!r} expected {expected!r}, got {got!r}")
        print(f"override by hand only with: tandem promote {alias} {result.candidate.version} --force")
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    from components import registry
    from components.db import connect
    from components.evaluation.staleness import champion_staleness

    with connect(get_settings()) as conn:
        versions = registry.list_versions(conn, args.alias)
        checks = {(a, v): c for a, v, c in champion_staleness(conn) if c is not None}
    if args.json:
        print_json(
            [
                {**v.__dict__, "served_name": v.served_name, "staleness": _staleness(checks.get((v.alias, v.version)))}
                for v in versions
            ]
        )
        return 0
    rows = []
    for v in versions:
        gate = v.metrics.get("gate", {}).get("candidate", {})
        val = v.metrics.get("training", {}).get("best_val_loss")
        rows.append(
            [
                v.alias,
                v.version,
                v.status,
                v.lora_rank,
                v.dataset_version[:10],
                v.dataset_size,
                f"{val:.3f}" if isinstance(val, int | float) else "",
                gate.get("main", ""),
                v.created_at.strftime("%Y-%m-%d %H:%M"),
                v.promoted_by or "",
                (v.reason or "")[:60],
            ]
        )
    header = ["alias", "version", "status", "rank", "dataset", "size", "val_loss", "main", "created"]
    header += ["promoted_by", "reason"]
    print(table(rows, header) if rows else "no adapters yet: run `tandem train`")
    for (alias, version), check in sorted(checks.items()):
        if check.stale and (args.alias is None or alias == args.alias):
            when = f"check {check.check_id}, {check.checked_at:%Y-%m-%d %H:%M}"
            print(f"stale champion: {alias} v{version} ({check.reason}; {when})")
    return 0


def _staleness(check: Any) -> dict[str, Any] | None:
    """The latest staleness check of a champion, for `tandem adapters --json` (None: never checked, or no champion)."""
    if check is None:
        return None
    return {"stale": check.stale, "reason": check.reason, "check_id": check.check_id, "checked_at": check.checked_at}


def cmd_promote(args: argparse.Namespace) -> int:
    import getpass

    from components.training.promotion import promote

    reason = f"promoted by hand by {getpass.getuser()}"
    result = promote(get_settings(), args.alias, args.version, reason=reason, force=args.force)
    print_json(result.to_dict()) if args.json else print(f"{result.served_name} is champion ({result.note})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from components.training.promotion import rollback

    result = rollback(get_settings(), args.alias)
    print_json(result.to_dict()) if args.json else print(f"rolled back to {result.served_name} ({result.note})")
    return 0

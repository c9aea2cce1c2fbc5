"""`tandem bench gate`: the gate's answering time with every answer asked of vLLM (the gate before the answer
cache, its peer) against a retrain's gate, where the baseline's answers come from the cache and only the
candidate is asked.

Both runs ask an adapter version of the alias (its champion unless ``--version``) and the base model the gate's
real question sets for that alias, through the running vLLM. The candidate is asked afresh in both runs (its
cache entries are kept under a name of the bench's own, removed afterwards), so the second run is a retrain's
gate: a new candidate, an unchanged baseline. That the candidate's two fresh answer sheets agree is reported too:
it is what makes reusing a temperature-0 answer sound. Writes bench/results/gate.json (``--out``). Needs Postgres
and vLLM up (`tandem up --only postgres,vllm`) and an alias with an adapter version.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.cli._output import add_json_flag, print_json
from components.errors import ConfigError
from components.settings import get_settings

RESULTS = Path("bench/results/gate.json")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("gate", help="the gate's time with and without its answer cache")
    p.add_argument("--alias", default="harbour", help="alias whose adapter and question sets to use (default harbour)")
    p.add_argument("--version", type=int, help="adapter version to ask (default: the alias's champion)")
    p.add_argument("--questions", type=int, help="questions per gate set (default: settings.gate_max_questions)")
    p.add_argument("--out", default=str(RESULTS), help=f"where to write the figures (default {RESULTS})")
    add_json_flag(p)
    p.set_defaults(func=cmd_bench_gate)


def _uncached(settings: Any) -> Any:
    """The peer's cache: looks nothing up (every answer is asked), but stores what it got, as a first gate does."""
    from components.training.answer_cache import AnswerCache

    class Uncached(AnswerCache):
        def get(self, keys: Sequence[str]) -> dict[str, str]:
            return {}

    return Uncached(settings)


def cmd_bench_gate(args: argparse.Namespace) -> int:
    from components import registry
    from components.db import connect
    from components.models import base_model_path
    from components.training import artifacts
    from components.training.answer_cache import AnswerCache, model_identity
    from components.training.gate import answer_all
    from components.training.pipeline import gate_question_sets
    from components.training.vllm_client import VllmClient

    settings = get_settings()
    if args.questions:
        settings = settings.model_copy(update={"gate_max_questions": args.questions})
    say = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    with connect(settings) as conn:
        version = (
            registry.get_version(conn, args.alias, args.version)
            if args.version
            else registry.get_champion(conn, args.alias)
        )
        if version is None:
            raise ConfigError(f"alias {args.alias!r} has no champion: name an adapter version with --version")
        _, sets, _ = gate_question_sets(conn, settings, args.alias)
        since = registry.db_now(conn)
    counts = {name: len(qs) for name, qs in sets.items()}
    cand_dir = artifacts.local_path(settings, version.artifact_uri)
    base = settings.served_model_name
    base_id = model_identity(settings, base, base_model_path(settings))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    cache = AnswerCache(settings)
    runs: dict[str, Any] = {}
    sheets: list[dict[str, list[str]]] = []
    with VllmClient.for_settings(settings) as client:
        client.load_adapter(version.served_name, cand_dir)
        for label, baseline_cache in (("every_answer_asked", _uncached(settings)), ("baseline_from_cache", cache)):
            say(f"{label}: {sum(counts.values())} questions x 2 models...")
            cand_id = model_identity(settings, version.served_name, cand_dir) + f"#bench-{stamp}-{label}"
            found_before = cache.found
            started = time.monotonic()
            sheets.append(answer_all(client, version.served_name, sets, settings, _uncached(settings), cand_id))
            answer_all(client, base, sets, settings, baseline_cache, base_id)
            seconds = time.monotonic() - started
            reused = cache.found - found_before
            runs[label] = {"seconds": round(seconds, 1), "asked": 2 * sum(counts.values()) - reused, "reused": reused}
    with connect(settings, vector=False) as conn:  # the bench's own candidate entries
        conn.execute("DELETE FROM gate_answers WHERE model = %s AND created_at >= %s", (version.served_name, since))
    same = sum(a == b for name in sets for a, b in zip(sheets[0][name], sheets[1][name], strict=True))
    result = {
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "alias": args.alias,
        "adapter": version.served_name,
        "questions": counts,
        "runs": runs,
        "speedup": round(runs["every_answer_asked"]["seconds"] / max(runs["baseline_from_cache"]["seconds"], 0.1), 2),
        "candidate_reasked_identical": f"{same}/{sum(counts.values())}",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print_json(result)
    else:
        for label, run in runs.items():
            print(f"{label}: {run['seconds']} s ({run['asked']} asked of vLLM, {run['reused']} from the cache)")
        print(
            f"speed-up {result['speedup']}x; the candidate asked twice gave the same answer "
            f"{result['candidate_reasked_identical']}"
        )
        print(f"written to {out}")
    return 0

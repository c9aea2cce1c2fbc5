"""`tandem demo`: the main job end to end on the embedded defaults, one step after another.

Each step is the same command a user would type (`tandem ingest`, `tandem ask`, `tandem train`, `tandem eval`),
run in this process, so the demo shows exactly what the CLI does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import httpx

from components.cli._output import table
from components.errors import ServiceError
from components.settings import Settings, get_settings
from components.stack import manager
from components.vllm_client import first_vllm_url

DEMO_QUESTION = "What is the capital of France? Answer in one word."
DOMAIN_QUESTION = "What does BSR stand for at the harbour, and when is one required?"
# One pass over the sample's rendered examples (8 per step). The demo trains LoRA in the last 10 decoder layers
# only, 1.6 times the tokens per second of all layers on a CPU (see docs/training.md), and evaluates with 8 requests in
# flight; `tandem train` and `tandem eval` keep the settings' defaults. An environment variable that is set wins.
DEMO_TRAIN_STEPS = 22
DEMO_ENV = {"TANDEM_LORA_LAYERS": "10", "TANDEM_EVAL_CONCURRENCY": "8"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the whole job end to end on the embedded defaults")
    p.add_argument("--question", default=DEMO_QUESTION, help="the question asked of the base model")
    p.add_argument("--domain-question", default=DOMAIN_QUESTION, help="the question asked through the gateway")
    p.add_argument(
        "--train-steps",
        type=int,
        default=DEMO_TRAIN_STEPS,
        help=f"optimizer steps for the demo's adapter (default {DEMO_TRAIN_STEPS}; 0: skip training)",
    )
    p.add_argument("--gate-questions", type=int, help="cap the questions per gate set (default: the full sets)")
    p.add_argument("--eval-limit", type=int, help="held-out questions for the final table (default: all; 0: skip)")
    p.add_argument("--down", action="store_true", help="stop the stack when the demo ends")
    p.set_defaults(func=cmd_demo)


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def ask_base_model(settings: Settings, question: str, max_tokens: int = 32) -> str:
    """One chat completion from the base model, straight from vLLM (with its key)."""
    from components.keys import bearer, vllm_secret

    resp = httpx.post(
        first_vllm_url(settings) + "/v1/chat/completions",
        json={
            "model": settings.served_model_name,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
        headers=bearer(vllm_secret(settings)),
        timeout=120,
    )
    resp.raise_for_status()
    return str(resp.json()["choices"][0]["message"]["content"]).strip()


def _run(argv: list[str]) -> None:
    """Run one `tandem` command in this process; stop the demo if it fails."""
    from components.cli import main

    print(f"$ tandem {' '.join(argv)}", flush=True)
    code = main(argv)
    if code:
        raise ServiceError(f"demo step `tandem {' '.join(argv)}` failed with exit code {code}")


def cmd_demo(args: argparse.Namespace) -> int:
    settings = get_settings()
    started = time.monotonic()
    try:
        _step("1. bring the stack up (Postgres + pgvector, vLLM, gateway, GPU exporter, Airflow, Prometheus)")
        manager.up(settings, on_event=lambda name, msg: print(f"{name:<13} {msg}", flush=True))

        _step("2. status")
        items = manager.status(settings)
        print(table([(i.name, i.state, i.url) for i in items], ["component", "state", "url"]))

        _step(f"3. ask the base model through vLLM: {args.question}")
        t0 = time.monotonic()
        answer = ask_base_model(settings, args.question)
        print(f"{settings.served_model_name}: {answer}   ({time.monotonic() - t0:.1f} s)")

        _step("4. ingest the sample knowledge base into pgvector (same code as the ingest_documents DAG)")
        _run(["ingest", settings.docs_source])

        _step("5. ask the base model with retrieval, through the gateway")
        _run(["ask", args.domain_question, "--model", settings.served_model_name])

        demo_env = dict(DEMO_ENV)
        if args.gate_questions:
            demo_env["TANDEM_GATE_MAX_QUESTIONS"] = str(args.gate_questions)
        for name, value in demo_env.items():
            os.environ.setdefault(name, value)
        get_settings.cache_clear()
        if args.train_steps > 0:
            _step(
                f"6. train a LoRA adapter for '{settings.default_alias}' on the prompts it will serve (retrieved "
                "sources, cited answers), gate it against the champion on paired questions, promote it"
            )
            _run(["train", "--alias", settings.default_alias, "--max-steps", str(args.train_steps)])
            _run(["adapters", "--alias", settings.default_alias])

            _step(f"7. ask the '{settings.default_alias}' alias (adapter + retrieval)")
            _run(["ask", args.domain_question, "--model", settings.default_alias])

        if args.eval_limit is None or args.eval_limit > 0:
            limit = ["--limit", str(args.eval_limit)] if args.eval_limit else []
            _step(f"8. RAG vs fine-tune vs hybrid on {args.eval_limit or 'all the'} held-out questions")
            _run(["eval", "--alias", settings.default_alias, *limit])
    finally:
        if args.down:
            manager.down(settings)
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s", file=sys.stderr)
    if not args.down:
        print("the stack is still up: `tandem status`, `tandem down` to stop it", file=sys.stderr)
    return 0

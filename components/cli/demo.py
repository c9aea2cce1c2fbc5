"""`tandem demo`: the main job end to end on the embedded defaults, step by step."""

from __future__ import annotations

import argparse
import sys
import time

import httpx

from components.cli._output import table
from components.settings import Settings, get_settings
from components.stack import manager

DEMO_QUESTION = "What is the capital of France? Answer in one word."


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the whole job end to end on the embedded defaults")
    p.add_argument("--question", default=DEMO_QUESTION, help="the question asked of the base model")
    p.add_argument("--down", action="store_true", help="stop the stack when the demo ends")
    p.set_defaults(func=cmd_demo)


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def ask_base_model(settings: Settings, question: str, max_tokens: int = 32) -> str:
    """One chat completion from the base model, straight from vLLM."""
    resp = httpx.post(
        settings.vllm_endpoints[0] + "/v1/chat/completions",
        json={
            "model": settings.served_model_name,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
        timeout=120,
    )
    resp.raise_for_status()
    return str(resp.json()["choices"][0]["message"]["content"]).strip()


def cmd_demo(args: argparse.Namespace) -> int:
    settings = get_settings()
    started = time.monotonic()

    _step("1. bring the stack up")
    manager.up(settings, on_event=lambda name, msg: print(f"{name:<13} {msg}", flush=True))

    _step("2. status")
    items = manager.status(settings)
    print(table([(i.name, i.state, i.url) for i in items], ["component", "state", "url"]))

    _step(f"3. ask the base model through vLLM: {args.question}")
    t0 = time.monotonic()
    answer = ask_base_model(settings, args.question)
    print(f"{settings.served_model_name}: {answer}   ({time.monotonic() - t0:.1f} s)")

    print(f"\ndemo finished in {time.monotonic() - started:.0f} s", file=sys.stderr)
    if args.down:
        manager.down(settings)
    return 0

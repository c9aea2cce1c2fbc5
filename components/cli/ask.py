"""`tandem ask "QUESTION"`: one question through the gateway (the official openai client), with its sources."""

from __future__ import annotations

import argparse
from typing import Any

from components.cli._output import add_json_flag, print_json
from components.errors import ConfigError, ServiceError
from components.keys import client_secret
from components.settings import get_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ask", help="ask a question through the gateway; the answer cites its sources")
    p.add_argument("question", help="the question")
    p.add_argument("--model", default=None, help="an alias or the base model (default: TANDEM_DEFAULT_ALIAS)")
    p.add_argument("--no-rag", action="store_true", help="answer without retrieval")
    p.add_argument("--top-k", type=int, default=None, help="chunks to retrieve")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="longest answer, in tokens (default: the gateway's, 96 for an answer from sources)",
    )
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    add_json_flag(p)
    p.set_defaults(func=run)


def _client() -> Any:
    import openai

    settings = get_settings()
    # the openai client needs some string; with no key the gateway answers a one-line 403 that says what to set
    key = client_secret(settings) or "no-key-configured"
    return openai.OpenAI(base_url=settings.gateway_url + "/v1", api_key=key, max_retries=0, timeout=600)


def ask(
    question: str,
    model: str | None = None,
    rag: bool = True,
    top_k: int | None = None,
    max_tokens: int | None = None,
    stream: bool = False,
    echo: bool = False,
) -> dict[str, Any]:
    """Ask through the gateway; returns {answer, citations, attributions, tandem, usage}. ``echo`` prints text as
    it streams."""
    import openai

    settings = get_settings()
    body: dict[str, Any] = {"rag": rag}
    if top_k:
        body["top_k"] = top_k
    kwargs: dict[str, Any] = {
        "model": model or settings.default_alias,
        "messages": [{"role": "user", "content": question}],
        "extra_body": body,
    }
    if max_tokens is not None:  # unset: the gateway's measured default for grounded answers applies
        kwargs["max_tokens"] = max_tokens
    try:
        if not stream:
            raw = _client().chat.completions.with_raw_response.create(**kwargs)
            data = raw.parse().model_dump()
            return {
                "answer": data["choices"][0]["message"]["content"],
                "citations": data.get("citations", []),
                "attributions": data.get("attributions", []),
                "tandem": data.get("tandem", {}),
                "usage": data.get("usage"),
                "fallback_header": raw.headers.get("x-tandem-fallback"),
            }
        parts: list[str] = []
        final: dict[str, Any] = {}
        for chunk in _client().chat.completions.create(stream=True, **kwargs):
            event = chunk.model_dump()
            if event.get("object") == "tandem.citations":
                final = event
                continue
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") or ""
                parts.append(text)
                if echo:
                    print(text, end="", flush=True)
        if echo:
            print()
        return {
            "answer": "".join(parts),
            "citations": final.get("citations", []),
            "attributions": final.get("attributions", []),
            "tandem": final.get("tandem", {}),
        }
    except openai.APIConnectionError as exc:
        raise ServiceError(f"the gateway at {settings.gateway_url} is not reachable; run `tandem up`") from exc
    except openai.APIStatusError as exc:
        try:
            message = exc.response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.response.text[:200]
        raise ConfigError(f"the gateway refused the question ({exc.status_code}): {message}") from exc


def run(args: argparse.Namespace) -> int:
    result = ask(
        args.question,
        model=args.model,
        rag=not args.no_rag,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        stream=args.stream and not args.json,
        echo=args.stream and not args.json,
    )
    if args.json:
        print_json(result)
        return 0
    if not args.stream:
        print(result["answer"].strip())
    tandem = result.get("tandem") or {}
    served = tandem.get("served_model", "?")
    note = " (no adapter loaded for this alias: the base model answered)" if tandem.get("fallback") else ""
    print(f"\n-- {served}{note}")
    cited = {c["index"] for c in result["citations"]}
    uncited = [c for c in result.get("attributions") or [] if c["index"] not in cited]
    # The gateway writes the markers of an answer that cited nothing itself: the sources that hold its words.
    by = "cited by the gateway, holds its words" if 0 in (tandem.get("gateway_cited") or []) else "cited"
    for c, how in [*((c, by) for c in result["citations"]), *((c, "holds its words, not cited") for c in uncited)]:
        heading = f" > {c['heading']}" if c.get("heading") else ""
        print(f"[{c['index']}] {c['document_path']}{heading}  ({how}; {c['source']}, score {c['score']:.3f})")
    return 0

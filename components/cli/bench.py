"""`tandem bench NAME`: side-by-side benchmarks; each lives in components/bench/NAME.py."""

from __future__ import annotations

import argparse
import importlib
import pkgutil

import components.bench


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="run a benchmark side by side with its peer and print the figures")
    sub = p.add_subparsers(dest="bench_name", metavar="NAME", required=True)
    for info in sorted(pkgutil.iter_modules(components.bench.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"components.bench.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)

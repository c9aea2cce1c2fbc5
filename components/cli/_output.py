"""Shared output helpers: `--json` for machines, short tables for people, progress bars only on a terminal."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any


def add_json_flag(parser: Any) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def table(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain left-aligned text table."""
    cells = [list(map(str, header))] + [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def show_progress(json_mode: bool) -> bool:
    """Progress bars go to stderr, and only when a person is watching."""
    return not json_mode and sys.stderr.isatty()


# The exit status of a process ended by SIGPIPE in a shell (128 + 13), as `yes | head` reports.
BROKEN_PIPE_EXIT = 141


def stdout_closed() -> int:
    """The reader of stdout went away (`tandem adapters --json | head`): end quietly, as Python's documentation
    on SIGPIPE recommends, by pointing stdout at devnull so the interpreter's last flush cannot raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return BROKEN_PIPE_EXIT

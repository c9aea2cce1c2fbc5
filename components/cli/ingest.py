"""`tandem ingest SOURCE` (sync a folder or fsspec URL into the index) and `tandem retrieve "QUERY"`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from components.cli._output import add_json_flag, print_json, show_progress, table
from components.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ingest", help="sync a folder or fsspec URL of documents into the index")
    p.add_argument("source", nargs="?", help="folder or URL (s3://..., gs://...); default TANDEM_DOCS_SOURCE")
    p.add_argument("--force", action="store_true", help="re-chunk and re-embed every document")
    p.add_argument(
        "--allow-mass-delete", action="store_true",
        help="let this run delete all, or more than TANDEM_INGEST_MAX_DELETE_SHARE, of the source's documents",
    )  # fmt: skip
    add_json_flag(p)
    p.set_defaults(func=cmd_ingest)

    p = subparsers.add_parser("retrieve", help="hybrid search (vector + full text) over the indexed documents")
    p.add_argument("query")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument(
        "--filter", action="append", default=[], metavar="KEY=VALUE",
        help="source=..., path_prefix=..., or any front-matter key (repeatable)",
    )  # fmt: skip
    add_json_flag(p)
    p.set_defaults(func=cmd_retrieve)


def cmd_ingest(args: argparse.Namespace) -> int:
    from components.db import migrate
    from components.ingest import sync_documents
    from components.settings import get_settings

    settings = get_settings()
    migrate(settings)
    bar: Any = None
    progress = None
    if show_progress(args.json):
        from tqdm import tqdm

        bar = tqdm(total=0, unit="doc", file=sys.stderr, desc="ingest")

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

    try:
        report = sync_documents(
            args.source or settings.docs_source, force=args.force, progress=progress,
            allow_mass_delete=args.allow_mass_delete,
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    data = report.to_dict()
    if args.json:
        print_json(data)
        return 1 if report.failed else 0
    rows = [(k, data[k]) for k in ("added", "updated", "unchanged", "deleted", "failed", "chunks_embedded",
                                   "chunks_reused", "seconds")]  # fmt: skip
    print(table(rows, ["", report.source]))
    for failure in report.failures:
        print(f"failed: {failure['path']}: {failure['reason']}", file=sys.stderr)
    if report.index_build_seconds:
        print(f"HNSW index built in {report.index_build_seconds:.1f} s after this first fill", file=sys.stderr)
    if report.activated:
        print(f"index now serves {report.model_id} (generation {report.generation})", file=sys.stderr)
    return 1 if report.failed else 0


def _filters(values: list[str]) -> dict[str, str] | None:
    if not values:
        return None
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--filter {item!r} must be KEY=VALUE, e.g. --filter owner='Marine Operations'")
        out[key.strip()] = value
    return out


def cmd_retrieve(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from components.db import connect
    from components.retrieval import retrieve

    if args.top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    with connect() as conn:
        results = retrieve(conn, args.query, top_k=args.top_k, filters=_filters(args.filter))
    if args.json:
        print_json([asdict(r) for r in results])
        return 0
    if not results:
        print("no matching chunks (is anything ingested? run `tandem ingest`)", file=sys.stderr)
        return 0
    print(table([(i + 1, f"{r.score:.4f}", r.document_path, r.heading) for i, r in enumerate(results)],
                ["#", "score", "path", "heading"]))  # fmt: skip
    for i, r in enumerate(results, 1):
        print(f"\n[{i}] {r.source}/{r.document_path} chars {r.char_start}-{r.char_end}\n{r.text}")
    return 0

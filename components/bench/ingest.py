"""`tandem bench ingest`: Tandem's sync vs LangChain's index() + PGVector + SQLRecordManager, in one run.

Same generated corpus, same embedding model (timed inside the model on both sides), same Postgres
database. Phases: initial ingest; re-sync with nothing changed; re-sync with 5% of documents edited and
1% deleted. Plus the model's raw throughput on the initial ingest's own chunk texts, timed just before and
just after it: the ceiling of any pipeline here.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from components.cli._output import add_json_flag, print_json, table
from components.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PEER_PYTHON = REPO / ".venv-bench" / "bin" / "python"
_WORD_TEXT = (
    "berth tide vessel pilot lock gate quay crane cargo permit harbour master control desk mooring line anchor "
    "channel buoy draught beam length arrival departure booking agent invoice fee credit storm wind alert "
    "crew safety incident report inspection diver survey dredging sediment warehouse container gantry lift "
    "shift watch officer radio channel signal light night transit approach basin slipway pier fender"
)
_WORDS = _WORD_TEXT.split()


def _paragraph(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    size = 0
    while size < chars:
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 16)))
        words.append(sentence.capitalize() + ".")
        size += len(sentence) + 2
    return " ".join(words)


def generate_corpus(root: Path, docs: int, seed: int = 7) -> None:
    """`docs` Markdown documents of two sections of ~1,000 characters each (one chunk per section)."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible corpus, not secrets
    shutil.rmtree(root, ignore_errors=True)
    for i in range(docs):
        path = root / f"area-{i % 20:02d}" / f"doc-{i:05d}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        sections = [f"## Section {s + 1}\n\n{_paragraph(rng, 900)}\n" for s in range(2)]
        path.write_text(f"---\ntitle: Document {i}\nteam: t{i % 7}\n---\n# Document {i}\n\n" + "\n".join(sections))


def mutate(root: Path, edit_pct: float, delete_pct: float, seed: int = 11) -> tuple[list[str], list[str]]:
    """Edit one sentence in edit_pct% of the documents and delete delete_pct%; returns (edited, deleted)."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible corpus, not secrets
    files = sorted(p for p in root.rglob("*.md"))
    picked = rng.sample(files, int(len(files) * (edit_pct + delete_pct) / 100))
    n_edit = int(len(files) * edit_pct / 100)
    edited, deleted = picked[:n_edit], picked[n_edit:]
    for p in edited:
        p.write_text(p.read_text().replace("## Section 2\n\n", "## Section 2\n\nRevised: new berth rules apply. ", 1))
    for p in deleted:
        p.unlink()
    return [str(p.relative_to(root)) for p in edited], [str(p.relative_to(root)) for p in deleted]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ingest", help="Tandem ingest vs LangChain index() + PGVector (incremental)")
    p.add_argument("--docs", type=int, default=2000, help="generated documents (default 2000)")
    p.add_argument("--raw-sample", type=int, default=1000, help="chunks for the raw model throughput (0 = all)")
    p.add_argument("--skip-peer", action="store_true", help="run Tandem's side only")
    p.add_argument("--peer-hnsw", action="store_true", help="also run LangChain with the same HNSW index Tandem keeps")
    p.add_argument("--out", default="bench/results/ingest.json", help="where to write the results JSON")
    add_json_flag(p)
    p.set_defaults(func=cmd_bench_ingest)


def _fresh_database(name: str) -> str:
    import psycopg

    from components.db import database_url

    base = database_url()
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name}")
    return str(psycopg.conninfo.make_conninfo(base, dbname=name))


def _sqlalchemy_url(conninfo: str) -> str:
    import psycopg

    p = psycopg.conninfo.conninfo_to_dict(conninfo)
    return (
        f"postgresql+psycopg://{p.get('user', 'postgres')}:{p.get('password', '')}@/{p['dbname']}"
        f"?host={p.get('host', 'localhost')}&port={p.get('port', 5432)}"
    )


def cmd_bench_ingest(args: argparse.Namespace) -> int:
    from components.db import connect, migrate
    from components.embedding import Embedder
    from components.ingest import sync_documents
    from components.models import embedding_model_path
    from components.settings import get_settings

    if args.docs < 10:
        raise ConfigError("--docs must be at least 10")
    if not args.skip_peer and not PEER_PYTHON.exists():
        raise ConfigError("LangChain's peer environment is missing: run `make bench-peer` (or pass --skip-peer)")
    base = get_settings()
    work = base.state_dir / "bench" / "ingest"
    v1, v2, live = work / "v1", work / "v2", work / "live"
    generate_corpus(v1, args.docs)
    shutil.rmtree(v2, ignore_errors=True)
    shutil.copytree(v1, v2)
    edited, deleted = mutate(v2, 5, 1)
    shutil.rmtree(live, ignore_errors=True)
    shutil.copytree(v1, live)

    url = _fresh_database("tandem_bench_ingest")
    # the bench's generated corpus lies under the state dir, outside the default allowed roots
    settings = base.model_copy(update={"database_url": url, "ingest_allowed_roots": [str(work)]})
    migrate(settings)
    model_path = embedding_model_path(settings)
    embedder = Embedder(model_path)
    embedder.encode(["warm up"])

    ours: list[dict[str, Any]] = []

    def run(phase: str) -> None:
        before = embedder.model_seconds
        report = sync_documents(str(live), settings=settings, embedder=embedder)
        ours.append({
            "phase": phase, "seconds": report.seconds, "chunks_embedded": report.chunks_embedded,
            "model_seconds": round(embedder.model_seconds - before, 3), "chunks_written": report.chunks_written,
            "added": report.added, "updated": report.updated, "deleted": report.deleted,
            "unchanged": report.unchanged, "index_build_seconds": report.index_build_seconds,
        })  # fmt: skip
        print(f"tandem {phase}: {ours[-1]}", file=sys.stderr, flush=True)

    # The model's raw throughput on the very texts the initial ingest embeds, timed just before and just after
    # it: this host's speed drifts by several percent from minute to minute, so one timing alone misleads.
    sample = _embed_texts(v1, settings)
    if args.raw_sample:
        sample = random.Random(3).sample(sample, min(len(sample), args.raw_sample))  # noqa: S311
    raw_rates = [_raw_rate(embedder, sample, settings.ingest_embed_batch)]
    run("initial")
    raw_rates.append(_raw_rate(embedder, sample, settings.ingest_embed_batch))
    raw_rate = sum(raw_rates) / 2
    run("unchanged")
    for rel in edited:
        shutil.copy2(v2 / rel, live / rel)
    for rel in deleted:
        (live / rel).unlink()
    run("edit5_delete1")
    with connect(settings) as conn:
        left = conn.execute(
            "SELECT count(*) FROM chunks c JOIN documents d ON d.id = c.document_id WHERE d.path = ANY(%s)",
            (deleted,),
        ).fetchone()
    results: dict[str, Any] = {
        "docs": args.docs, "edited": len(edited), "deleted": len(deleted), "model": embedder.model_id,
        "raw_model_chunks_per_s": round(raw_rate, 2), "raw_sample": len(sample),
        "raw_before_after_chunks_per_s": [round(r, 2) for r in raw_rates],
        "tandem": {"phases": ours, "deleted_chunks_left": int(left[0]) if left else 0},
    }  # fmt: skip
    if not args.skip_peer:
        cfg = {
            "url": _sqlalchemy_url(url), "model_path": model_path, "chunk_chars": 1000, "overlap_chars": 100,
            "phases": [["initial", str(v1)], ["unchanged", str(v1)], ["edit5_delete1", str(v2)]],
            "deleted": deleted,
        }  # fmt: skip
        results["langchain"] = _run_peer(cfg, work)
        if args.peer_hnsw:
            results["langchain_hnsw"] = _run_peer({**cfg, "hnsw": True, "collection": "bench_hnsw"}, work)
    results["summary"] = _summary(results)
    target = Path(args.out)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2) + "\n")
    if args.json:
        print_json(results)
    else:
        _print(results)
    return 0


def _run_peer(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    out = subprocess.run(
        [str(PEER_PYTHON), str(Path(__file__).with_name("_langchain_peer.py")), json.dumps(cfg)],
        capture_output=True, text=True, check=False, cwd=str(work),
    )  # fmt: skip
    if out.returncode != 0:
        raise ConfigError(f"LangChain peer failed: {out.stderr.strip().splitlines()[-1:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _embed_texts(folder: Path, settings: Any) -> list[str]:
    """What the model sees for every chunk of the corpus: the same loader and chunker as the sync."""
    from components.ingest.chunking import load_tokenizer
    from components.ingest.loaders import load_document
    from components.ingest.reader import chunk_document
    from components.models import embedding_model_path

    tokenizer = load_tokenizer(embedding_model_path(settings))
    texts = []
    for path in sorted(folder.rglob("*.md")):
        doc = load_document(str(path), path.read_bytes())
        chunks = chunk_document(doc, tokenizer, settings.ingest_chunk_tokens, settings.ingest_chunk_overlap)
        texts += [c.embed_text for c in chunks]
    return texts


def _raw_rate(embedder: Any, texts: list[str], batch_size: int) -> float:
    started = time.perf_counter()
    embedder.encode(texts, batch_size=batch_size)
    return len(texts) / (time.perf_counter() - started)


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    def per(side: dict[str, Any], phase: str) -> dict[str, Any]:
        p = next(x for x in side["phases"] if x["phase"] == phase)
        chunks = p.get("chunks_written", p.get("chunks_in_corpus", 0)) if phase == "initial" else p["chunks_embedded"]
        return {**p, "overhead_s": round(p["seconds"] - p["model_seconds"], 3), "chunks": chunks}

    t_init = per(r["tandem"], "initial")
    build_s = t_init.get("index_build_seconds", 0.0)
    s: dict[str, Any] = {
        "tandem_initial_chunks_per_s": round(t_init["chunks_embedded"] / t_init["seconds"], 2),
        "tandem_initial_vs_raw": round(t_init["chunks_embedded"] / t_init["seconds"] / r["raw_model_chunks_per_s"], 3),
        "tandem_overhead_ms_per_chunk": round(1000 * t_init["overhead_s"] / max(1, t_init["chunks_embedded"]), 3),
        # The first fill's one HNSW build (LangChain's PGVector keeps no ANN index at all). The writer runs it
        # while the model embeds the last documents, so it is counted outside the model only where it outlasts
        # them; a small corpus builds it after the model's last call, where all of it counts.
        "tandem_index_build_s": build_s,
        "tandem_unchanged_s": per(r["tandem"], "unchanged")["seconds"],
        "tandem_unchanged_reembedded": per(r["tandem"], "unchanged")["chunks_embedded"],
        "tandem_deleted_chunks_left": r["tandem"]["deleted_chunks_left"],
    }
    if "langchain" in r:
        l_init = per(r["langchain"], "initial")
        s |= {
            "langchain_initial_chunks_per_s": round(l_init["chunks_embedded"] / l_init["seconds"], 2),
            "langchain_overhead_ms_per_chunk": round(
                1000 * l_init["overhead_s"] / max(1, l_init["chunks_embedded"]), 3
            ),
            "langchain_unchanged_s": per(r["langchain"], "unchanged")["seconds"],
            "langchain_unchanged_reembedded": per(r["langchain"], "unchanged")["chunks_embedded"],
            "langchain_deleted_chunks_left": r["langchain"]["deleted_chunks_left"],
        }
        if "langchain_hnsw" in r:  # the same peer with an HNSW index like Tandem's: like for like
            h_init = per(r["langchain_hnsw"], "initial")
            s |= {
                "langchain_hnsw_initial_chunks_per_s": round(h_init["chunks_embedded"] / h_init["seconds"], 2),
                "langchain_hnsw_overhead_ms_per_chunk": round(
                    1000 * h_init["overhead_s"] / max(1, h_init["chunks_embedded"]), 3
                ),
            }
        s["targets"] = {
            "initial_at_least_95pct_of_raw": s["tandem_initial_vs_raw"] >= 0.95,
            "overhead_at_most_a_fifth_of_langchain": s["tandem_overhead_ms_per_chunk"]
            <= s["langchain_overhead_ms_per_chunk"] / 5,
            "unchanged_10x_faster_and_zero_reembedded": s["langchain_unchanged_s"] >= 10 * s["tandem_unchanged_s"]
            and s["tandem_unchanged_reembedded"] == 0,
            "zero_deleted_chunks_left": s["tandem_deleted_chunks_left"] == 0,
        }
        if "langchain_hnsw_overhead_ms_per_chunk" in s:
            s["targets"]["overhead_at_most_a_fifth_of_langchain_with_hnsw"] = (
                s["tandem_overhead_ms_per_chunk"] <= s["langchain_hnsw_overhead_ms_per_chunk"] / 5
            )
    return s


def _print(r: dict[str, Any]) -> None:
    rows = []
    for side in ("tandem", "langchain", "langchain_hnsw"):
        for p in r.get(side, {}).get("phases", []):
            rows.append(
                (side, p["phase"], p["seconds"], p["chunks_embedded"], round(p["seconds"] - p["model_seconds"], 2))
            )
    print(table(rows, ["side", "phase", "seconds", "chunks embedded", "outside model (s)"]))
    before, after = r.get("raw_before_after_chunks_per_s", [None, None])
    print(
        f"\nraw model throughput: {r['raw_model_chunks_per_s']} chunks/s on {r['raw_sample']} of the initial "
        f"ingest's chunks (mean of {before} before and {after} after it)"
    )
    print(json.dumps(r["summary"], indent=2))

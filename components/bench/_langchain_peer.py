"""LangChain's peer of `tandem bench ingest`: index() + langchain-postgres PGVector + SQLRecordManager.

Runs in its own virtualenv (`make bench-peer`: LangChain pins an older pgvector than Tandem), so it imports
nothing from Tandem. Usage: python _langchain_peer.py '<json config>' ; prints one JSON line of phases.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def main() -> None:
    from langchain_classic.indexes import SQLRecordManager, index
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_postgres import PGVector
    from langchain_text_splitters import RecursiveCharacterTextSplitter
    from sentence_transformers import SentenceTransformer
    from sqlalchemy import create_engine, text

    cfg: dict[str, Any] = json.loads(sys.argv[1])

    class TimedEmbeddings(Embeddings):
        """The same model as Tandem's, timed the same way (seconds inside encode)."""

        def __init__(self) -> None:
            self.model = SentenceTransformer(cfg["model_path"], device="cpu")
            self.seconds = 0.0
            self.texts = 0

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            started = time.perf_counter()
            vectors = self.model.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)
            self.seconds += time.perf_counter() - started
            self.texts += len(texts)
            return [list(map(float, v)) for v in vectors]

        def embed_query(self, text: str) -> list[float]:
            return self.embed_documents([text])[0]

    embeddings = TimedEmbeddings()
    collection = cfg.get("collection", "bench")
    store = PGVector(
        embeddings=embeddings, collection_name=collection, connection=cfg["url"], use_jsonb=True,
        pre_delete_collection=True,
    )  # fmt: skip
    records = SQLRecordManager(f"pgvector/{collection}", db_url=cfg["url"])
    records.create_schema()
    engine = create_engine(cfg["url"])
    if cfg.get("hnsw"):
        # The same index Tandem keeps (HNSW, cosine, pgvector's defaults), maintained on every insert. The table
        # is emptied first so the graph holds this run's vectors only, as Tandem's does on its first fill.
        with engine.begin() as conn:
            conn.execute(text("TRUNCATE langchain_pg_embedding"))
            conn.execute(
                text(
                    "CREATE INDEX IF NOT EXISTS bench_embedding_hnsw ON langchain_pg_embedding "
                    "USING hnsw ((embedding::vector(384)) vector_cosine_ops)"
                )
            )
    splitter = RecursiveCharacterTextSplitter(chunk_size=cfg["chunk_chars"], chunk_overlap=cfg["overlap_chars"])

    def load(root: Path) -> list[Document]:
        return [
            Document(page_content=p.read_text(), metadata={"source": str(p.relative_to(root))})
            for p in sorted(root.rglob("*.md"))
        ]

    phases = []
    for name, folder in cfg["phases"]:
        model_before, texts_before = embeddings.seconds, embeddings.texts
        started = time.perf_counter()
        chunks = splitter.split_documents(load(Path(folder)))
        result = index(chunks, records, store, cleanup="incremental", source_id_key="source", batch_size=100)
        seconds = time.perf_counter() - started
        phases.append({
            "phase": name, "seconds": round(seconds, 3), "chunks_embedded": embeddings.texts - texts_before,
            "model_seconds": round(embeddings.seconds - model_before, 3), "chunks_in_corpus": len(chunks),
            "added": result["num_added"], "deleted": result["num_deleted"], "skipped": result["num_skipped"],
        })  # fmt: skip
    with engine.connect() as conn:
        left = conn.execute(
            text("SELECT count(*) FROM langchain_pg_embedding WHERE cmetadata->>'source' = ANY(:paths)"),
            {"paths": cfg["deleted"]},
        ).scalar()
    print(json.dumps({"phases": phases, "deleted_chunks_left": int(left or 0)}))


if __name__ == "__main__":
    main()

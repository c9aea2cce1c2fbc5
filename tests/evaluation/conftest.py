"""Fixtures of the evaluation tests: a fixed report built from known answers, and the real serving stack."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from components.evaluation.results import (
    ARM_BY_KEY,
    Answer,
    EvalReport,
    IndexState,
    RetrievalScores,
    not_run_arm,
    recommend,
    summarise_arm,
)

# (correct?) per question, for 6 questions, per arm: the hybrid gets 5, RAG 3, the fine-tune 2, the base 1.
OUTCOMES = {
    "base": [True, False, False, False, False, False],
    "base_rag": [True, True, True, False, False, False],
    "adapter": [True, False, False, True, False, False],
    "adapter_rag": [True, True, True, True, True, False],
}


def make_answers(arm: str) -> list[Answer]:
    rag = ARM_BY_KEY[arm].rag
    return [
        Answer(
            qa_id=f"q{i}",
            text="yes" if ok else "no",
            correct=ok,
            latency_s=(2.0 if rag else 0.5) + 0.1 * i,
            prompt_tokens=800 if rag else 40,
            completion_tokens=10,
            cited_sources=["a.md"] if rag else [],
            source_hit=(i % 2 == 0) if rag else None,
            source_attributed=(i % 3 == 0) if rag else None,
            gateway_cited=rag and i % 3 == 0,  # the gateway's markers: it cited what the source holds
            adapter_version=3 if arm.startswith("adapter") else None,
        )
        for i, ok in enumerate(OUTCOMES[arm])
    ]


def build_report(with_adapter: bool = True) -> EvalReport:
    arms = []
    for key, arm in ARM_BY_KEY.items():
        model = "harbour" if arm.uses_adapter else "smollm2-135m"
        if arm.uses_adapter and not with_adapter:
            arms.append(not_run_arm(arm, model))
        else:
            arms.append(summarise_arm(arm, model, make_answers(key)))
    report = EvalReport(
        started_at=datetime(2026, 11, 22, 3, 0, tzinfo=UTC),
        finished_at=datetime(2026, 11, 22, 3, 5, tzinfo=UTC),
        qa_path="data/sample/qa/heldout.jsonl",
        qa_fingerprint="0123456789abcdef",
        questions=6,
        alias="harbour",
        adapter_version=3 if with_adapter else None,
        served_model="smollm2-135m",
        gateway_url="http://127.0.0.1:8000",
        max_tokens=48,
        concurrency=2,
        top_k=5,
        index=IndexState(documents=35, chunks=420, embedding_model="all-MiniLM-L6-v2:384"),
        arms=arms,
        retrieval=RetrievalScores(k=5, questions=6, recall_at_k=5 / 6, mrr=0.7, latency_p50_s=0.02),
    )
    report.recommendation = recommend(arms, "harbour")
    return report


@pytest.fixture
def fixed_report() -> EvalReport:
    return build_report()


# The real stack: vLLM (root conftest), Postgres, a few sample documents indexed, one real peft adapter as the
# champion of EVAL_ALIAS, and the gateway served in-process by uvicorn on the session's TANDEM_GATEWAY_PORT.
EVAL_ALIAS = "evaltest"
STACK_QUESTIONS = 3  # the first questions of the sample QA set; their source documents are indexed below


@pytest.fixture(scope="session")
def eval_index(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The source documents of the first sample questions, indexed by the real ingestion pipeline."""
    import shutil

    from components.evaluation.qa import load_qa
    from components.evaluation.run import resolve_qa_path
    from components.ingest.sync import sync_documents
    from components.settings import get_settings

    settings = get_settings()
    docs_root = resolve_qa_path(settings, None).parents[1] / "docs"
    folder = tmp_path_factory.mktemp("evaldocs")
    for item in load_qa(resolve_qa_path(settings, None), limit=STACK_QUESTIONS):
        (folder / item.source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(docs_root / item.source, folder / item.source)
    sync_documents(str(folder), settings=settings.model_copy(update={"ingest_allowed_roots": [str(folder)]}))
    return str(folder)


@pytest.fixture(scope="session")
def eval_adapter(base_model_dir: str, pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> int:
    """A real (untrained) peft LoRA adapter registered and made champion of EVAL_ALIAS; returns its version."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from components import registry
    from components.db import connect

    folder = tmp_path_factory.mktemp("evaladapter") / "v1"
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, torch_dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    with connect() as conn:
        version = registry.register_candidate(
            conn,
            alias=EVAL_ALIAS,
            base_model="smollm2-135m",
            dataset_version="evaltest",
            dataset_size=1,
            hyperparameters={"r": 4},
            metrics={},
            artifact_uri=str(folder),
            lora_rank=4,
        )
        registry.set_champion(conn, EVAL_ALIAS, version.version)
        conn.commit()
    return version.version


# Module scope: this gateway listens on the session's TANDEM_GATEWAY_PORT, and a session-scoped one outlived the
# evaluation tests, so later tests that start "the gateway" (the fleet, Alertmanager, the CLI's promote) found
# this one already up and talked to it instead.
@pytest.fixture(scope="module")
def eval_gateway(vllm_server: str, eval_index: str, eval_adapter: int) -> Iterator[str]:
    """The gateway (serving.app) on the session's gateway port, once the adapter is loaded into vLLM."""
    import threading
    import time

    import httpx
    import uvicorn

    from components.keys import bearer, client_secret
    from components.settings import get_settings
    from serving.app import create_app

    get_settings.cache_clear()
    settings = get_settings().model_copy(update={"reconcile_interval_s": 1.0})
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.gateway_port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="eval-gateway", daemon=True)
    thread.start()
    auth = bearer(client_secret(settings))  # the key file the session's `manager.up` wrote
    deadline = time.monotonic() + 180
    while True:  # wait for a state (adapter loaded), never assert on time
        assert thread.is_alive() and time.monotonic() < deadline, "gateway did not come up with the eval adapter"
        if server.started:
            models = httpx.get(settings.gateway_url + "/v1/models", headers=auth, timeout=10).json()["data"]
            entry = next((m for m in models if m["id"] == EVAL_ALIAS), None)
            if entry and not entry.get("tandem", {}).get("fallback", True):
                break
        time.sleep(0.5)
    try:
        yield settings.gateway_url
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """Airflow's metadata database (SQLite under the session's AIRFLOW_HOME), migrated once."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if (Path(os.environ["AIRFLOW_HOME"]) / "airflow.db").exists():
        return
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, timeout=300)

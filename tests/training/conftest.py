"""Training fixtures: tiny domain data in tmp dirs, settings for a few-step CPU training, an Airflow metadata db."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

FACTS = [
    ("What is the speed limit at Ballast Quay?", "The speed limit at Ballast Quay is 4 knots."),
    ("Who issues hot work permits?", "Hot work permits are issued by the duty harbour master."),
    ("When does the Corran lock gate open?", "The Corran lock gate opens two hours before high water."),
    ("Which channel do pilots use?", "Pilots work on VHF channel 14."),
    ("How long is berth 7?", "Berth 7 is 180 metres long."),
    ("What colour is the pilot launch?", "The pilot launch is orange with a white wheelhouse."),
    ("Where is the oil spill kit kept?", "The oil spill kit is kept in the shed at Fennick Pier."),
    ("How often are mooring lines inspected?", "Mooring lines are inspected every six months."),
    ("What is the anchorage fee per day?", "The anchorage fee is 120 pounds per day."),
    ("Who chairs the safety committee?", "The safety committee is chaired by Mara Quill."),
]


def chat_line(question: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})


def write_examples(folder: Path, pairs: list[tuple[str, str]], name: str = "examples.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join(chat_line(q, a) + "\n" for q, a in pairs))
    return path


@pytest.fixture(scope="module")
def train_env(tmp_path_factory: pytest.TempPathFactory, base_model_dir: str) -> Iterator[Path]:
    """Settings for a tiny, fast pipeline: 2 optimizer steps, 3 questions per gate set, short answers."""
    root = tmp_path_factory.mktemp("training")
    qa = root / "qa.jsonl"
    qa.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": q, "answer": a.split(" is ")[-1].rstrip(".")}) + "\n"
            for i, (q, a) in enumerate(FACTS[:3])
        )
    )
    gate = root / "gate.jsonl"  # the gate's own QA set: the same facts, asked in other words than the report's
    gate.write_text(
        "".join(
            json.dumps({"id": f"g{i}", "question": f"Please answer: {q}", "answer": a.split(" is ")[-1].rstrip(".")})
            + "\n"
            for i, (q, a) in enumerate(FACTS[:3])
        )
    )
    general = root / "general.jsonl"
    general.write_text(
        "".join(
            json.dumps({"id": f"g{i}", "question": f"What is the capital of {c}?", "answer": a}) + "\n"
            for i, (c, a) in enumerate([("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome")])
        )
    )
    env = {
        "TANDEM_QA_SET": str(qa),
        "TANDEM_GATE_QA_SET": str(gate),
        "TANDEM_GENERAL_SET": str(general),
        "TANDEM_TRAIN_MAX_STEPS": "2",
        "TANDEM_TRAIN_BATCH_SIZE": "4",
        "TANDEM_TRAIN_MAX_SEQ_LEN": "256",
        "TANDEM_LORA_R": "8",
        "TANDEM_LORA_ALPHA": "16",
        "TANDEM_MIN_NEW_EXAMPLES": "4",
        "TANDEM_GATE_MAX_QUESTIONS": "3",
        "TANDEM_GATE_MAX_TOKENS": "16",
        "TANDEM_ADAPTER_STORE": f"file://{root / 'store'}",
        # these facts are in no index: trained and gated as written (train as you serve has its own tests)
        "TANDEM_TRAIN_WITH_SOURCES": "false",
        "TANDEM_DOMAIN_DATA_ROOT": str(root / "domain"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        from components.settings import get_settings

        get_settings.cache_clear()
        yield root
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """Airflow's metadata database (SQLite under the session's AIRFLOW_HOME), migrated once; reused if made."""
    home = Path(os.environ["AIRFLOW_HOME"])
    if (home / "airflow.db").exists():
        return
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, timeout=300)

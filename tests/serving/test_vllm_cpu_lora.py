"""The grouped CPU LoRA ops give vLLM's own results for adapter tokens and no delta for base-model tokens."""

from __future__ import annotations

import pytest
import torch

from serving import vllm_cpu_lora as ours

upstream = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")


def _case(tokens: int = 12, hidden: int = 32, rank: int = 4, loras: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(tokens, hidden, generator=gen),
        "a": torch.randn(loras, 1, rank, hidden, generator=gen),
        "b": torch.randn(loras, 1, 2 * hidden, rank, generator=gen),
        "h": torch.randn(tokens, rank, generator=gen),
        "mixed": torch.tensor([0, 0, 2, 2, 2, 1, 0, 1, 2, 2, 0, 1]),
    }


@pytest.mark.parametrize("indices", ["mixed", "one"])
def test_grouped_ops_match_vllms_for_adapter_tokens(indices: str) -> None:
    c = _case()
    idx = c["mixed"] if indices == "mixed" else torch.full((12,), 2)
    want, got = torch.zeros(12, 6), torch.zeros(12, 6)
    upstream.bgmv_shrink(c["x"], c["a"], want, idx, 0.5)
    ours.bgmv_shrink(c["x"], c["a"], got, idx, 0.5)
    assert torch.allclose(want, got, atol=1e-5)
    for add in (True, False):
        want, got = torch.ones(12, 64), torch.ones(12, 64)
        upstream.bgmv_expand(c["h"], c["b"], want, idx, add)
        ours.bgmv_expand(c["h"], c["b"], got, idx, add)
        assert torch.allclose(want, got, atol=1e-5)
        want, got = torch.ones(12, 100), torch.ones(12, 100)
        upstream.bgmv_expand_slice(c["h"], c["b"], want, idx, 20, 64, add)
        ours.bgmv_expand_slice(c["h"], c["b"], got, idx, 20, 64, add)
        assert torch.allclose(want, got, atol=1e-5)


def test_prefill_ops_expand_per_sequence_indices() -> None:
    c = _case()
    seq_lens, per_seq = torch.tensor([5, 7]), torch.tensor([1, 0])
    args = (torch.tensor([0, 5]), seq_lens, per_seq, 2, 7, 12)
    want, got = torch.zeros(12, 4), torch.zeros(12, 4)
    upstream.sgmv_shrink(c["x"], c["a"], want, *args, 1.0)
    ours.sgmv_shrink(c["x"], c["a"], got, *args, 1.0)
    assert torch.allclose(want, got, atol=1e-5)
    want, got = torch.zeros(12, 64), torch.zeros(12, 64)
    upstream.sgmv_expand(c["h"], c["b"], want, *args, True)
    ours.sgmv_expand(c["h"], c["b"], got, *args, True)
    assert torch.allclose(want, got, atol=1e-5)


def test_base_model_tokens_get_no_lora_delta() -> None:
    """Id -1 marks a base-model request's tokens: vLLM's torch ops gave them the last adapter's delta."""
    c = _case()
    idx = torch.tensor([0, 0, -1, -1, 1, 1, -1, 2, 2, -1, 0, 0])
    base = idx == -1
    shrunk = torch.full((12, 4), 7.0)
    ours.bgmv_shrink(c["x"], c["a"], shrunk, idx, 1.0)
    assert torch.all(shrunk[base] == 0)
    out = torch.ones(12, 64)
    ours.bgmv_expand(c["h"], c["b"], out, idx, True)
    assert torch.all(out[base] == 1) and not torch.all(out[~base] == 1)
    leaked = torch.ones(12, 64)
    upstream.bgmv_expand(c["h"], c["b"], leaked, idx, True)
    assert not torch.all(leaked[base] == 1)  # the upstream behaviour this plugin replaces


def test_plugin_is_registered_for_vllm() -> None:
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "serving.vllm_cpu_lora:register" in names
    ours.register()
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    assert punica_cpu.sgmv_shrink is ours.sgmv_shrink and punica_cpu.bgmv_expand is ours.bgmv_expand

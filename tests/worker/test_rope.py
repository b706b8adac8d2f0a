"""Finding an attention layer's rotary table in the model (``worker/rope.py``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vllm_adakv.worker.rope import find_rope


class Rope(nn.Module):
    """The attributes of vLLM's RotaryEmbedding that ``find_rope`` reads (the table cast
    to bf16, as a model's ``.to(dtype)`` may leave it; recomputed in fp32)."""

    def __init__(self) -> None:
        super().__init__()
        self.rotary_dim, self.is_neox_style = 8, False
        self.register_buffer("cos_sin_cache", self._compute_cos_sin_cache().bfloat16())

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        angles = torch.arange(16.0)[:, None] * torch.tensor([1.0, 0.1, 0.01, 0.001])
        return torch.cat((angles.cos(), angles.sin()), -1)


def model(with_rope: bool) -> nn.Module:
    attn = nn.Module()
    attn.add_module("attn", nn.Identity())
    attn.add_module("qkv_proj", nn.Linear(2, 2))
    if with_rope:
        attn.add_module("rotary_emb", Rope())
    layer = nn.Module()
    layer.add_module("self_attn", attn)
    inner = nn.Module()
    inner.add_module("layers", nn.ModuleList([layer]))
    top = nn.Module()
    top.add_module("model", inner)
    return top


def test_the_rotary_module_beside_the_attention_layer():
    table = find_rope(model(True), "model.layers.0.self_attn.attn", torch.device("cpu"))
    assert table.rotary_dim == 8 and table.neox is False
    assert table.cos_sin.dtype == torch.float32 and table.cos_sin.shape == (16, 8)
    torch.testing.assert_close(table.cos_sin, Rope()._compute_cos_sin_cache())


def test_no_rotary_module_is_an_error_naming_the_flag():
    with pytest.raises(ValueError, match="--kv-scorer expected needs the rotary embedding.*"
                                         "has 0 modules.*use --kv-scorer window"):
        find_rope(model(False), "model.layers.0.self_attn.attn", torch.device("cpu"))

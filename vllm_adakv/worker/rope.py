"""The rotary embedding of an attention layer, for the expected scorer (``kernels.expected``).

vLLM's attention layer never sees the rotary embedding: the model's attention module
applies it before calling the layer. Here the module that owns attention layer
``X.attn`` is ``X``, and its child with vLLM's ``RotaryEmbedding`` attributes
(``cos_sin_cache``, ``rotary_dim``, ``is_neox_style``) is its rotary embedding (Llama,
Qwen2, Mistral and the like: ``X.rotary_emb``).
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_adakv.kernels.expected import RopeTable


def _is_rope(module: Any) -> bool:
    return all(hasattr(module, a) for a in ("cos_sin_cache", "rotary_dim", "is_neox_style"))


def rope_table(module: Any, device: torch.device) -> RopeTable:
    """``module``'s table in fp32 on ``device``. The model's buffer may have been cast to
    its dtype at load; the table is recomputed in fp32 where the module can
    (``_compute_cos_sin_cache``, vLLM's own method, scaled frequencies included)."""
    compute = getattr(module, "_compute_cos_sin_cache", None)
    table = compute() if callable(compute) else module.cos_sin_cache
    return RopeTable(cos_sin=table.to(device=device, dtype=torch.float32),
                     rotary_dim=int(module.rotary_dim), neox=bool(module.is_neox_style))


def find_rope(model: Any, layer_name: str, device: torch.device) -> RopeTable:
    """The table of the rotary embedding applied before attention layer ``layer_name``
    (e.g. ``model.layers.3.self_attn.attn``); ValueError if the model has none there."""
    owner_name = layer_name.rpartition(".")[0]
    owner = model.get_submodule(owner_name) if owner_name else model
    found = [m for m in owner.children() if _is_rope(m)]
    if len(found) != 1:
        raise ValueError(
            f"--kv-scorer expected needs the rotary embedding of attention layer "
            f"{layer_name!r}: {owner_name or 'the model'} has {len(found)} modules with vLLM's "
            "RotaryEmbedding attributes (one expected); use --kv-scorer window")
    return rope_table(found[0], device)

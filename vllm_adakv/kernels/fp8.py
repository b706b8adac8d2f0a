"""fp8 KV caches: how the kernels read them (no vLLM import).

vLLM stores an fp8 cache (``--kv-cache-dtype fp8``, ``fp8_e4m3``, ``fp8_e5m2``) as bytes
that its attention views as the platform's fp8 dtype (``float8_e4m3fn`` on CUDA, for
every one of those strings in its Triton backend); each element is ``fp8(x / scale)``
with one float32 scale per layer for the keys and one for the values (``layer._k_scale``,
``layer._v_scale``, one-element device tensors), and it reads ``fp8 value * scale``.

The kernels take caches viewed as ``torch.float8_e4m3fn`` or ``torch.float8_e5m2`` and
those scales as keyword arguments ``k_scale`` / ``v_scale``: one-element float32 tensors
on the caches' device, read on the device (the Triton kernels load them through a
pointer: nothing waits for the GPU); None means 1. A scale is ignored for a cache of any
other dtype, as vLLM ignores it there. Every fp8 value is exactly a bfloat16, float16 and
float32 value, so the kernels cast fp8 tiles to the queries' dtype (exact) and apply the
scalar scales to fp32 results (logits, attention outputs). Compaction moves bytes and
takes no scale. Kernels that read values refuse integer caches (vLLM's raw uint8 storage
of an fp8 cache): which fp8 format the bytes hold is the caller's to say, by the view.
"""

from __future__ import annotations

import torch

FP8_DTYPES = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})

_ONES: dict[torch.device, torch.Tensor] = {}


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether a cache of ``dtype`` is read with a dequantization scale."""
    return dtype in FP8_DTYPES


def check_readable(dtype: torch.dtype) -> None:
    """Refuse a cache whose values the kernels cannot read (integers: an fp8 cache's raw
    bytes not viewed as an fp8 dtype)."""
    if not dtype.is_floating_point:
        raise TypeError(f"cannot read a {dtype} KV cache: view an fp8 cache as "
                        "torch.float8_e4m3fn or torch.float8_e5m2")


def dequantize(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
               ) -> torch.Tensor:
    """``x`` as ``dtype``, times ``scale`` where ``x`` is fp8 (the values vLLM reads);
    other floating dtypes are only converted."""
    check_readable(x.dtype)
    out = x.to(dtype)
    if is_fp8(x.dtype) and scale is not None:
        out = out * scale.to(dtype).reshape(())
    return out


def as_bytes(cache: torch.Tensor) -> torch.Tensor:
    """An fp8 cache viewed as uint8 (same strides), for moving its bytes: torch and
    Triton copy bytes whatever the fp8 format; other caches unchanged."""
    return cache.view(torch.uint8) if is_fp8(cache.dtype) else cache


def index(cache: torch.Tensor, idx) -> torch.Tensor:
    """``cache[idx]`` (advanced indexing), through a byte view for fp8: torch's indexing
    kernels do not take fp8 on every device and version."""
    if not is_fp8(cache.dtype):
        return cache[idx]
    return as_bytes(cache)[idx].view(cache.dtype)


def scale_operand(scale: torch.Tensor | None, cache: torch.Tensor,
                  placeholder: torch.Tensor) -> torch.Tensor:
    """What a Triton kernel's scale pointer gets: for an fp8 ``cache`` its float32 scale
    (a cached one-element 1 where None); for another cache ``placeholder``, a tensor of a
    fixed dtype the kernel never reads (so one compiled variant serves every call)."""
    check_readable(cache.dtype)
    if not is_fp8(cache.dtype):
        return placeholder
    if scale is None:
        ones = _ONES.get(cache.device)
        if ones is None:
            ones = _ONES[cache.device] = torch.ones(1, dtype=torch.float32,
                                                    device=cache.device)
        return ones
    if scale.numel() != 1:
        raise ValueError(f"a cache scale must hold one value, got shape {tuple(scale.shape)}")
    if scale.device != cache.device:
        raise ValueError(f"a cache scale must be on the cache's device ({cache.device}), "
                         f"got {scale.device}")
    return scale if scale.dtype == torch.float32 else scale.float()

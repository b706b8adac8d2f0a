"""GVote's vote at the end of prefill: torch references (the CPU path runs these).

Two steps, each with a Triton twin of the same signature (``triton_voting``):

* :func:`voter_probs_reference`: every voter's softmax over its request's prompt keys,
  read from the paged cache, for all requests of a layer at once.
* :func:`min_mass_above_reference`: per KV head and key, the smallest *mass above the
  key* over the head's voters (``c*`` of ``methods.gvote``), exact wherever the
  selection can read it (below the nucleus mass ``p`` or within the cap).

Shapes follow vLLM: ``R`` request rows, ``V`` voters per query head, ``Hq`` query heads,
``H`` KV heads, ``G = Hq / H``; caches are logical ``[num_blocks, H, block_size, D]``.
Voter axis of a KV head: index ``g * V + v`` is voter ``v`` of query head ``h * G + g``.
An fp8 key cache is read as ``value * k_scale`` (``kernels.fp8``).
"""

from __future__ import annotations

import math

import torch

from vllm_adakv.kernels.fp8 import dequantize
from vllm_adakv.kernels.scoring import gather_decode_candidates, gather_prompt_keys
from vllm_adakv.tensors import on_device


def work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def voter_probs_reference(
    voters: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    block_rows: list[int],
    prompt_lens: list[int],
    scale: float,
    *,
    k_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each voter over its request's prompt: ``[R, H, G * V, Lmax]``.

    voters: ``[R, V, Hq, D]`` queries that see every prompt key (no causal mask).
    Row ``r`` reads blocks ``block_table[block_rows[r]]`` and holds the softmax over its
    ``prompt_lens[r]`` keys, then zeros. float64 if an input is, float32 otherwise.
    k_scale: the key cache's dequantization scale if it is fp8 (None: 1).
    """
    rows, num_voters, num_q_heads, dim = voters.shape
    heads = key_cache.shape[1]
    group = num_q_heads // heads
    dtype = work_dtype(voters, key_cache)
    out = torch.zeros(rows, heads, group * num_voters, max(prompt_lens), dtype=dtype,
                      device=voters.device)
    for r, (block_row, length) in enumerate(zip(block_rows, prompt_lens, strict=True)):
        keys = dequantize(gather_prompt_keys(key_cache, block_table[block_row], length),
                          k_scale, dtype)
        out[r, :, :, :length] = voter_softmax(voters[r], keys, scale)
    return out


def voter_softmax(voters: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """``[H, G * V, L]`` softmax of voters ``[V, Hq, D]`` over dense keys ``[H, L, D]``."""
    num_voters, num_q_heads, dim = voters.shape
    heads, length, _ = keys.shape
    group = num_q_heads // heads
    dtype = work_dtype(voters, keys)
    q = voters.to(dtype).reshape(num_voters, heads, group, dim).permute(1, 2, 0, 3)
    logits = torch.einsum("hgvd,hld->hgvl", q, keys.to(dtype)) * scale
    return torch.softmax(logits, dim=-1).reshape(heads, group * num_voters, length)


def mass_above(probs: torch.Tensor) -> torch.Tensor:
    """Mass strictly above each key along the last dim (exact everywhere).

    ``c[..., k]`` = sum of ``probs[..., j]`` over the ``j`` with ``probs[..., j] > probs[..., k]``.
    """
    desc, order = probs.sort(dim=-1, descending=True, stable=True)
    csum = torch.cumsum(desc, dim=-1)
    before = torch.cat([torch.zeros_like(desc[..., :1]), csum[..., :-1]], dim=-1)
    # Tied keys all get the mass above their tie group: index of the group's first key.
    idx = torch.arange(desc.shape[-1], device=desc.device).expand_as(desc)
    new_group = torch.ones_like(desc, dtype=torch.bool)
    new_group[..., 1:] = desc[..., 1:] != desc[..., :-1]
    start = torch.where(new_group, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return torch.empty_like(probs).scatter_(-1, order, before.gather(-1, start))


def top_mass_lists(probs: torch.Tensor, m: int, top: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``m`` largest values in ascending order ``[..., m]`` and the mass
    above each rank ``[..., m + 1]`` (``before[i]`` = sum of the ``i`` largest).
    ``top``: those values in descending order, if already known."""
    if top is None and 2 * m > probs.shape[-1]:  # most of the row: a sort beats a top-k
        top = probs.sort(dim=-1, descending=True).values[..., :m]
    elif top is None:
        top = probs.topk(m, dim=-1, sorted=True).values
    before = torch.cat([torch.zeros_like(top[..., :1]), torch.cumsum(top, dim=-1)], dim=-1)
    return top.flip(-1).contiguous(), before


def mass_above_top(probs: torch.Tensor, m: int, top: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """:func:`mass_above` for every key with fewer than ``m`` keys strictly above it
    (its own row); ``inf`` for keys below each row's ``m``-th largest value. ``top``:
    each row's ``m`` largest values, descending, if already known."""
    length = probs.shape[-1]
    m = max(1, min(m, length))
    if m == length:
        return mass_above(probs)
    asc, before = top_mass_lists(probs, m, top)
    n_greater = m - torch.searchsorted(asc, probs.contiguous(), right=True)
    mass = before.gather(-1, n_greater)
    return torch.where(probs >= asc[..., :1], mass, math.inf)


def mass_above_nucleus(probs: torch.Tensor, p: float, most: int | None = None,
                       first_m: int = 64) -> torch.Tensor:
    """:func:`mass_above` wherever the GVote selection reads it; elsewhere ``inf``.

    Exact for every key with fewer than ``min(most, m_p)`` keys strictly above it, where
    ``m_p`` is the number of a row's largest values that hold mass ``p`` (so every key
    whose mass above is ``< p`` when ``most`` is ``None``); any other key gets its exact
    value or ``inf``. Uses the top ``m`` of each row only (:func:`mass_above_top`): on the
    CPU ``m`` doubles from ``first_m`` until every row's top ``m`` holds mass ``p`` or
    ``m`` reaches ``most``; on CUDA ``m = most`` at once (doubling reads a flag back from
    the device each round, which would stall the host inside the forward pass).
    """
    length = probs.shape[-1]
    bound = length if most is None else max(1, min(most, length))
    if p >= 1.0 or probs.is_cuda:
        return mass_above_top(probs, bound)
    m = min(bound, first_m)
    while m < bound:
        top = probs.topk(m, dim=-1, sorted=True).values
        if bool((top.sum(-1) >= p).all()):
            return mass_above_top(probs, m, top)
        m *= 2
    return mass_above_top(probs, bound)


def min_mass_above_reference(probs: torch.Tensor, prompt_lens: list[int], nucleus_p: float,
                             most: int) -> torch.Tensor:
    """``c*`` ``[R, H, Lmax]``: per KV head and key, the least mass above the key over the
    head's voters (``probs``: ``[R, H, N, Lmax]`` from :func:`voter_probs_reference`).

    Each voter's mass above is :func:`mass_above_nucleus` with ``most``: exact for keys
    it ranks among its top ``min(most, m_p)``, ``inf`` or exact elsewhere. That is all
    the selection with a cap of ``most`` tokens per head reads (``methods.gvote``, module
    doc); the result is never below the exact ``c*``. ``inf`` beyond each prompt.
    """
    mass = mass_above_nucleus(probs, nucleus_p, most).amin(dim=2)
    width = probs.shape[-1]
    valid = torch.arange(width, device=probs.device) < on_device(
        prompt_lens, torch.long, probs.device)[:, None, None]
    return torch.where(valid, mass, math.inf)


def decode_voter_probs_reference(voters: torch.Tensor, keys: torch.Tensor,
                                 num_candidates: torch.Tensor, window_keys: torch.Tensor,
                                 scale: float) -> torch.Tensor:
    """Attention of each voter over one decode event's keys: ``[R, H, G * V, Cmax + w]``.

    voters: ``[R, V, Hq, D]`` queries that see every key; keys: ``[R, H, Cmax, D]`` each
    head's candidates (the first ``num_candidates[r, h]`` real), then window_keys
    ``[R, H, w, D]``. Padding gets probability 0. float64 if an input is, else float32.
    """
    rows, num_voters, num_q_heads, dim = voters.shape
    heads, width = keys.shape[1], keys.shape[2]
    group = num_q_heads // heads
    dtype = work_dtype(voters, keys)
    q = voters.to(dtype).reshape(rows, num_voters, heads, group, dim).permute(0, 2, 3, 1, 4)
    every = torch.cat([keys, window_keys], dim=2).to(voters.device, dtype)
    logits = torch.einsum("rhgvd,rhld->rhgvl", q, every) * scale
    pos = torch.arange(every.shape[2], device=voters.device)
    counts = num_candidates.to(device=voters.device, dtype=torch.long)
    padding = (pos < width) & (pos >= counts[..., None])  # [R, H, Cmax + w]
    logits = logits.masked_fill(padding[:, :, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs.reshape(rows, heads, group * num_voters, every.shape[2])


def decode_voter_probs_event_reference(
    voters: torch.Tensor,
    key_cache: torch.Tensor,
    page_start: torch.Tensor,
    kept_counts: torch.Tensor,
    block_table: torch.Tensor,
    rows: torch.Tensor,
    window: int,
    width: int,
    scale: float,
    *,
    chunk_base: torch.Tensor | None = None,
    capacity: torch.Tensor | None = None,
    layer_base: int = 0,
    k_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Voter probabilities ``[R, H, G * V, width + window]`` of one decode event, read
    in place from the paged layout: ``gather_decode_candidates`` (same arguments; each
    head's candidates in columns ``[0, n)``, zeros to ``width``, then the window), then
    ``decode_voter_probs_reference``. float64 for float64 voters, fp32 otherwise.
    Raises ValueError as ``gather_decode_candidates`` (a head with more than ``width``
    candidates, a tail that does not hold the window) or on a row count mismatch."""
    if rows.shape[0] != voters.shape[0]:
        raise ValueError(f"{rows.shape[0]} rows but voters of {voters.shape[0]}")
    work = torch.float64 if voters.dtype == torch.float64 else torch.float32
    keys, counts, wkeys = gather_decode_candidates(
        key_cache, page_start, kept_counts, block_table, rows, window, width,
        chunk_base=chunk_base, capacity=capacity, layer_base=layer_base, k_scale=k_scale,
        dtype=work)
    return decode_voter_probs_reference(voters, keys, counts, wkeys, scale)

"""GVote (arXiv 2509.03136, the project's reading): keep what plausible future queries need.

Pure torch, no vLLM imports. One layer, one request. Notation: ``Hq`` query heads,
``Hkv`` KV heads, ``G = Hq / Hkv`` (query head ``i`` reads KV head ``i // G``), prompt
length ``L``, window ``w`` (the last ``w`` prompt positions), ``S`` synthetic queries.

Modelling choices (each one ours; the paper has no public code):

1. **Query model.** Per query head, a diagonal Gaussian fitted (maximum likelihood:
   mean and population variance) to the ``w`` observation-window queries, which are
   already RoPE-rotated at their true positions ``[L - w, L)``. We do not re-rotate:
   synthetic queries live in the same rotated space, i.e. they stand for queries at
   positions around the window. The rotation differences across the window (large in
   the high-frequency RoPE dimensions) widen the fitted variance there, which is a
   deliberate source of diversity rather than a position model.
2. **Sampling.** ``q_s = mu + sigma * eps_s``, ``eps_s ~ N(0, I)`` drawn in float32 on
   the CPU from a ``torch.Generator`` seeded with :func:`layer_seed` (``seed``, layer
   index): the same prompt and seed give the same kept set on any device, and sample
   ``s`` does not depend on ``S`` (draws are made one sample at a time), so the voters
   for ``S`` are a prefix of those for ``S + 1``. The noise is request-independent; the
   Gaussian is not. Under tensor parallelism each rank slices its heads out of the draws
   for all heads, so the kept set does not depend on the tensor-parallel size.
3. **Voters.** For each KV head: its ``G`` query heads, each with the ``S`` synthetic
   queries plus the last real prompt query (position ``L - 1``). Every voter attends to
   all ``L`` prompt keys (they are queries at or after ``L - 1``): ``softmax(q k^T * scale)``.
4. **Nucleus.** With ``c_v(k) = sum of pi_v(j) over keys j with pi_v(j) > pi_v(k)`` (the
   mass strictly above key ``k``), voter ``v``'s nucleus of mass ``p`` is
   ``{k : c_v(k) < p}``: the smallest top set whose mass reaches ``p``, with keys tied at
   the boundary all included. ``p >= 1`` keeps every key (a softmax is strictly
   positive; handled exactly instead of through rounded sums).
5. **Vote.** Keep-set of a KV head = union over its voters of the nuclei, plus the
   window. Equivalently ``{k : c*(k) < p}`` with ``c*(k) = min_v c_v(k)``.
6. **No sink tokens are forced**: a sink that carries mass is in the nuclei anyway.
   **Neighbours** (``pool_kernel`` ``k``, odd): a key counts as voted when a key within
   ``k // 2`` positions is, i.e. ``c*`` is min-pooled along positions before the
   threshold and the cap, as SnapKV max-pools its scores. Without it the vote keeps
   single tokens of a multi-token fact (measured on Qwen2.5-Coder-0.5B: 7-digit needles
   came back with digits missing); ``k = 1`` is the vote alone.
7. **Cap.** If a head's keep-set exceeds ``max_keep`` (window included), it keeps the
   window plus the ``max_keep - w`` older keys of smallest ``c*`` (ties: lower position).
   Since the union for a smaller ``p'`` is ``{c* < p'}``, this is the union for the
   largest ``p' <= p`` that fits the cap (up to ties): trimming lowers the nucleus mass
   of that head only.

Arithmetic is float64 when the inputs are float64, float32 otherwise. ``c_v`` is
exact wherever the selection reads it, and only there: below ``p`` and, with a cap of
``max_keep`` tokens, for keys with fewer than ``max_keep`` keys strictly above them (a
kept key always is: each key above it for its best voter has a smaller ``c*``, pooled or
not, and at most ``w`` of those are window keys). So each voter needs only its top
``max_keep`` probabilities, never a full sort of the prompt
(``kernels.voting.mass_above_nucleus``; on the CPU the top list also stops growing once
it holds mass ``p``). The batched path (``gvote_voters``, then the kernels
``voter_probs`` and ``min_mass_above``, then :func:`gvote_keep_masks`) serves every
request of a layer at once, reading keys from the paged cache; :func:`gvote_keep_mask`
is the same selection for one request with dense keys.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch

from vllm_adakv import kernels
from vllm_adakv.kernels.scoring import pool_rows
from vllm_adakv.kernels.voting import (
    decode_voter_probs_reference,
    mass_above,
    mass_above_nucleus,
    voter_softmax,
    work_dtype,
)
from vllm_adakv.tensors import host_to_device, on_device

from .base import DecodeRows, LayerRows, Method, check_decode_rows
from .common import check_int, head_topk_masks, topk_masks

__all__ = ["GVote", "gvote_cap", "gvote_keep_mask", "gvote_keep_masks", "gvote_voters",
           "layer_seed", "mass_above", "mass_above_nucleus", "synthetic_queries",
           "vote_scores"]

_LAYER_STRIDE = 1_000_003  # a prime larger than any layer count


def layer_seed(seed: int, layer_idx: int) -> int:
    """Generator seed of one layer: ``(seed * 1_000_003 + layer_idx) mod 2**63``."""
    seed = check_int("seed", seed, 0)
    layer_idx = check_int("layer_idx", layer_idx, 0)
    return (seed * _LAYER_STRIDE + layer_idx) % (1 << 63)


def synthetic_queries(window_queries: torch.Tensor, num_samples: int,
                      generator: torch.Generator) -> torch.Tensor:
    """``S`` draws ``[S, Hq, D]`` from the per-head diagonal Gaussian of ``[w, Hq, D]``."""
    num_samples = check_int("num_samples", num_samples, 0)
    _, heads, dim = window_queries.shape
    eps = _draw_noise(generator, num_samples, heads, dim)
    return _sample(window_queries[None], host_to_device(eps, window_queries.device))[0]


def _draw_noise(generator: torch.Generator, num_samples: int, heads: int, dim: int
                ) -> torch.Tensor:
    """``[S, heads, dim]`` standard normal float32 draws on the CPU, one sample at a time
    (so the draws for ``S`` are a prefix of those for ``S + 1``)."""
    if num_samples == 0:
        return torch.empty(0, heads, dim)
    return torch.stack([torch.randn(heads, dim, generator=generator, dtype=torch.float32)
                        for _ in range(num_samples)])


def _sample(window_queries: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``mu + sigma * eps``: ``[R, S, Hq, D]`` from windows ``[R, w, Hq, D]``."""
    dtype = work_dtype(window_queries)
    q = window_queries.to(dtype)
    mean = q.mean(1, keepdim=True)
    std = q.var(1, correction=0, keepdim=True).sqrt()
    return mean + std * eps.to(dtype)[None]


_NOISE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_NOISE_ENTRIES = 512  # a few models' layers; each entry is S x Hq x D float32


def layer_noise(seed: int, layer_idx: int, num_samples: int, heads: int, dim: int,
                device: torch.device, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """The noise ``eps`` ``[S, heads, dim]`` of one layer on ``device``: request-independent,
    so drawn (and copied to the device) once per (seed, layer, shape) and reused.

    ``shard = (rank, size)``: these ``heads`` are the query heads
    ``[rank * heads, (rank + 1) * heads)`` of ``size * heads`` (tensor parallelism); the
    draws are those of all the heads, sliced, so a head's noise does not depend on the
    tensor-parallel size."""
    rank, size = shard
    key = (seed, layer_idx, num_samples, heads, dim, str(device), rank, size)
    eps = _NOISE.get(key)
    if eps is None:
        gen = torch.Generator().manual_seed(layer_seed(seed, layer_idx))
        every_head = _draw_noise(gen, num_samples, heads * size, dim)
        eps = host_to_device(every_head[:, rank * heads : (rank + 1) * heads], device)
        _NOISE[key] = eps
        while len(_NOISE) > _NOISE_ENTRIES:
            _NOISE.popitem(last=False)
    _NOISE.move_to_end(key)
    return eps


def gvote_voters(window_queries: torch.Tensor, num_samples: int, seed: int, layer_idx: int,
                 shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Voters ``[R, S + 1, Hq, D]`` of ``R`` requests of one layer: ``S`` synthetic queries
    (choices 1-2) and the last real query. window_queries: ``[R, w, Hq, D]``; ``shard``:
    (tensor-parallel rank, size) when these ``Hq`` heads are one rank's share."""
    num_samples = check_int("num_samples", num_samples, 0)
    rank, size = check_int("tp rank", shard[0], 0), check_int("tp size", shard[1], 1)
    if rank >= size:
        raise ValueError(f"tensor-parallel rank {rank} must be < size {size}")
    rows, _, heads, dim = window_queries.shape
    eps = layer_noise(check_int("seed", seed, 0), layer_idx, num_samples, heads, dim,
                      window_queries.device, (rank, size))
    samples = _sample(window_queries, eps)
    return torch.cat([samples, window_queries[:, -1:].to(samples.dtype)], dim=1)


def vote_scores(voters: torch.Tensor, keys: torch.Tensor, scale: float,
                nucleus_p: float = 1.0, most: int | None = None) -> torch.Tensor:
    """``c*[h, k] = min`` over the voters of KV head ``h`` of the mass above key ``k``.

    Exact where ``c* < nucleus_p`` or where the key has fewer than ``most`` keys above
    it for a voter attaining ``c*`` (:func:`mass_above_nucleus`); elsewhere ``>= nucleus_p``.
    ``nucleus_p = 1`` and ``most = None`` give it exactly everywhere.

    voters: ``[V, Hq, D]`` queries; keys: ``[Hkv, L, D]``. Returns ``[Hkv, L]``.
    """
    return mass_above_nucleus(voter_softmax(voters, keys, scale), nucleus_p, most).amin(dim=1)


def gvote_keep_masks(vote: torch.Tensor, prompt_lens: list[int], *, window: int,
                     nucleus_p: float, max_keeps: list[int], pool_kernel: int = 1
                     ) -> torch.Tensor:
    """Keep masks ``[R, H, Lmax]`` (True = kept) from ``c*`` of ``R`` requests of a layer.

    vote: ``[R, H, Lmax]`` ``c*`` (``kernels.min_mass_above``; row ``r`` real in its first
    ``prompt_lens[r]`` positions). Candidates ``[0, L_r - w)`` with ``c*`` min-pooled over
    ``pool_kernel`` (choice 6) below ``nucleus_p`` are kept, trimmed to each row's
    ``max_keeps[r] - w`` smallest (choice 7); the window is always kept.
    """
    rows, heads, width = vote.shape
    device = vote.device
    candidates = [n - window for n in prompt_lens]
    if min(candidates) < 0 or any(cap < window for cap in max_keeps):
        raise ValueError(f"need prompt_len >= window and max_keep >= window ({window}); "
                         f"got {prompt_lens}, {max_keeps}")
    check_int("pool_kernel", pool_kernel, 1)
    if pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be odd, got {pool_kernel}")
    cand_width = max(candidates)
    pooled = -pool_rows(-vote[:, :, :cand_width], candidates, "max", pool_kernel)
    room = [min(c, cap - window) for c, cap in zip(candidates, max_keeps, strict=True)]
    limit = on_device(room, torch.long, device)[:, None]
    if nucleus_p >= 1.0:
        counts = limit.expand(rows, heads)
    else:
        counts = torch.minimum((pooled < nucleus_p).sum(-1), limit)
    keep = torch.zeros(rows, heads, width, dtype=torch.bool, device=device)
    # smallest pooled c*, ties: lower position; padding is never kept
    keep[:, :, :cand_width] = topk_masks(-pooled, counts, candidates, max(room))
    pos = torch.arange(width, device=device)
    lengths = on_device(prompt_lens, torch.long, device)[:, None, None]
    return keep | ((pos >= lengths - window) & (pos < lengths))


def gvote_keep_mask(window_queries: torch.Tensor, keys: torch.Tensor, *, scale: float,
                    num_samples: int, nucleus_p: float, seed: int, layer_idx: int,
                    max_keep: int | None = None, pool_kernel: int = 1) -> torch.Tensor:
    """Bool mask ``[Hkv, L]`` (True = kept) of one layer: the GVote keep-set (module doc).

    window_queries: ``[w, Hq, D]`` queries of positions ``[L - w, L)``, after RoPE.
    keys: ``[Hkv, L, D]`` prompt keys (after RoPE). ``max_keep``: per-head cap, window
    included (``None``: no cap); it must be ``>= w``. ``pool_kernel``: odd width of the
    min-pooling of ``c*`` over candidate positions (1: none; module doc, choice 6).
    """
    _check(window_queries, keys, nucleus_p)
    window = window_queries.shape[0]
    prompt_len = keys.shape[1]
    cap = prompt_len if max_keep is None else check_int("max_keep", max_keep, window)
    voters = gvote_voters(window_queries[None], num_samples, seed, layer_idx)[0]
    vote = vote_scores(voters, keys, scale, nucleus_p, most=min(cap, prompt_len))
    return gvote_keep_masks(vote[None], [prompt_len], window=window, nucleus_p=nucleus_p,
                            max_keeps=[cap], pool_kernel=pool_kernel)[0]


def _check(window_queries: torch.Tensor, keys: torch.Tensor, nucleus_p: float) -> None:
    if window_queries.dim() != 3 or keys.dim() != 3:
        raise ValueError(
            f"window_queries must be [w, Hq, D] and keys [Hkv, L, D], got "
            f"{tuple(window_queries.shape)} and {tuple(keys.shape)}"
        )
    window, num_q_heads, dim = window_queries.shape
    heads, prompt_len, key_dim = keys.shape
    if window < 1 or heads < 1 or dim != key_dim or num_q_heads % heads:
        raise ValueError(
            f"need w >= 1, equal head dims and Hq a multiple of Hkv; got window_queries "
            f"{tuple(window_queries.shape)}, keys {tuple(keys.shape)}"
        )
    if prompt_len < window:
        raise ValueError(f"prompt_len ({prompt_len}) must be >= window ({window})")
    if not (math.isfinite(nucleus_p) and 0.0 < nucleus_p <= 1.0):
        raise ValueError(f"nucleus_p must be in (0, 1], got {nucleus_p}")


def gvote_cap(cfg: Any, prompt_len: int) -> int:
    """Most tokens a GVote head may keep in any layer (window included) for this prompt.

    ``min(max_budget, floor(prompt_len / min_compression))`` over the caps that are set
    (``budget`` when none is), clamped to ``[window, prompt_len]``: the window is always
    kept, so prompts shorter than ``window * min_compression`` compress less than asked.
    """
    caps = []
    if cfg.max_budget:
        caps.append(cfg.max_budget)
    if cfg.min_compression > 1.0:
        caps.append(math.floor(prompt_len / cfg.min_compression))
    cap = min(caps) if caps else cfg.budget
    return max(cfg.window, min(prompt_len, cap))


class GVote(Method):
    """Budget-free: the union of the voters' nuclei under a per-head cap; memory is
    planned at the cap and the workers report the blocks the kept pages use."""

    name = "gvote"
    needs_window_queries = True
    measured = True
    kernels = frozenset({"voting"})

    def budget(self, cfg: Any, prompt_len: int) -> int:
        return gvote_cap(cfg, prompt_len)

    def keep_masks(self, batch: LayerRows) -> torch.Tensor:
        cfg = batch.cfg
        lengths, caps = batch.prompt_lens, batch.budgets
        voters = gvote_voters(batch.window_queries, cfg.gvote_samples, cfg.gvote_seed,
                              batch.layer_idx, batch.tp_shard)
        probs = kernels.voter_probs(voters, batch.key_cache, batch.block_table, batch.rows,
                                    lengths, batch.scale, k_scale=batch.k_scale)
        most = max(min(n, cap) for n, cap in zip(lengths, caps, strict=True))
        vote = kernels.min_mass_above(probs, lengths, cfg.gvote_p, most)
        return gvote_keep_masks(vote, lengths, window=cfg.window, nucleus_p=cfg.gvote_p,
                                max_keeps=caps, pool_kernel=cfg.pool_kernel)

    def reselect(self, event: DecodeRows) -> torch.Tensor:
        """The vote of the decode window's voters (choices 1-3: the Gaussian of the window's
        queries and its last query, same seeded noise as the prompt's) over every key a
        head holds (candidates and window), ``c*`` min-pooled along the head's candidate
        sequence, kept below ``gvote_p`` and capped at ``budget - w`` (choices 4-7)."""
        selectable = check_decode_rows(event)
        cfg = event.cfg
        check_int("pool_kernel", cfg.pool_kernel, 1)
        if cfg.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be odd, got {cfg.pool_kernel}")
        counts = event.num_candidates.to(event.keys.device).long()
        rows, heads, width = event.keys.shape[:3]
        if width == 0:
            return torch.zeros(rows, heads, 0, dtype=torch.bool, device=event.keys.device)
        voters = gvote_voters(event.window_queries, cfg.gvote_samples, cfg.gvote_seed,
                              event.layer_idx, event.tp_shard)
        probs = decode_voter_probs_reference(voters, event.keys, counts, event.window_keys,
                                             event.scale)
        most = min(max(event.budgets), probs.shape[-1])
        vote = mass_above_nucleus(probs, cfg.gvote_p, most).amin(dim=2)[..., :width]
        pooled = -pool_rows(-vote.reshape(rows * heads, 1, width),
                            counts.flatten().tolist(), "max", cfg.pool_kernel)
        pooled = pooled.view(rows, heads, width)  # +inf padding
        room = torch.minimum(counts, on_device(selectable, torch.long, counts.device)[:, None])
        if cfg.gvote_p < 1.0:
            room = torch.minimum((pooled < cfg.gvote_p).sum(-1), room)
        return head_topk_masks(-pooled, room, counts, min(max(selectable), width))

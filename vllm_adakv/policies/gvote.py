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
   Gaussian is not.
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
exact wherever it is below ``p`` (all that the vote and the cap ever compare): it comes
from a partial sort, the top ``m`` probabilities of each voter with ``m`` doubled from 64
until every voter's top ``m`` holds mass ``p`` (:func:`mass_above_nucleus`), so peaked
voters cost ``O(L log m)`` instead of a full sort (on the CPU; on CUDA a full sort, which
needs no value read back to the host). ``p >= 1`` needs the full order.
"""

from __future__ import annotations

import math

import torch

from vllm_adakv.kernels.scoring import pool_scores
from vllm_adakv.tensors import host_to_device

from .common import check_int, topk_mask

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
    dtype = _work_dtype(window_queries)
    q = window_queries.to(dtype)
    mean = q.mean(0)
    std = q.var(0, correction=0).sqrt()
    if num_samples == 0:
        return q.new_empty((0, heads, dim))
    eps = torch.stack([torch.randn(heads, dim, generator=generator, dtype=torch.float32)
                       for _ in range(num_samples)])
    return mean + std * host_to_device(eps, q.device).to(dtype)


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


def mass_above_nucleus(probs: torch.Tensor, p: float, first_m: int = 64) -> torch.Tensor:
    """:func:`mass_above` where it is ``< p``; elsewhere some value ``>= p``.

    Uses the sorted top ``m`` of each row only, ``m`` doubling until every row's top ``m``
    holds mass ``>= p``; past ``L / 2`` (flat rows, or ``p >= 1``) a full sort is cheaper.
    Sums are the same prefix sums a full sort gives. On CUDA it is the full sort: the
    doubling reads a flag back from the device each round, which would stall the host
    inside the forward pass (a sort of these rows is cheap there).
    """
    length = probs.shape[-1]
    m = min(length, first_m)
    while True:
        if p >= 1.0 or 2 * m > length or probs.is_cuda:
            return mass_above(probs)
        top = probs.topk(m, dim=-1, sorted=True).values
        csum = torch.cumsum(top, dim=-1)
        if bool((csum[..., -1] >= p).all()):
            break
        m *= 2
    before = torch.cat([torch.zeros_like(csum[..., :1]), csum], dim=-1)  # [..., m + 1]
    # keys strictly above probs[k] = m - (top values <= probs[k]); ascending search
    n_greater = m - torch.searchsorted(top.flip(-1).contiguous(), probs.contiguous(),
                                       right=True)
    return before.gather(-1, n_greater)


def vote_scores(voters: torch.Tensor, keys: torch.Tensor, scale: float,
                nucleus_p: float = 1.0) -> torch.Tensor:
    """``c*[h, k] = min`` over the voters of KV head ``h`` of the mass above key ``k``.

    Exact where ``c* < nucleus_p`` (see :func:`mass_above_nucleus`), ``>= nucleus_p``
    elsewhere; ``nucleus_p = 1`` gives it exactly everywhere.

    voters: ``[V, Hq, D]`` queries; keys: ``[Hkv, L, D]``. Returns ``[Hkv, L]``.
    """
    num_voters, num_q_heads, dim = voters.shape
    heads, prompt_len, _ = keys.shape
    group = num_q_heads // heads
    dtype = _work_dtype(voters, keys)
    q = voters.to(dtype).reshape(num_voters, heads, group, dim).permute(1, 2, 0, 3)
    logits = torch.einsum("hgvd,hld->hgvl", q, keys.to(dtype)) * scale
    probs = torch.softmax(logits, dim=-1).reshape(heads, group * num_voters, prompt_len)
    return mass_above_nucleus(probs, nucleus_p).amin(dim=1)


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
    heads, prompt_len, _ = keys.shape
    num_candidates = prompt_len - window
    if max_keep is not None:
        max_keep = check_int("max_keep", max_keep, window)
    gen = torch.Generator().manual_seed(layer_seed(seed, layer_idx))
    samples = synthetic_queries(window_queries, num_samples, gen)
    voters = torch.cat([samples, window_queries[-1:].to(samples.dtype)], dim=0)
    cand_score = min_pool(vote_scores(voters, keys, scale, nucleus_p)[:, :num_candidates],
                          pool_kernel)
    if nucleus_p >= 1.0:
        counts = torch.full((heads,), num_candidates, dtype=torch.long, device=keys.device)
    else:
        counts = (cand_score < nucleus_p).sum(dim=1)
    most = num_candidates  # a host bound on counts: topk_mask need not read counts back
    if max_keep is not None:
        counts = counts.clamp(max=max_keep - window)
        most = min(most, max_keep - window)
    cand = topk_mask(-cand_score, counts, max_count=most)  # smallest c*, ties: lower position
    window_mask = torch.ones(heads, window, dtype=torch.bool, device=keys.device)
    return torch.cat([cand, window_mask], dim=1)


def min_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """``out[h, k] = min(scores[h, j] for |j - k| <= kernel // 2)`` over ``[H, C]``."""
    kernel = check_int("pool_kernel", kernel, 1)
    if kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be odd, got {kernel}")
    if kernel == 1 or scores.shape[-1] == 0:
        return scores
    return -pool_scores(-scores, "max", kernel)


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


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

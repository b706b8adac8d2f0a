"""How many blocks a compressed request keeps: the memory model, as pure math.

A block holds ``block_size`` tokens for each of the H KV heads of a layer, as H
head-pages (head-major layout). After compression, the kept tokens of (layer l,
head h) are compacted into ceil(n[l,h] / block_size) head-pages taken, in any
slot, from the request's first ``kept_blocks`` blocks: of the layer's own tensor
when every layer fits there, else of any layer's tensor (pages pooled across
layers, ``CompressionPlan.pooled``). The block holding the first position after
the prompt (``tail_block``) and all later blocks stay in the normal layout and
receive the generated tokens. Blocks in [kept_blocks, tail_block) are released
to vLLM's block pool.

The scheduler and the workers both call :func:`plan_compression` with the same
inputs, so they agree on ``kept_blocks`` without talking to each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.methods import get_method


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class CompressionPlan:
    """Per-request outcome of the memory model (identical on scheduler and workers)."""

    prompt_len: int
    block_size: int
    num_kv_heads: int
    layer_budgets: tuple[int, ...]  # mean tokens kept per head, window included (gvote: cap)
    kept_blocks: int  # blocks [0, kept_blocks) hold the compacted head-pages
    tail_block: int  # prompt_len // block_size: first block of the uncompressed tail
    # Head-pages pooled across the compressed layers' tensors, compacted at the group's
    # last layer (budgets that differ per layer, or unknown before selection: gvote).
    # False: each layer fills its own tensor's kept blocks, compacted layer by layer.
    pooled: bool = False
    # Kept blocks follow from the kept counts (gvote): ``kept_blocks`` is the worst case
    # (every head at its cap); the worker reports the blocks it used.
    measured: bool = False

    @property
    def released_blocks(self) -> int:
        return self.tail_block - self.kept_blocks


def max_head_pages(
    num_kv_heads: int, per_head_mean: int, prompt_len: int, block_size: int, uniform: bool
) -> int:
    """Upper bound on sum_h ceil(n_h / block_size) given sum_h n_h = H * per_head_mean.

    Uniform policies keep exactly ``per_head_mean`` tokens per head. Adaptive ones
    (adakv) split the same total unevenly; each head then wastes at most
    ``block_size - 1`` slots in its last page.
    """
    if uniform:
        return num_kv_heads * cdiv(per_head_mean, block_size)
    total = num_kv_heads * per_head_mean
    bound = (total + num_kv_heads * (block_size - 1)) // block_size
    return min(bound, num_kv_heads * cdiv(prompt_len, block_size))


def pooled_blocks(total_pages: int, num_layers: int, num_kv_heads: int) -> int:
    """Fewest blocks whose head-pages in ``num_layers`` layer tensors hold ``total_pages``."""
    return max(1, cdiv(total_pages, num_layers * num_kv_heads))


def blocks_for_pages(pages: list[int], num_kv_heads: int, measured: bool,
                     pool: bool = True) -> tuple[int, bool]:
    """(blocks, pooled) holding the head-pages ``pages[l]`` of the compressed layers: each
    layer in its own tensor (``ceil(max_l pages_l / H)``) or, if ``pool``, pooled across
    them, whichever is fewer; measured methods are always pooled, at the own-tensor
    count."""
    own = max(1, cdiv(max(pages), num_kv_heads))
    pooled = pooled_blocks(sum(pages), len(pages), num_kv_heads)
    if measured:
        return own, True
    return (pooled, True) if pool and pooled < own else (own, False)


# Pure and called for every compressible row of every step: cache by its inputs.
@lru_cache(maxsize=8192)
def plan_compression(
    cfg: KVCompressionConfig,
    prompt_len: int,
    num_kv_heads: int,
    block_size: int,
    num_layers: int,
    layer_indices: tuple[int, ...] = (),
) -> CompressionPlan | None:
    """The plan for a prompt, or None when it is left alone.

    ``num_layers`` is the model's depth (the pyramid schedule spans it);
    ``layer_indices`` the compressed layers (empty: all). A prompt is compressed only
    if it is longer than the budget and the compacted pages fit in fewer blocks than
    the prompt's full blocks (so at least one block goes back to the pool). Otherwise
    the request runs exactly as vanilla vLLM.

    Kept blocks: ``max_l cdiv(pages_l, H)`` when each layer uses its own tensor; pooled
    across the K compressed layers ``cdiv(sum_l pages_l, K * H)``, used where smaller
    (per-layer budgets) and always for gvote (counts unknown before selection; planned
    at the cap, then reported). With a decode budget the layers keep their own tensors
    (decode events compact one layer's tensor at a time: PyramidKV then holds the blocks
    of its largest layer budget).
    """
    method = get_method(cfg.method)
    if not method.compresses or prompt_len <= method.budget(cfg, prompt_len):
        return None
    layers = layer_indices or tuple(range(num_layers))
    # Measured methods: the worst case, every head of every layer at its cap (the worker
    # trims to it); the workers report what the pages use.
    budgets = method.layer_budgets(cfg, prompt_len, num_layers)
    uniform = method.uniform
    pages = [max_head_pages(num_kv_heads, budgets[i], prompt_len, block_size, uniform)
             for i in layers]
    measured = method.measured
    kept_blocks, use_pool = blocks_for_pages(pages, num_kv_heads, measured,
                                             pool=cfg.decode_budget == 0)
    tail_block = prompt_len // block_size
    if kept_blocks >= tail_block:
        return None
    return CompressionPlan(
        prompt_len=prompt_len,
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        layer_budgets=budgets,
        kept_blocks=kept_blocks,
        tail_block=tail_block,
        pooled=use_pool,
        measured=measured,
    )


@dataclass(frozen=True)
class PageUsage:
    """Head-pages a compressed request reserves vs fills, over all its layers.

    A kept block holds ``H`` head-pages in *every* layer's cache, so a request
    reserves ``kept_blocks * H * num_layers`` head-pages; layer ``l``, head ``h``
    fills ``ceil(n[l,h] / block_size)`` of them.
    """

    block_size: int
    num_kv_heads: int
    kept_blocks: int  # what the request holds after compression (gvote: after the report)
    planned_blocks: int  # what the plan reserved (gvote: at its cap)
    layer_pages: tuple[int, ...]  # filled head-pages per layer (sum over heads)
    kept_tokens: int  # sum of n[l,h]
    max_head_tokens: int  # largest n[l,h]

    @property
    def reserved_pages(self) -> int:
        return self.kept_blocks * self.num_kv_heads * len(self.layer_pages)

    @property
    def used_pages(self) -> int:
        return sum(self.layer_pages)

    @property
    def waste(self) -> float:
        """Share of reserved head-pages that hold no kept token."""
        return 1.0 - self.used_pages / self.reserved_pages if self.reserved_pages else 0.0

    @property
    def slot_waste(self) -> float:
        """Share of reserved token slots that hold no kept token (includes partial pages)."""
        slots = self.reserved_pages * self.block_size
        return 1.0 - self.kept_tokens / slots if slots else 0.0

    @property
    def exact_blocks(self) -> int:
        """Blocks needed had the scheduler known the counts (layers still share blocks)."""
        return max(1, cdiv(max(self.layer_pages, default=0), self.num_kv_heads))

    @property
    def pooled_blocks(self) -> int:
        """Blocks needed with known counts and head-pages pooled across layers."""
        per_block = self.num_kv_heads * len(self.layer_pages)
        return max(1, cdiv(self.used_pages, per_block)) if per_block else 0


def page_usage(plan: CompressionPlan, kept_per_layer: list[list[int]],
               kept_blocks: int | None = None) -> PageUsage:
    """Usage of one request from its kept-token counts ``n[l][h]`` (one list per
    compressed layer); ``kept_blocks``: the blocks it holds, if not the plan's."""
    bs = plan.block_size
    return PageUsage(
        block_size=bs,
        num_kv_heads=plan.num_kv_heads,
        kept_blocks=plan.kept_blocks if kept_blocks is None else kept_blocks,
        planned_blocks=plan.kept_blocks,
        layer_pages=tuple(sum(cdiv(n, bs) for n in layer) for layer in kept_per_layer),
        kept_tokens=sum(n for layer in kept_per_layer for n in layer),
        max_head_tokens=max((n for layer in kept_per_layer for n in layer), default=0),
    )

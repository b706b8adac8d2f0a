"""How many blocks a compressed request keeps: the memory model, as pure math.

A block holds ``block_size`` tokens for each of the H KV heads of a layer, as H
head-pages (head-major layout). After compression, the kept tokens of (layer l,
head h) are compacted into ceil(n[l,h] / block_size) head-pages taken, in any
slot, from the request's first ``kept_blocks`` blocks. The block holding the
first position after the prompt (``tail_block``) and all later blocks stay in
the normal layout and receive the generated tokens. Blocks in
[kept_blocks, tail_block) are released to vLLM's block pool.

The scheduler and the workers both call :func:`plan_compression` with the same
inputs, so they agree on ``kept_blocks`` without talking to each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.policies import layer_budget


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Methods whose heads all keep the same number of tokens within a layer.
UNIFORM_METHODS = ("snapkv", "pyramidkv", "streamingllm")


@dataclass(frozen=True)
class CompressionPlan:
    """Per-request outcome of the memory model (identical on scheduler and workers)."""

    prompt_len: int
    block_size: int
    num_kv_heads: int
    layer_budgets: tuple[int, ...]  # mean tokens kept per head, window included
    kept_blocks: int  # blocks [0, kept_blocks) hold the compacted head-pages
    tail_block: int  # prompt_len // block_size: first block of the uncompressed tail

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


# Pure and called for every compressible row of every step: cache by its inputs.
@lru_cache(maxsize=8192)
def plan_compression(
    cfg: KVCompressionConfig,
    prompt_len: int,
    num_kv_heads: int,
    block_size: int,
    num_layers: int,
) -> CompressionPlan | None:
    """The plan for a prompt, or None when it is left alone.

    A prompt is compressed only if it is longer than the budget and the compacted
    pages fit in fewer blocks than the prompt's full blocks (so at least one block
    goes back to the pool). Otherwise the request runs exactly as vanilla vLLM.
    """
    if not cfg.enabled or prompt_len <= cfg.budget:
        return None
    budgets = tuple(
        min(
            prompt_len,
            layer_budget(cfg.method, cfg.budget, i, num_layers, cfg.window, cfg.pyramid_beta),
        )
        for i in range(num_layers)
    )
    uniform = cfg.method in UNIFORM_METHODS
    pages = max(
        max_head_pages(num_kv_heads, b, prompt_len, block_size, uniform) for b in budgets
    )
    kept_blocks = max(1, cdiv(pages, num_kv_heads))
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
    )

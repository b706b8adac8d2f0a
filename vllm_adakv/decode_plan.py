"""Blocks a request holds under decode-time compression with fixed budgets: pure math.

Model (docs/decode-compression.md). A block-table entry holds ``block_size`` tokens of
every KV head. With decode compression a request's head-pages always lie in the entries
``[0, P)`` (``page_blocks``), at the end of prefill and after every event: ``P`` is the
larger of the prompt plan's ``kept_blocks`` (``memory.plan_compression``) and the blocks
for ``B_l - w`` selected tokens per head and layer (``Method.decode_layer_budgets``,
bounded as ``memory.max_head_pages`` bounds the prompt: Ada-KV's uneven split costs at
most one partial page per head; GVote is planned at its cap). The tail (normal layout)
runs from a tail entry to the last position; entries between ``P`` and it are null.

- Prefill compresses if the prompt plan does and ``P < L // bs``; the tail then starts
  at entry ``L // bs``.
- Events come after ``N = jK`` generated tokens (``K`` = interval, ``j >= 1``) once
  ``N >= w``, so that the window ``[S - w, S)`` (``S = L + N``) lies in the tail's normal
  layout. An event applies when ``P < (S - w) // bs`` (the head-pages sit before the
  window's first entry, at least one entry apart), as the prompt's rule; the tail then
  starts at entry ``(S - w) // bs``. ``P`` is fixed, so once an event applies every later
  one does.

Held blocks after ``N`` generated tokens count the entries of positions ``[0, L + N)``
that are not null. The scheduler and the workers call :func:`plan_decode` with the same
inputs and agree without a message, as for the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.memory import blocks_for_pages, cdiv, max_head_pages, plan_compression
from vllm_adakv.methods import get_method
from vllm_adakv.methods.common import check_int


@dataclass(frozen=True)
class DecodePlan:
    """Where a request's blocks are after ``N`` generated tokens (module doc)."""

    prompt_len: int
    block_size: int
    num_kv_heads: int
    window: int
    interval: int
    layer_budgets: tuple[int, ...]  # decode budget of each compressed layer, window included
    page_blocks: int  # P: entries [0, P) hold the head-pages
    prefill_compressed: bool
    first_event: int  # generated tokens at the first event that applies
    measured: bool = False  # GVote: planned at the cap, an upper bound

    def last_event(self, num_generated: int) -> int | None:
        """Generated tokens at the last event applied by ``num_generated`` (None: none)."""
        num_generated = check_int("num_generated", num_generated, 0)
        if num_generated < self.first_event:
            return None
        return num_generated - num_generated % self.interval

    def tail_block(self, num_generated: int) -> int:
        """First block-table entry of the tail (0 while nothing is compressed)."""
        event = self.last_event(num_generated)
        if event is not None:
            return (self.prompt_len + event - self.window) // self.block_size
        return self.prompt_len // self.block_size if self.prefill_compressed else 0

    def held_blocks(self, num_generated: int) -> int:
        """Blocks held for positions ``[0, L + N)`` after the events up to ``N``."""
        seq_len = self.prompt_len + check_int("num_generated", num_generated, 0)
        if self.last_event(num_generated) is None and not self.prefill_compressed:
            return cdiv(seq_len, self.block_size)
        last = (seq_len - 1) // self.block_size
        return self.page_blocks + max(0, last - self.tail_block(num_generated) + 1)

    @property
    def steady_bound(self) -> int:
        """Most blocks held once an event has applied: ``P`` plus the entries of at most
        ``w + K - 1`` consecutive positions."""
        return self.page_blocks + cdiv(self.window + self.interval - 1, self.block_size) + 1

    @property
    def max_held(self) -> int:
        """Most blocks held at any length: just before the first event or, after it,
        ``steady_bound``."""
        return max(self.held_blocks(self.first_event - 1), self.steady_bound)


@lru_cache(maxsize=8192)
def plan_decode(cfg: KVCompressionConfig, prompt_len: int, num_kv_heads: int,
                block_size: int, num_layers: int, layer_indices: tuple[int, ...] = (), *,
                interval: int, budget: int | None = None) -> DecodePlan | None:
    """The decode plan of a request (module doc), or None when its method compresses
    nothing. ``budget``: the decode budget ``B`` (default ``cfg.budget``); ``interval``:
    ``K``, generated tokens between events. The prompt is planned with ``cfg``'s own
    budget (``memory.plan_compression``)."""
    method = get_method(cfg.method)
    if not method.compresses:
        return None
    prompt_len = check_int("prompt_len", prompt_len, 1)
    heads = check_int("num_kv_heads", num_kv_heads, 1)
    bs = check_int("block_size", block_size, 1)
    interval = check_int("interval", interval, 1)
    window = cfg.window
    budget = cfg.budget if budget is None else budget
    check_int("decode budget", budget, 0)
    if budget <= window:
        raise ValueError(f"decode budget ({budget}) must be greater than the window "
                         f"({window})")
    layers = layer_indices or tuple(range(num_layers))
    every = method.decode_layer_budgets(cfg, budget, num_layers)
    budgets = tuple(every[i] for i in layers)
    selected = [b - window for b in budgets]
    # A head keeps at most the layer's total: the bound's per-head limit.
    pages = [max_head_pages(heads, s, heads * s, bs, method.uniform) for s in selected]
    # Events compact each layer's own tensor (never pooled; the prompt plan agrees).
    event_blocks, _ = blocks_for_pages(pages, heads, method.measured, pool=False)
    plan = plan_compression(cfg, prompt_len, heads, bs, num_layers, layer_indices)
    page_blocks = max(event_blocks, plan.kept_blocks if plan is not None else 0)
    prefill = plan is not None and page_blocks < prompt_len // bs
    # Smallest N = jK >= w with P < (L + N - w) // bs.
    least = max(window, (page_blocks + 1) * bs - prompt_len + window)
    return DecodePlan(
        prompt_len=prompt_len, block_size=bs, num_kv_heads=heads, window=window,
        interval=interval, layer_budgets=budgets, page_blocks=page_blocks,
        prefill_compressed=prefill, first_event=interval * cdiv(least, interval),
        measured=method.measured)

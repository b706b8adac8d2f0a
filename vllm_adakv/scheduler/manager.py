"""Scheduler side: the KV manager that releases compressed requests' blocks.

vLLM picks the block manager of a KV cache group from the class of its spec
(``KVCacheSpecRegistry``). The worker's attention backend turns each layer's
``FullAttentionSpec`` into ``protocol.CompressedAttentionSpec`` (``customize_spec``);
the registry maps that class to :class:`CompressedKVManager`, which, once a
request's prompt is fully processed, replaces the blocks in
``[kept_blocks, tail_block)`` by the null block and returns them to the
``BlockPool`` (the same mechanism vLLM's R-SWA manager uses for its middle gap).

Prefix caching: compaction rewrites a compressed request's first blocks in place, so
those blocks must never be shared. A request that will be compressed neither reads the
prefix cache (``patches.patch_scheduler`` sets vLLM's ``skip_reading_prefix_cache`` on
it) nor writes it (``cache_blocks`` hashes none of its blocks); every other request
(prompt within its budget, opted out, compression off) uses vLLM's prefix cache as in
vanilla vLLM.
"""

from __future__ import annotations

from typing import Any

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_adakv import metrics
from vllm_adakv.memory import CompressionPlan
from vllm_adakv.overrides import Overrides, overrides_of
from vllm_adakv.protocol import CompressedAttentionSpec


class CompressedKVManager(FullAttentionManager):
    """Full-attention manager that frees the blocks compression made redundant."""

    def __init__(self, kv_cache_spec: CompressedAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self._released: set[str] = set()
        self.num_released_blocks_total = 0
        # Compressed running requests -> tokens their reserve covers (--kv-reserve-output).
        self._reserve_until: dict[str, int] = {}
        # Measured plans (GVote): the blocks the workers reported using (max over ranks),
        # applied (``_kept_applied``) or waiting for the cap release (``_kept_pending``).
        self._kept_applied: dict[str, int] = {}
        self._kept_pending: dict[str, int] = {}
        self.num_shrunk_blocks_total = 0  # released by reports, on top of the plans
        # Requests' vllm_xargs compression keys (only those that set some) and max_tokens,
        # from admission (``record_request``) until their blocks are freed.
        self._overrides: dict[str, Overrides] = {}
        self._max_tokens: dict[str, int] = {}
        # Requests this group compresses: kept out of the prefix cache (module doc).
        self._compressed: set[str] = set()

    def record_request(self, request_id: str, extra_args: dict | None,
                       max_tokens: int | None, num_prompt_tokens: int) -> bool:
        """A request the scheduler admits (``patches.patch_scheduler``); returns whether
        this group will compress it (then it must not read the prefix cache)."""
        overrides = overrides_of(extra_args)
        if overrides:
            self._overrides[request_id] = overrides
        if max_tokens is not None:
            self._max_tokens[request_id] = max_tokens
        spec = self.kv_cache_spec
        assert isinstance(spec, CompressedAttentionSpec)
        if spec.plan(num_prompt_tokens, overrides) is None:
            return False
        self._compressed.add(request_id)
        return True

    def forget_request(self, request_id: str) -> None:
        """A request whose blocks the scheduler freed."""
        self._overrides.pop(request_id, None)
        self._max_tokens.pop(request_id, None)
        self._compressed.discard(request_id)

    def cache_blocks(self, request: Any, num_tokens: int, *args: Any, **kwargs: Any) -> None:
        """vLLM's prefix caching of the request's full blocks, except for a compressed
        request: its first blocks are rewritten by compaction, the others released."""
        if request.request_id in self._compressed:
            return
        super().cache_blocks(request, num_tokens, *args, **kwargs)

    def reserved_blocks(self) -> int:
        """Blocks the compressed running requests still need for their reserved output."""
        total = 0
        for request_id, tokens in self._reserve_until.items():
            held = len(self.req_to_blocks.get(request_id, ()))
            total += max(0, cdiv(tokens, self.block_size) - held)
        return total

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int,
                                   *args: Any, **kwargs: Any) -> int:
        """vLLM's count, plus the reserve when ``request_id`` is being admitted (it holds
        no block yet): running requests grow into the reserve, new ones never take it."""
        needed = super().get_num_blocks_to_allocate(request_id, num_tokens, *args, **kwargs)
        if self._reserve_until and not self.req_to_blocks.get(request_id):
            needed += self.reserved_blocks()
        return needed

    def remove_skipped_blocks(
        self,
        request_id: str,
        processed_computed_tokens: int,
        num_prompt_tokens: int | None = None,
    ) -> None:
        super().remove_skipped_blocks(request_id, processed_computed_tokens, num_prompt_tokens)
        if num_prompt_tokens is None or request_id in self._released:
            return
        # The worker compacts in the forward pass that computes the last prompt
        # token; only once that step is processed are the blocks safe to free.
        if processed_computed_tokens < num_prompt_tokens:
            return
        spec = self.kv_cache_spec
        assert isinstance(spec, CompressedAttentionSpec)
        plan = spec.plan(num_prompt_tokens, self._overrides.get(request_id, ()))
        self._released.add(request_id)
        if plan is None:
            metrics.record_skipped()
            return
        before = self.block_pool.get_num_free_blocks()
        self._remove_blocks_in_range(request_id, plan.kept_blocks, plan.tail_block)
        released = self.block_pool.get_num_free_blocks() - before
        self.num_released_blocks_total += released
        metrics.record_released_blocks(released)
        if request_id in self._kept_pending:  # reported before this release
            self._shrink(request_id, plan, self._kept_pending.pop(request_id))
        reserve = spec.compression.reserve_output
        if reserve > 0:
            limit = self._max_tokens.get(request_id)
            tokens = reserve if limit is None else min(reserve, limit)
            self._reserve_until[request_id] = num_prompt_tokens + tokens

    def pop_blocks_for_free(self, request_id: str):  # noqa: ANN201 (vLLM's type)
        self._released.discard(request_id)
        self._reserve_until.pop(request_id, None)
        self._kept_applied.pop(request_id, None)
        self._kept_pending.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    def apply_kept_blocks(self, request_id: str, num_prompt_tokens: int,
                          kept_blocks: int) -> int:
        """The workers' report for the request's current compression (``scheduler/kept_reports``
        checked it answers that one; max over ranks): its pages use blocks
        ``[0, kept_blocks)``, so ``[kept_blocks, plan.kept_blocks)`` go back to the pool,
        now if the cap plan is released already, else right after it. Returns the blocks
        released now; raises ValueError for a report the plan cannot take.

        The tail and ``_reserve_until`` are untouched: released blocks stay in the block
        list as null blocks, so the blocks a reserve still lacks are counted as before."""
        if not self.req_to_blocks.get(request_id):
            return 0  # freed since (finished, preempted)
        if request_id in self._kept_applied or request_id in self._kept_pending:
            raise ValueError(f"request {request_id}: a second kept-block report for one "
                             "compression")
        spec = self.kv_cache_spec
        assert isinstance(spec, CompressedAttentionSpec)
        plan = spec.plan(num_prompt_tokens, self._overrides.get(request_id, ()))
        if plan is None or not plan.measured:
            raise ValueError(f"request {request_id}: kept-block report for a plan that "
                             "is not measured")
        if not 1 <= kept_blocks <= plan.kept_blocks:
            raise ValueError(f"request {request_id}: reported {kept_blocks} kept blocks, "
                             f"outside [1, {plan.kept_blocks}] of its plan")
        if request_id not in self._released:
            self._kept_pending[request_id] = kept_blocks
            return 0
        return self._shrink(request_id, plan, kept_blocks)

    def _shrink(self, request_id: str, plan: CompressionPlan, kept_blocks: int) -> int:
        before = self.block_pool.get_num_free_blocks()
        self._remove_blocks_in_range(request_id, kept_blocks, plan.kept_blocks)
        released = self.block_pool.get_num_free_blocks() - before
        self._kept_applied[request_id] = kept_blocks
        self.num_shrunk_blocks_total += released
        metrics.record_released_blocks(released)
        return released

    def kept_blocks_of(self, request_id: str) -> int | None:
        """Blocks a measured request keeps after its report (None before it)."""
        return self._kept_applied.get(request_id)


def register_spec() -> None:
    """Map CompressedAttentionSpec to its manager (idempotent)."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    # Built-in specs register lazily only while the registry is empty: fill it
    # first, or adding ours would keep vLLM's own specs from ever registering.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        CompressedAttentionSpec,
        CompressedKVManager,
        uniform_type_base_spec=FullAttentionSpec,
    )


def compressed_managers(kv_cache_manager: Any) -> list[CompressedKVManager]:
    """The CompressedKVManagers of a scheduler's ``kv_cache_manager`` (one per compressed
    KV cache group; none when compression is off)."""
    coordinator = getattr(kv_cache_manager, "coordinator", None)
    managers = getattr(coordinator, "single_type_managers", ())
    return [m for m in managers if isinstance(m, CompressedKVManager)]

"""Scheduler side: the KV manager that releases compressed requests' blocks.

vLLM picks the block manager of a KV cache group from the class of its spec
(``KVCacheSpecRegistry``). The worker's attention backend turns each layer's
``FullAttentionSpec`` into ``protocol.CompressedAttentionSpec`` (``customize_spec``);
the registry maps that class to :class:`CompressedKVManager`, which, once a
request's prompt is fully processed, replaces the blocks in
``[kept_blocks, tail_block)`` by the null block and returns them to the
``BlockPool`` (the same mechanism vLLM's R-SWA manager uses for its middle gap).

Prefix caching (docs/architecture.md, "Prefix caching"): a compressed request may hit
cached blocks of its prompt, up to ``hit_cap`` (its observation window is always
computed); its full prompt blocks are hashed as in vanilla vLLM (computed densely, they
are exact), its tail and generated blocks never (their KV attended to the compressed
cache). Compaction must never write a hashed or shared block, so with caching on a
compressed request gets ``kept_blocks`` fresh blocks (``targets``) at the allocation
that reaches the end of its prompt, sent to the workers (``take_new_targets``); the
workers compact into them. At the release the targets take the places ``[0, m)`` of
its block list, ``[m, T)`` become null blocks, and every old prompt block goes back to
the pool through ``free_blocks``: still hashed, at the LRU end, so the next turn of a
conversation or another request with the prefix hits them. With caching off, nothing
can share a block, and compaction writes into the request's own first blocks.
"""

from __future__ import annotations

from typing import Any

from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_adakv import metrics
from vllm_adakv.decode_plan import DecodePlan
from vllm_adakv.memory import CompressionPlan
from vllm_adakv.methods import get_method
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
        # Requests this group compresses -> prompt length, from admission until freed.
        self._prompt_len: dict[str, int] = {}
        # Prefix caching on: compaction targets taken and not yet swapped in (module doc),
        # and the ids of those taken since the last schedule() ended, for the workers.
        self._targets: dict[str, list[KVCacheBlock]] = {}
        self._new_targets: dict[str, list[int]] = {}
        self.num_target_blocks_total = 0
        # Decode-time compression (--kv-decode-budget): plans of the requests it applies
        # to, from admission until freed, and the blocks its events released.
        self._decode: dict[str, DecodePlan] = {}
        self.num_decode_released_blocks_total = 0

    def record_request(self, request_id: str, extra_args: dict | None,
                       max_tokens: int | None, num_prompt_tokens: int) -> bool:
        """A request the scheduler admits (``patches.patch_scheduler``); returns whether
        this group will compress it."""
        overrides = overrides_of(extra_args)
        if overrides:
            self._overrides[request_id] = overrides
        if max_tokens is not None:
            self._max_tokens[request_id] = max_tokens
        spec = self.kv_cache_spec
        assert isinstance(spec, CompressedAttentionSpec)
        if spec.plan(num_prompt_tokens, overrides) is None:
            return False
        self._prompt_len[request_id] = num_prompt_tokens
        decode = spec.decode_plan(num_prompt_tokens, overrides)
        if decode is not None:
            self._decode[request_id] = decode
        return True

    def forget_request(self, request_id: str) -> None:
        """A request whose blocks the scheduler freed."""
        self._overrides.pop(request_id, None)
        self._max_tokens.pop(request_id, None)
        self._prompt_len.pop(request_id, None)
        self._decode.pop(request_id, None)

    def _kept_entries(self, request_id: str, plan: CompressionPlan) -> int:
        """Block-table entries ``[0, m)`` the request keeps at its prompt's release: the
        prompt plan's ``kept_blocks``, or with decode compression the head-pages ``P`` of
        its events (``decode_plan``), at most up to the tail (entries from there on hold
        the tail and generated tokens: the request's own, never hashed)."""
        decode = self._decode.get(request_id)
        if decode is None:
            return plan.kept_blocks
        return min(decode.page_blocks, plan.tail_block)

    def _plan(self, request_id: str) -> CompressionPlan | None:
        length = self._prompt_len.get(request_id)
        if length is None:
            return None
        spec = self.kv_cache_spec
        assert isinstance(spec, CompressedAttentionSpec)
        return spec.plan(length, self._overrides.get(request_id, ()))

    def hit_cap(self, request: Any) -> int | None:
        """The longest prefix-cache hit a compressed request may take (None: vLLM's own
        rule). Methods that score with the last ``window`` queries of the prompt need those
        computed: the hit stops at the last block boundary at or before ``L - window``."""
        length = self._prompt_len.get(request.request_id)
        if length is None:
            return None
        spec = self.kv_cache_spec
        assert isinstance(spec, CompressedAttentionSpec)
        cfg = spec.config_for(length, self._overrides.get(request.request_id, ()))
        cap = length - 1
        if get_method(cfg.method).needs_window_queries:
            cap = (length - cfg.window) // self.block_size * self.block_size
        return max(0, min(cap, request.num_tokens - 1))

    def cache_blocks(self, request: Any, num_tokens: int, *args: Any, **kwargs: Any) -> None:
        """vLLM's prefix caching of the request's full blocks; a compressed request's only
        up to its last full prompt block (its tail and generated tokens attend to the
        compressed cache: their KV is not what an uncompressed request would compute)."""
        length = self._prompt_len.get(request.request_id)
        if length is not None:
            num_tokens = min(num_tokens, length // self.block_size * self.block_size)
        super().cache_blocks(request, num_tokens, *args, **kwargs)

    def _needs_targets(self, request_id: str, num_tokens: int) -> CompressionPlan | None:
        """The plan of a compressed request whose allocation reaches the end of its prompt
        now and needs compaction targets (prefix caching on, none taken yet)."""
        if (not self.block_pool.enable_caching or request_id in self._targets
                or request_id in self._released):
            return None
        length = self._prompt_len.get(request_id)
        if length is None or num_tokens < length:
            return None
        return self._plan(request_id)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, *args: Any,
                            **kwargs: Any) -> list[KVCacheBlock]:
        """vLLM's allocation, plus the compaction targets on the allocation that reaches the
        end of a compressed prompt (counted by ``get_num_blocks_to_allocate``). They stay
        out of the block list (and so out of vLLM's block tables) until the release."""
        new_blocks = super().allocate_new_blocks(request_id, num_tokens, *args, **kwargs)
        plan = self._needs_targets(request_id, num_tokens)
        if plan is not None:
            targets = self.block_pool.get_new_blocks(self._kept_entries(request_id, plan))
            assert all(self.block_pool.is_block_writable(b) for b in targets)
            self._targets[request_id] = targets
            self._new_targets[request_id] = [b.block_id for b in targets]
            self.num_target_blocks_total += len(targets)
        return new_blocks

    def take_new_targets(self) -> dict[str, list[int]]:
        """Block ids of the targets taken since the last call (the schedule() pass that
        ends now), by request; the workers compact into them in this step."""
        new, self._new_targets = self._new_targets, {}
        return new

    def reserved_blocks(self) -> int:
        """Blocks the compressed running requests still need for their reserved output
        (with decode compression, at most what takes them to their plan's bound)."""
        total = 0
        for request_id, tokens in self._reserve_until.items():
            blocks = self.req_to_blocks.get(request_id, ())
            need = max(0, cdiv(tokens, self.block_size) - len(blocks))
            decode = self._decode.get(request_id)
            if decode is not None:
                held = sum(1 for b in blocks if not b.is_null)
                need = min(need, max(0, decode.max_held - held))
            total += need
        return total

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int,
                                   *args: Any, **kwargs: Any) -> int:
        """vLLM's count, plus the compaction targets where the allocation takes them, plus
        the reserve when ``request_id`` is being admitted (it holds no block yet): running
        requests grow into the reserve, new ones never take it."""
        needed = super().get_num_blocks_to_allocate(request_id, num_tokens, *args, **kwargs)
        plan = self._needs_targets(request_id, num_tokens)
        if plan is not None:
            needed += self._kept_entries(request_id, plan)
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
        if num_prompt_tokens is None:
            return
        if request_id in self._released:
            self._release_decoded(request_id, processed_computed_tokens)
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
        targets = self._targets.pop(request_id, None)
        kept = self._kept_entries(request_id, plan)
        if targets is not None:
            self._swap_in_targets(request_id, kept, plan.tail_block, targets)
            before += len(targets)  # taken from the pool for this compaction
        elif self.block_pool.enable_caching:
            raise RuntimeError(f"vllm-adakv: compressed request {request_id} reached its "
                               "release without compaction targets")
        else:
            self._remove_blocks_in_range(request_id, kept, plan.tail_block)
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
        # A request recomputed after a preemption may complete its prompt and run past
        # its first decode events in one step: the workers applied them at its end.
        self._release_decoded(request_id, processed_computed_tokens)

    def _release_decoded(self, request_id: str, processed_computed_tokens: int) -> None:
        """Decode compression: once the step that ends a decode event is processed (the
        workers re-selected and compacted into entries ``[0, P)`` at its end), entries
        ``[P, tail_block)`` become null blocks, back in the pool (as vLLM's sliding window
        frees the blocks behind it)."""
        decode = self._decode.get(request_id)
        if decode is None:
            return
        generated = processed_computed_tokens - decode.prompt_len
        if generated < 0 or decode.last_event(generated) is None:
            return
        before = self.block_pool.get_num_free_blocks()
        self._remove_blocks_in_range(request_id, decode.page_blocks,
                                     decode.tail_block(generated))
        released = self.block_pool.get_num_free_blocks() - before
        if released:
            self.num_decode_released_blocks_total += released
            metrics.record_released_blocks(released, decoding=True)

    def _swap_in_targets(self, request_id: str, m: int, tail: int,
                         targets: list[KVCacheBlock]) -> None:
        """The targets (holding the compacted pages) become blocks ``[0, m)``, ``[m, T)``
        null blocks; the old prompt blocks go back to the pool, hashed ones still hashed
        (vLLM's ``free_blocks``: the LRU end; shared ones just lose this reference), the
        last block first to be evicted, as vLLM frees a finished request's."""
        blocks = self.req_to_blocks[request_id]
        old = blocks[:tail]
        blocks[:m] = targets
        blocks[m:tail] = [self._null_block] * (tail - m)
        self.block_pool.free_blocks([b for b in reversed(old) if not b.is_null])

    def pop_blocks_for_free(self, request_id: str) -> list[KVCacheBlock]:
        """vLLM's, plus targets not swapped in yet (finished, aborted or preempted between
        the allocation that took them and the release)."""
        self._released.discard(request_id)
        self._reserve_until.pop(request_id, None)
        self._kept_applied.pop(request_id, None)
        self._kept_pending.pop(request_id, None)
        self._new_targets.pop(request_id, None)
        blocks = super().pop_blocks_for_free(request_id)
        targets = self._targets.pop(request_id, None)
        return blocks + targets if targets else blocks

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

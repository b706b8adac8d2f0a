"""What crosses between the scheduler side and the worker side of the package.

vLLM runs the scheduler and the workers in different processes; these are the only
objects both sides share:

- ``CompressedAttentionSpec``: the KV cache spec of a compressed layer group. The worker
  side builds it (the attention backend's ``customize_spec``); vLLM hands it to the
  scheduler side, whose KV manager plans each request with it (``plan``): both sides
  call ``memory.plan_compression`` with the same inputs and so agree on the blocks a
  compressed request keeps, without a message.
- Compaction targets (prefix caching on): the blocks each KV cache group's manager took
  this step for requests whose prompt ends in it, ``{group id: {request id: block
  ids}}`` on the SchedulerOutput (attribute ``TARGETS_ATTR``, ``targets_of``): the
  workers compact those requests into them.
- Kept-block reports (measured plans, GVote): ``KeptBlocks`` entries that a worker hangs
  on its ``ModelRunnerOutput`` (attribute ``ATTR``), gathered over tensor-parallel ranks
  by ``KeptBlocksAggregator`` in the executor, and read by the scheduler
  (``entries_of``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, NamedTuple

from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.decode_plan import DecodePlan, plan_decode
from vllm_adakv.memory import CompressionPlan, plan_compression
from vllm_adakv.overrides import Overrides, resolve

# The ModelRunnerOutput attribute that carries a step's entries (a tuple of KeptBlocks).
ATTR = "adakv_kept_blocks"
# The SchedulerOutput attribute that carries a step's compaction targets.
TARGETS_ATTR = "adakv_targets"


def targets_of(scheduler_output: Any) -> dict[int, dict[str, list[int]]]:
    """The compaction targets a step's SchedulerOutput carries, by KV cache group id."""
    return getattr(scheduler_output, TARGETS_ATTR, None) or {}


@dataclass(frozen=True, kw_only=True)
class CompressedAttentionSpec(FullAttentionSpec):
    """FullAttentionSpec plus what the scheduler needs to size compressed requests."""

    compression: KVCompressionConfig = KVCompressionConfig()
    num_layers: int = 1  # the model's depth
    layer_indices: tuple[int, ...] = ()  # the compressed layers (empty: all num_layers)

    @classmethod
    def wrap(
        cls, spec: FullAttentionSpec, compression: KVCompressionConfig, num_layers: int,
        layer_indices: tuple[int, ...] = (),
    ) -> CompressedAttentionSpec:
        base = {f.name: getattr(spec, f.name) for f in fields(FullAttentionSpec)}
        return cls(**base, compression=compression, num_layers=num_layers,
                   layer_indices=tuple(layer_indices))

    @property
    def compressed_layers(self) -> tuple[int, ...]:
        """Model indices of the compressed layers, ascending."""
        return self.layer_indices or tuple(range(self.num_layers))

    @classmethod
    def merge(cls, specs: list[CompressedAttentionSpec]) -> CompressedAttentionSpec:  # type: ignore[override]
        if not all(isinstance(s, CompressedAttentionSpec) for s in specs):
            raise ValueError("cannot merge compressed and uncompressed attention layers")
        settings = {(s.compression, s.num_layers, s.layer_indices) for s in specs}
        if len(settings) != 1:
            raise ValueError(f"attention layers disagree on compression settings: {settings}")
        merged = FullAttentionSpec.merge(list(specs))
        return cls.wrap(merged, specs[0].compression, specs[0].num_layers,
                        specs[0].layer_indices)

    def config_for(self, prompt_len: int, overrides: Overrides = ()) -> KVCompressionConfig:
        """The effective config of a request (the server's, or its vllm_xargs over it)."""
        return resolve(self.compression, overrides, prompt_len)

    def plan(self, prompt_len: int, overrides: Overrides = ()) -> CompressionPlan | None:
        return plan_compression(
            self.config_for(prompt_len, overrides), prompt_len, self.num_kv_heads,
            self.block_size, self.num_layers, self.layer_indices,
        )


    def decode_plan(self, prompt_len: int, overrides: Overrides = ()) -> DecodePlan | None:
        """The request's decode-time compression plan (``decode_plan.plan_decode`` with
        ``--kv-decode-budget`` and ``--kv-decode-interval``), or None: decode compression
        off, or a prompt that is not compressed (its generated tokens are kept, as
        without decode compression)."""
        cfg = self.config_for(prompt_len, overrides)
        if cfg.decode_budget == 0 or self.plan(prompt_len, overrides) is None:
            return None
        return plan_decode(cfg, prompt_len, self.num_kv_heads, self.block_size,
                           self.num_layers, self.layer_indices,
                           interval=cfg.decode_interval, budget=cfg.decode_budget)


class KeptBlocks(NamedTuple):
    """One rank's answer for one compression of one request."""

    rank: int  # tensor-parallel rank of the worker
    req_id: str
    seq: int  # 0 for the request's first compression, 1 after a restart, ...
    kept_blocks: int  # blocks [0, kept_blocks) hold the request's pages on this rank


def add_entries(output: Any, entries: tuple[KeptBlocks, ...]) -> None:
    setattr(output, ATTR, getattr(output, ATTR, ()) + entries)


def entries_of(output: Any) -> tuple[KeptBlocks, ...]:
    """The entries ``output`` carries (removed from it)."""
    entries = getattr(output, ATTR, ())
    if entries:
        delattr(output, ATTR)
    return entries


class KeptBlocksAggregator:
    """Executor side, tensor parallel: every rank's entries onto the output vLLM keeps.

    vLLM's multiprocess executor returns one rank's output unless the executor has a
    ``kv_output_aggregator``, in which case it waits for every rank's output and calls
    ``aggregate(outputs, output_rank)`` (``MultiprocExecutor.collective_rpc``). This one
    gathers the entries of all ranks and hands the rest to vLLM's own aggregator when a
    KV connector installed one (``inner``)."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner

    def aggregate(self, outputs: list[Any], output_rank: int = 0) -> Any:
        entries: tuple[KeptBlocks, ...] = ()
        for out in outputs:
            if out is not None:
                entries += entries_of(out)
        result = (self.inner.aggregate(outputs, output_rank) if self.inner is not None
                  else outputs[output_rank])
        if entries and result is not None:
            add_entries(result, entries)
        return result

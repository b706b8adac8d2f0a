"""Which rows of a step need compression work, from the runner's request table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.decode_plan import DecodePlan
from vllm_adakv.memory import CompressionPlan
from vllm_adakv.overrides import Overrides, overrides_of


@dataclass
class RowPlan:
    """One batch row (one request) of this step."""

    row: int
    req_id: str
    prompt_len: int
    context_start: int  # tokens already in the cache before this step
    query_len: int
    plan: CompressionPlan
    # The request's own settings when its vllm_xargs override the server's; else None.
    cfg: KVCompressionConfig | None = None
    # Blocks to compact into in this step (prefix caching on: ``worker/targets.py``);
    # None: its own first blocks.
    targets: list[int] | None = None
    # Decode-time compression of the request (--kv-decode-budget); None: off.
    decode: DecodePlan | None = None

    @property
    def seq_len(self) -> int:
        return self.context_start + self.query_len

    @property
    def compressed_before(self) -> bool:
        return self.context_start >= self.prompt_len

    @property
    def completes_prompt(self) -> bool:
        return self.context_start < self.prompt_len <= self.seq_len

    @property
    def resumed(self) -> bool:
        """Completes its prompt and runs past it in the same step (a request recomputed
        after preemption): its tokens after the prompt read the compressed cache."""
        return self.completes_prompt and self.seq_len > self.prompt_len


@dataclass
class StepPlan:
    """Rows of compressible requests in this step, by what they need."""

    rows: list[RowPlan] = field(default_factory=list)
    live_req_ids: frozenset[str] = frozenset()

    @property
    def decode_rows(self) -> list[RowPlan]:
        return [r for r in self.rows if r.compressed_before]

    def is_empty(self) -> bool:
        return not self.rows


def request_overrides(runner: Any, req_id: str) -> Overrides:
    """The compression keys of a request's vllm_xargs (SamplingParams.extra_args)."""
    state = runner.requests.get(req_id)
    params = getattr(state, "sampling_params", None)
    return overrides_of(getattr(params, "extra_args", None))


def build_step_plan(
    runner: Any,
    num_reqs: int,
    query_start_loc_cpu: torch.Tensor,
    seq_lens_cpu: torch.Tensor,
    spec: Any,
    targets: dict[str, list[int]] | None = None,
) -> StepPlan:
    """Rows whose request is compressible (``spec.plan(...)`` is not None), read from the
    model runner's request table (``runner.input_batch`` and ``runner.requests``).

    ``spec`` is the layer group's ``CompressedAttentionSpec``: it plans each request
    with the server's settings or, where the request's vllm_xargs override them,
    with the request's own (then carried by the row as ``cfg``). ``targets``: this
    step's compaction targets of the group by request id.
    """
    batch = runner.input_batch
    req_ids = list(batch.req_ids[:num_reqs])
    prompt_lens = [int(x) for x in batch.num_prompt_tokens[:num_reqs]]
    # A full CUDA graph pads the batch with empty rows past the runner's requests.
    num_reqs = len(req_ids)
    qsl = query_start_loc_cpu.tolist()
    seq = seq_lens_cpu.tolist()
    rows: list[RowPlan] = []
    for i in range(num_reqs):
        overrides = request_overrides(runner, req_ids[i])
        plan = spec.plan(prompt_lens[i], overrides)
        cfg = spec.config_for(prompt_lens[i], overrides) if overrides else None
        if plan is None:
            continue
        q_len = qsl[i + 1] - qsl[i]
        rows.append(
            RowPlan(
                row=i,
                req_id=req_ids[i],
                prompt_len=prompt_lens[i],
                context_start=seq[i] - q_len,
                query_len=q_len,
                plan=plan,
                cfg=cfg,
                targets=targets.get(req_ids[i]) if targets else None,
                decode=spec.decode_plan(prompt_lens[i], overrides),
            )
        )
    return StepPlan(rows=rows, live_req_ids=frozenset(runner.requests.keys()))

"""Which rows of a step need compression work, from the runner's request table."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.memory import CompressionPlan
from vllm_adakv.overrides import Overrides, overrides_of

_RUNNER: weakref.ReferenceType[Any] | None = None


def link_model_runner(runner: Any) -> None:
    """Remember this worker's model runner (set once per worker process)."""
    global _RUNNER
    _RUNNER = weakref.ref(runner)


def linked_model_runner() -> Any:
    runner = _RUNNER() if _RUNNER is not None else None
    if runner is None:
        raise RuntimeError(
            "vllm-adakv: no model runner linked in this worker; the plugin's "
            "register() must run before the worker initialises its KV cache"
        )
    return runner


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

    @property
    def seq_len(self) -> int:
        return self.context_start + self.query_len

    @property
    def compressed_before(self) -> bool:
        return self.context_start >= self.prompt_len

    @property
    def completes_prompt(self) -> bool:
        return self.context_start < self.prompt_len <= self.seq_len


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


def read_batch(num_reqs: int) -> tuple[list[str], list[int]]:
    """Request ids and prompt lengths of the first ``num_reqs`` rows, in batch order."""
    batch = linked_model_runner().input_batch
    req_ids = list(batch.req_ids[:num_reqs])
    prompt_lens = [int(x) for x in batch.num_prompt_tokens[:num_reqs]]
    return req_ids, prompt_lens


def live_request_ids() -> frozenset[str]:
    return frozenset(linked_model_runner().requests.keys())


def request_overrides(req_id: str) -> Overrides:
    """The compression keys of a request's vllm_xargs (SamplingParams.extra_args)."""
    state = linked_model_runner().requests.get(req_id)
    params = getattr(state, "sampling_params", None)
    return overrides_of(getattr(params, "extra_args", None))


def build_step_plan(
    num_reqs: int,
    query_start_loc_cpu: torch.Tensor,
    seq_lens_cpu: torch.Tensor,
    spec: Any,
) -> StepPlan:
    """Rows whose request is compressible (``spec.plan(...)`` is not None).

    ``spec`` is the layer group's ``CompressedAttentionSpec``: it plans each request
    with the server's settings or, where the request's vllm_xargs override them,
    with the request's own (then carried by the row as ``cfg``).
    """
    req_ids, prompt_lens = read_batch(num_reqs)
    # A full CUDA graph pads the batch with empty rows past the runner's requests.
    num_reqs = len(req_ids)
    qsl = query_start_loc_cpu.tolist()
    seq = seq_lens_cpu.tolist()
    rows: list[RowPlan] = []
    for i in range(num_reqs):
        overrides = request_overrides(req_ids[i])
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
            )
        )
    return StepPlan(rows=rows, live_req_ids=live_request_ids())

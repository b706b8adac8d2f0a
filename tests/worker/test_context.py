"""The worker context (``vllm_adakv.worker.context``): the device bytes it makes after
vLLM sized the KV cache, which ``patches`` holds through vLLM's memory profile."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from adakv_devtools.tiny_model import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), num_layers=3, num_heads=8,
                           num_kv_heads=2, head_dim=32, hidden_size=256)


def _context(model, compression: dict, **engine):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_adakv.plugin import register
    from vllm_adakv.worker.context import WorkerContext

    register()
    cfg = EngineArgs(model=str(model), dtype="bfloat16", block_size=16, max_model_len=1024,
                     additional_config={"kv_compression": compression},
                     **engine).create_engine_config()
    runner = type("Runner", (), {"vllm_config": cfg})()
    return WorkerContext(runner), runner  # (the context holds its runner weakly)


@pytest.mark.parametrize("tp", [1, 2])
def test_late_device_bytes_are_the_ring_and_the_event_scratch(tiny_model, tp):
    """With a decode budget: a real ``QueryRing`` of the engine's shape (every layer,
    ``max_num_seqs`` slots, the window, this rank's query heads, the model's dtype) plus
    the events' scratch cap; without one, nothing."""
    import torch

    from vllm_adakv.worker.decode_events import EVENT_SCRATCH_BYTES
    from vllm_adakv.worker.query_ring import QueryRing

    decode = {"method": "adakv", "budget": 128, "window": 16, "decode_budget": 96}
    ctx, _runner = _context(tiny_model, decode, max_num_seqs=24, tensor_parallel_size=tp)
    ring = QueryRing(3, 24, 16, 8 // tp, 32, torch.bfloat16, "cpu")
    assert ctx.late_device_bytes() == ring.buffer.nbytes + EVENT_SCRATCH_BYTES
    assert QueryRing.nbytes(3, 24, 16, 8 // tp, 32, torch.bfloat16) == ring.buffer.nbytes
    plain, _runner = _context(tiny_model, {"method": "adakv", "budget": 128}, max_num_seqs=24,
                     tensor_parallel_size=tp)
    assert plain.late_device_bytes() == 0

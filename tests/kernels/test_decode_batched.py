"""Row-batched head-wise decode (the CPU path) == the per-row torch reference.

Same inputs as the Triton decode tests (real compacted caches, uneven pages per head, a
head with nothing kept, tails of generated tokens, rows with several query tokens,
vLLM's transposed CPU key layout); fresh random inputs each run, ``out`` poisoned before
the call. fp32 compared at 1e-5 (same fp32 arithmetic, different reduction order); bf16
inputs at 1e-3 against the reference run on the same rounded inputs.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.test_triton_decode import _build
from vllm_adakv.kernels import headwise_attention_batched, headwise_attention_reference


def _compare(args, tol, pad_tokens=0, **kwargs):
    query = args["query"]
    want = torch.full(query.shape, float("nan"), dtype=torch.float32)
    headwise_attention_reference(**args, out=want)
    out = torch.full(query.shape, float("nan"), dtype=torch.float32)
    got = headwise_attention_batched(**args, out=out, **kwargs)
    assert got is out
    n = query.shape[0] - pad_tokens
    assert not torch.isnan(out[:n]).any(), "output not fully written"
    assert torch.isnan(out[n:]).all(), "padding tokens must be left untouched"
    torch.testing.assert_close(out[:n], want[:n], atol=tol, rtol=tol)


@pytest.mark.parametrize("group,dim", [(1, 64), (4, 128), (8, 64)])
@pytest.mark.parametrize("transposed", [False, True])
def test_matches_reference(group, dim, transposed):
    args = _build(group, dim, torch.float32, [1, 3, 1, 2], transposed=transposed,
                  empty_head=0, pad_tokens=2)
    _compare(args, 1e-5, pad_tokens=2)


def test_low_precision_inputs():
    args = _build(4, 64, torch.bfloat16, [1, 1, 2])
    _compare(args, 1e-3)


def test_chunks_of_rows_give_the_same_output():
    """A tiny element budget makes every row its own chunk."""
    args = _build(4, 64, torch.float32, [1, 2, 1, 1, 3])
    _compare(args, 1e-5, max_elements=1)


def test_rows_without_queries_are_skipped():
    args = _build(4, 64, torch.float32, [1, 2, 1])
    qsl = args["query_start_loc"]
    args["query_start_loc"] = torch.tensor([0, 1, 1, 3], dtype=qsl.dtype)  # row 1: none
    args["query"] = args["query"][:3]
    _compare(args, 1e-5)

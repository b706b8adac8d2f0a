"""The decode event's Triton kernels on a CUDA device at real sizes, through the
dispatchers of ``vllm_adakv.kernels``, against their torch references (so far only run
under the Triton interpreter in tests/kernels).

Skipped without CUDA; run with ``TRITON_INTERPRET`` unset or 0 (tests/conftest.py sets it
to 1 by default). Llama-3.1-8B's layer (32 query heads, 8 KV heads, d=128, bf16, block
size 16), 4-16 rows of 2k-8k tokens: per head up to 1000 head-page tokens, a tail of
100-400 tokens before the window w=32 (layouts: ``decode_event_layout``). Fresh seeds
each run (in every failure message). Each kernel call runs under sync debug mode "error":
nothing in it may make the host wait for the GPU. Checked:

- ``score_decode_event``: scores equal the fp32 reference on the same bf16 inputs to
  2e-3 absolute, the same -inf padding (both gqa reductions and poolings);
- ``safeguard_caps_heads``: caps equal the reference integer for integer on the event's
  top-T hits; the prompt's ``safeguard_caps`` (the same kernel with a head stride of 0
  and ``T = H * s``, launched without fp fusion) too;
- ``compact_decode_event``: bf16 and fp8 e4m3 caches byte for byte as the reference
  leaves them, the same page_start, counts and tail_start;
- ``decode_voter_probs``: probabilities equal the fp32 reference to 1e-5.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from tests.gpu.decode_event_layout import (  # noqa: E402
    build_event,
    check_compaction,
    check_safeguard_heads,
    check_safeguard_prompt,
    check_scores,
    check_voter_probs,
    new_seed,
)
from vllm_adakv import kernels  # noqa: E402

DEV = "cuda"
Q_HEADS = 32
SIZES = [(4, (6000, 8192)), (16, (2048, 8192))]  # (rows, sequence lengths)
IDS = ["4x8k", "16x2-8k"]


@pytest.mark.parametrize("num_rows,seq", SIZES, ids=IDS)
def test_scores_real_sizes(num_rows, seq):
    ev = build_event(new_seed(), DEV, num_rows=num_rows, seq=seq)
    for kw in (dict(gqa_reduce="mean", pooling="max", pool_kernel=7),
               dict(gqa_reduce="max", pooling="avg", pool_kernel=5)):
        check_scores(ev, kernels.score_decode_event, Q_HEADS, **kw)


@pytest.mark.parametrize("num_rows,seq", SIZES, ids=IDS)
def test_safeguard_heads_real_sizes(num_rows, seq):
    """On the event's own scores (reference), every alpha regime."""
    ev = build_event(new_seed(), DEV, num_rows=num_rows, seq=seq)
    scores = check_scores(ev, kernels.score_decode_event, Q_HEADS, gqa_reduce="mean",
                          pooling="max", pool_kernel=7)
    gen = ev.gen(3)
    for alpha in (0.0, 0.2, 0.5, 1.0):
        check_safeguard_heads(ev, kernels.safeguard_caps_heads, scores, alpha, gen)


@pytest.mark.parametrize("heads", [8, 32])
def test_safeguard_prompt_path_real_sizes(heads):
    """The prompt's call (bounds broadcast: head stride 0) on 16 prompts of 2k-8k."""
    for alpha in (0.0, 0.2, 0.5, 1.0):
        check_safeguard_prompt(kernels.safeguard_caps, DEV, new_seed(), num_rows=16,
                               heads=heads, alpha=alpha)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("num_rows,seq", SIZES, ids=IDS)
def test_compaction_real_sizes(num_rows, seq, dtype):
    ev = build_event(new_seed(), DEV, num_rows=num_rows, seq=seq, dtype=dtype)
    check_compaction(ev, kernels.compact_decode_event, ev.gen(4))


@pytest.mark.parametrize("num_rows,seq", SIZES, ids=IDS)
def test_voter_probs_real_sizes(num_rows, seq):
    ev = build_event(new_seed(), DEV, num_rows=num_rows, seq=seq)
    check_voter_probs(ev, kernels.decode_voter_probs, Q_HEADS, num_voters=8)

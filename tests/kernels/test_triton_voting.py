"""Triton GVote vote (run by the Triton interpreter on CPU) == the torch references.

Fresh random prompts each run, cache slots outside each prompt NaN (poison), outputs
checked for it. Tolerances: fp32 rtol 1e-4 / atol 1e-7 for probabilities (fp32 dots and
exp2 instead of exp); bf16/fp16 caches the same, since voters are float32 and keys are
the same rounded values in both paths. The mass above each key is compared exactly on
the same probabilities (the same prefix sums on both sides).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from tests.kernels.test_voting import paged_prompts  # noqa: E402
from vllm_adakv.kernels import min_mass_above_reference, voter_probs_reference  # noqa: E402
from vllm_adakv.kernels.triton_voting import (  # noqa: E402
    min_mass_above_triton,
    voter_probs_triton,
)
from vllm_adakv.kernels.voting import mass_above_top  # noqa: E402
from vllm_adakv.methods.gvote import gvote_keep_masks, gvote_voters  # noqa: E402


def _case(group, dim, dtype, lengths, samples=5):
    queries, kc, table = paged_prompts(lengths, 2, group, dim, window=8, dtype=dtype)
    voters = gvote_voters(queries, samples, seed=1, layer_idx=2)  # float32
    return voters, kc, table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,dim", [(1, 64), (4, 128), (8, 64)])
def test_voter_probs_match_reference(group, dim, dtype):
    lengths = [int(torch.randint(9, 260, ())) for _ in range(3)]
    voters, kc, table = _case(group, dim, dtype, lengths)
    order = [2, 0, 1]
    lens = [lengths[b] for b in order]
    want = voter_probs_reference(voters, kc, table, order, lens, dim**-0.5)
    got = voter_probs_triton(voters, kc, table, order, lens, dim**-0.5, num_splits=3)
    assert got.shape == want.shape == (3, 2, group * 6, max(lens))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("num_splits", [1, 4, 16, None])
def test_voter_probs_position_splits(num_splits):
    """Split statistics (some splits empty) combine to the unsplit softmax; more voters
    than one tile (S = 20)."""
    lengths = [int(torch.randint(9, 500, ())) for _ in range(2)]
    voters, kc, table = _case(4, 64, torch.float32, lengths, samples=20)
    want = voter_probs_reference(voters, kc, table, [0, 1], lengths, 0.125)
    got = voter_probs_triton(voters, kc, table, [0, 1], lengths, 0.125, num_splits=num_splits)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("p,most", [(0.9, 40), (0.5, 1000), (1.0, 64), (0.99, 200), (0.9, 1)])
def test_min_mass_above_matches_reference(p, most):
    """Each voter's top ``most`` (ties included), the mass above from it, the least over
    the voters: equal to the torch truncation at the same ``m``; the same keep masks as
    the reference (which truncates at ``min(most, m_p)`` on the CPU); inf past a prompt."""
    lengths = [int(torch.randint(9, 300, ())) for _ in range(3)]
    voters, kc, table = _case(4, 64, torch.float32, lengths)
    probs = voter_probs_reference(voters, kc, table, [0, 1, 2], lengths, 0.125)
    probs[0, 0, 0, 3:9] = probs[0, 0, 0, 2]  # ties
    caps = [min(n, max(8, most)) for n in lengths]  # per-head caps, window (8) included
    most = max(caps)  # what the compressor passes: the largest cap
    got = min_mass_above_triton(probs, lengths, p, most)
    top = mass_above_top(probs, most).amin(2)
    for r, n in enumerate(lengths):
        torch.testing.assert_close(got[r, :, :n], top[r, :, :n], rtol=1e-6, atol=1e-7)
        assert torch.isinf(got[r, :, n:]).all()
    want = min_mass_above_reference(probs, lengths, p, most)
    kw = dict(window=8, nucleus_p=p, max_keeps=caps, pool_kernel=3)
    assert torch.equal(gvote_keep_masks(got, lengths, **kw), gvote_keep_masks(want, lengths, **kw))


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2],
                         ids=["e4m3fn", "e5m2"])
@pytest.mark.parametrize("group,dim", [(1, 64), (4, 128), (8, 64)])
def test_voter_probs_fp8_cache(group, dim, fp8):
    """An fp8 key cache (NaN outside the prompts) with a random scale: reference and
    Triton == the float64 reference on the dequantized keys (float64 voters), at the
    fp32 tolerance above."""
    from tests.kernels.test_triton_scoring import fp8_scale

    lengths = [int(torch.randint(9, 260, ())) for _ in range(3)]
    queries, kc, table = paged_prompts(lengths, 2, group, dim, window=8, dtype=torch.float32)
    k8 = (kc * 3).to(fp8)
    k_scale = fp8_scale()
    voters = gvote_voters(queries, 5, seed=1, layer_idx=2)
    assert voters.dtype == torch.float32
    order = [2, 0, 1]
    lens = [lengths[b] for b in order]
    want = voter_probs_reference(voters.double(), k8.double() * k_scale.double(), table, order,
                                 lens, dim**-0.5)
    ref = voter_probs_reference(voters, k8, table, order, lens, dim**-0.5, k_scale=k_scale)
    got = voter_probs_triton(voters, k8, table, order, lens, dim**-0.5, num_splits=3,
                             k_scale=k_scale)
    assert got.shape == ref.shape == want.shape == (3, 2, group * 6, max(lens))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(ref.double(), want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)

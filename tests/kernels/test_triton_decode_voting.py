"""GVote's voter probabilities at one decode event (issue 29), read in place from the
paged layout: the Triton kernels (run by the Triton interpreter on CPU) and the torch path
(``decode_voter_probs_event_reference``) against ``decode_voter_probs_reference`` in
float64 on the dense keys the layout was built from.

The events are ``test_triton_reselect``'s (fresh random each run, the seed in the failure
message): uneven per-head page counts with a head of no kept token, an empty tail, NaN in
every slot nobody may read, single-layer and pooled addressing. Voters are fresh random
queries ``[R, V, Hq, D]``. Tolerance 1e-5 (probabilities) for fp32 and fp8 caches.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from tests.kernels.test_triton_reselect import _event, _new_seed  # noqa: E402
from vllm_adakv.kernels import decode_voter_probs  # noqa: E402
from vllm_adakv.kernels.triton_decode_voting import decode_voter_probs_triton  # noqa: E402
from vllm_adakv.kernels.triton_reselect import MAX_SPLITS  # noqa: E402
from vllm_adakv.kernels.voting import (  # noqa: E402
    decode_voter_probs_event_reference,
    decode_voter_probs_reference,
)

F64 = torch.float64


def _voters(ev: dict, num_voters: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random voters ``[R, V, Hq, D]`` from the event's seed."""
    gen = torch.Generator().manual_seed(ev["seed"] + 1)
    rows, _, q_heads, dim = ev["queries"].shape
    return (torch.randn(rows, num_voters, q_heads, dim, generator=gen) * 1.5).to(dtype)


def _call(impl, voters: torch.Tensor, ev: dict, **kw) -> torch.Tensor:
    args = dict(ev["args"])
    width = args.pop("width")
    scale = args.pop("scale")
    cache = args.pop("key_cache")
    return impl(voters, cache, args.pop("page_start"), args.pop("kept_counts"),
                args.pop("block_table"), args.pop("rows"), ev["wkeys"].shape[2], width, scale,
                **args, **kw)


def _want(ev: dict, voters: torch.Tensor) -> torch.Tensor:
    return decode_voter_probs_reference(voters.to(F64), ev["keys"], ev["counts"], ev["wkeys"],
                                        ev["args"]["scale"])


def _close(got: torch.Tensor, want: torch.Tensor, ev: dict, tol: float) -> None:
    msg = f"seed {ev['seed']}"
    assert got.shape == want.shape, msg
    assert torch.isfinite(got).all(), msg
    torch.testing.assert_close(got.to(F64), want, atol=tol, rtol=tol, msg=msg)


CASES = [(1, 4, 3), (2, 4, 5), (4, 8, 9), (4, 5, 1), (2, 3, 40)]  # (group, window, voters)


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("group,window,num_voters", CASES)
def test_matches_float64_definition(group, window, num_voters, pooled):
    """The torch path (float64 voters) equals the dense float64 probabilities; the Triton
    kernels (fp32) match them to 1e-5, zeros in the candidate padding included."""
    ev = _event(_new_seed(), group, window, pooled=pooled)
    print(f"seed {ev['seed']}")
    voters = _voters(ev, num_voters)
    want = _want(ev, voters)
    ref = _call(decode_voter_probs_event_reference, voters.to(F64), ev)
    assert ref.dtype == F64
    _close(ref, want, ev, 1e-12)
    got = _call(decode_voter_probs_triton, voters, ev)
    assert got.dtype == torch.float32
    _close(got, want, ev, 1e-5)
    width = ev["args"]["width"]
    for r in range(got.shape[0]):
        for h in range(got.shape[1]):
            assert (got[r, h, :, int(ev["counts"][r, h]):width] == 0).all()
    torch.testing.assert_close(got.sum(-1).double(), torch.ones_like(want[..., 0]),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_splits", [1, 3, MAX_SPLITS, 10**3])
def test_key_splits(num_splits):
    """Statistics over 1 to ``MAX_SPLITS`` key splits (some empty; more are capped)."""
    ev = _event(_new_seed(), 2, 4, num_rows=2)
    print(f"seed {ev['seed']}")
    voters = _voters(ev, 5)
    _close(_call(decode_voter_probs_triton, voters, ev, num_splits=num_splits),
           _want(ev, voters), ev, 1e-5)


def test_strided_cache_view():
    """Keys viewed from FlashAttention's [nb, 2, bs, H, D] cache (non-contiguous)."""
    ev = _event(_new_seed(), 2, 4, layout="flash", pooled=True)
    print(f"seed {ev['seed']}")
    assert not ev["args"]["key_cache"].is_contiguous()
    voters = _voters(ev, 3)
    _close(_call(decode_voter_probs_triton, voters, ev), _want(ev, voters), ev, 1e-5)


@pytest.mark.parametrize("fp8,q_dtype", [(torch.float8_e4m3fn, torch.bfloat16),
                                         (torch.float8_e5m2, torch.float32)])
def test_fp8_cache(fp8, q_dtype):
    """fp8 keys read as ``value * k_scale``: both paths against float64 on the dequantized
    keys (bf16 voters: the reference sees the same rounded voters)."""
    ev = _event(_new_seed(), 2, 6, cache_dtype=fp8)
    print(f"seed {ev['seed']}")
    voters = _voters(ev, 4, q_dtype)
    want = _want(ev, voters)
    _close(_call(decode_voter_probs_event_reference, voters.to(F64), ev), want, ev, 1e-12)
    _close(_call(decode_voter_probs_triton, voters, ev), want, ev, 1e-5)


def test_dispatcher_runs_the_torch_path_on_cpu():
    ev = _event(_new_seed(), 2, 4, num_rows=2)
    print(f"seed {ev['seed']}")
    voters = _voters(ev, 3)
    got = _call(decode_voter_probs, voters, ev)
    assert got.dtype == torch.float32
    assert torch.equal(got, _call(decode_voter_probs_event_reference, voters, ev))
    _close(got, _want(ev, voters), ev, 1e-5)


def test_bad_input_is_refused():
    ev = _event(_new_seed(), 2, 4, num_rows=2)
    print(f"seed {ev['seed']}")
    voters = _voters(ev, 3)
    for impl in (decode_voter_probs_triton, decode_voter_probs_event_reference):
        with pytest.raises(ValueError, match="rows"):
            _call(impl, voters[:1], ev)
    with pytest.raises(ValueError, match="rows"):
        bad = {**ev, "args": {**ev["args"], "rows": ev["args"]["rows"][:, :5]}}
        _call(decode_voter_probs_triton, voters, bad)
    with pytest.raises(ValueError, match="float64"):
        _call(decode_voter_probs_triton, voters.to(F64), ev)
    with pytest.raises(ValueError, match="width"):
        _call(decode_voter_probs_triton, voters, {**ev, "args": {**ev["args"], "width": -1}})
    with pytest.raises(ValueError, match="do not match"):
        _call(decode_voter_probs_triton, voters[..., :-1], ev)
    # The torch path checks what the kernels cannot without a host sync.
    narrow = {**ev, "args": {**ev["args"], "width": int(ev["counts"].max()) - 1}}
    with pytest.raises(ValueError, match="do not fit in width"):
        _call(decode_voter_probs_event_reference, voters, narrow)
    late = ev["args"]["rows"].clone()
    late[0, 4] = late[0, 5] - 3  # a tail that starts inside the window of 4
    with pytest.raises(ValueError, match="must hold the window"):
        _call(decode_voter_probs_event_reference, voters,
              {**ev, "args": {**ev["args"], "rows": late}})

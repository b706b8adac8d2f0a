"""Ada-KV's safeguard in one Triton program (interpreter on CPU) == the torch reference.

Fresh random hit counts each run (ties included: many heads with equal hits and equal
remainders), every alpha regime (0, the default 0.2, large ones where the floor pushes
the sum above the total and units must be taken back), H from 1 to 40 (not a power of
two: padded lanes must not take part). The decode events' variant (per-head bounds,
device totals) likewise, including empty heads, bounds below the uniform share and
totals equal to every candidate; the seed is printed on failure.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from vllm_adakv.kernels.allocation import (  # noqa: E402
    safeguard_caps_heads,
    safeguard_caps_heads_reference,
    safeguard_caps_reference,
)
from vllm_adakv.kernels.triton_allocation import (  # noqa: E402
    safeguard_caps_heads_triton,
    safeguard_caps_triton,
)


def _random_hits(heads: int, selectable: int, candidates: int, clumped: bool) -> torch.Tensor:
    """Hits per head summing to heads * selectable, each at most ``candidates``."""
    total = heads * selectable
    weights = torch.rand(heads) ** (6 if clumped else 1)
    hits = torch.zeros(heads, dtype=torch.long)
    while int(hits.sum()) < total:
        room = candidates - hits
        draw = torch.multinomial(weights * (room > 0), 1)
        hits[draw] += 1
    return hits


@pytest.mark.parametrize("heads", [1, 2, 3, 8, 13, 40])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_matches_reference(heads, alpha):
    for clumped in (False, True):
        candidates = int(torch.randint(8, 60, ()))
        selectable = int(torch.randint(1, candidates, ()))
        hits = _random_hits(heads, selectable, candidates, clumped)
        want = safeguard_caps_reference(hits[None], [selectable], alpha, [candidates])
        got = safeguard_caps_triton(hits[None], [selectable], alpha, [candidates])
        assert got.dtype == torch.int64 and got.shape == (1, heads)
        assert torch.equal(got, want), (hits, selectable, alpha, candidates, got, want)
        assert int(got.sum()) == heads * selectable


def test_rows_are_independent():
    """Several rows in one launch: each equals its own single-row result."""
    heads, rows = 8, 5
    cands = [int(torch.randint(8, 60, ())) for _ in range(rows)]
    sels = [int(torch.randint(1, c, ())) for c in cands]
    hits = torch.stack([_random_hits(heads, s, c, bool(r % 2))
                        for r, (s, c) in enumerate(zip(sels, cands, strict=True))])
    got = safeguard_caps_triton(hits, sels, 0.2, cands)
    for r in range(rows):
        want = safeguard_caps_reference(hits[r:r + 1], [sels[r]], 0.2, [cands[r]])
        assert torch.equal(got[r:r + 1], want)


def test_ties_everywhere():
    """Equal hits on every head: the order falls back to the head index."""
    hits = torch.full((8,), 5, dtype=torch.long)
    for alpha in (0.3, 0.7):
        want = safeguard_caps_reference(hits[None], [5], alpha, [12])
        assert torch.equal(safeguard_caps_triton(hits[None], [5], alpha, [12]), want)


# Decode events: per-head upper bounds n[r, h] and device totals T[r]
# (``safeguard_caps_heads_triton`` == ``safeguard_caps_heads_reference``).

def _heads_case(gen: torch.Generator, rows: int, heads: int, regime: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (hits, totals, bounds) as ``adakv_counts_heads`` forms them: ``hits <= n``
    and ``sum hits = T <= sum n``. Regimes: ``mixed`` (any bounds, some heads empty),
    ``tight`` (most heads below the uniform share ``T / H``), ``full`` (``T = sum n``),
    ``equal`` (every head ``C``, ``T = H * s``: the prompt's case)."""
    def randint(low: int, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(low, high + 1, shape, generator=gen)

    if regime == "equal":
        cand = randint(2, 40, rows, 1)
        bounds = cand.expand(rows, heads).clone()
        totals = heads * torch.minimum(randint(1, 40, rows), cand[:, 0] - 1)
    else:
        bounds = randint(0, 40, rows, heads)
        bounds[torch.rand(rows, heads, generator=gen) < 0.25] = 0
        if regime == "tight":
            big = torch.rand(rows, heads, generator=gen) < 0.2
            bounds = torch.where(big, bounds + 60, bounds.clamp(max=6))
        room = bounds.sum(1)
        if regime == "full":
            totals = room
        else:
            low = room // 2 if regime == "tight" else torch.zeros_like(room)
            totals = low + (torch.rand(rows, generator=gen) * (room - low + 1)).long()
            totals = torch.minimum(totals, room)
    clumped = float(torch.rand((), generator=gen)) < 0.5
    hits = torch.zeros(rows, heads, dtype=torch.long)
    for r in range(rows):
        weights = torch.rand(heads, generator=gen) ** (6 if clumped else 1) + 1e-3
        for _ in range(int(totals[r])):
            draw = torch.multinomial(weights * (hits[r] < bounds[r]), 1, generator=gen)
            hits[r, draw] += 1
    return hits, totals, bounds


@pytest.mark.parametrize("regime", ["mixed", "tight", "full", "equal"])
@pytest.mark.parametrize("heads", [1, 3, 8, 13, 32])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
def test_heads_match_reference(heads, alpha, regime):
    """Several rows per launch, each with its own bounds and total; exact equality."""
    seed = random.SystemRandom().randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    hits, totals, bounds = _heads_case(gen, 4, heads, regime)
    want = safeguard_caps_heads_reference(hits, totals, alpha, bounds)
    got = safeguard_caps_heads_triton(hits, totals, alpha, bounds)
    msg = f"seed={seed} {regime} H={heads} alpha={alpha}\n{hits}\n{totals}\n{bounds}\n{got}\n{want}"
    assert got.dtype == torch.int64 and got.shape == (4, heads), msg
    assert torch.equal(got, want), msg
    assert torch.equal(got.sum(1), totals), msg
    assert bool((got >= 0).all() and (got <= bounds).all()), msg


def test_heads_equal_bounds_match_the_prompt_kernel():
    """Every head ``C`` and ``T = H * s``: the prompt's contract, same result."""
    seed = random.SystemRandom().randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    for alpha in (0.0, 0.2, 1.0):
        hits, totals, bounds = _heads_case(gen, 3, 8, "equal")
        sel, cand = (totals // 8).tolist(), bounds[:, 0].tolist()
        prompt = safeguard_caps_triton(hits, sel, alpha, cand)
        assert torch.equal(safeguard_caps_heads_triton(hits, totals, alpha, bounds), prompt), \
            f"seed={seed} alpha={alpha}"


def test_heads_edges():
    """Empty heads, a zero total, every candidate, non-contiguous and int32 inputs."""
    hits = torch.tensor([[0, 3, 0, 2], [0, 0, 0, 0], [1, 4, 0, 2]])
    bounds = torch.tensor([[0, 9, 0, 2], [0, 5, 7, 1], [1, 4, 0, 2]])
    totals = torch.tensor([5, 0, 7])
    for alpha in (0.0, 0.2, 1.0):
        want = safeguard_caps_heads_reference(hits, totals, alpha, bounds)
        assert torch.equal(want[1], torch.zeros(4, dtype=torch.long))
        assert torch.equal(want[2], bounds[2])
        assert torch.equal(safeguard_caps_heads_triton(hits, totals, alpha, bounds), want)
        got = safeguard_caps_heads_triton(hits.int(), totals.int(), alpha,
                                          bounds.t().contiguous().t().int())
        assert torch.equal(got, want)
    empty = torch.zeros(0, 4, dtype=torch.long)
    assert safeguard_caps_heads_triton(empty, totals[:0], 0.2, empty).shape == (0, 4)


@pytest.mark.parametrize("fn", [safeguard_caps_heads_reference, safeguard_caps_heads_triton,
                                safeguard_caps_heads])
def test_heads_refuse_bad_input(fn):
    hits = torch.tensor([[1, 2], [0, 3]])
    totals = torch.tensor([3, 3])
    bounds = torch.tensor([[4, 4], [4, 4]])
    bad = [
        (hits.double(), totals, 0.2, bounds, "integers"),
        (hits, totals.bool(), 0.2, bounds, "integers"),
        (hits, totals, 0.2, bounds.float(), "integers"),
        (hits[0], totals, 0.2, bounds, r"\[R, H\]"),
        (hits[:, :0], totals, 0.2, bounds[:, :0], r"\[R, H\]"),
        (hits, totals[:1], 0.2, bounds, "totals"),
        (hits, totals[:, None], 0.2, bounds, "totals"),
        (hits, totals, 0.2, bounds[:, :1], "num_candidates"),
        (hits, totals, -0.1, bounds, "alpha"),
        (hits, totals, 1.5, bounds, "alpha"),
        (hits, [3, 3], 0.2, bounds, "tensor"),
        (hits, totals.to("meta"), 0.2, bounds, "on meta"),
    ]
    for h, t, a, b, match in bad:
        with pytest.raises(ValueError, match=match):
            fn(h, t, a, b)


def test_adakv_counts_heads_on_the_triton_path(monkeypatch):
    """``adakv_counts_heads`` goes through ``allocation.safeguard_caps_heads``: with the
    Triton kernel in place of the reference it keeps the same counts."""
    from vllm_adakv.kernels import allocation
    from vllm_adakv.methods import adakv

    seed = random.SystemRandom().randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(3, 6, 20, generator=gen)
    counts = torch.randint(0, 21, (3, 6), generator=gen)
    want = adakv.adakv_counts_heads(scores, counts, [4, 9, 30], 0.2)
    calls = []

    def triton_path(*args):
        calls.append(args)
        return safeguard_caps_heads_triton(*args)

    monkeypatch.setattr(adakv, "safeguard_caps_heads", triton_path)
    assert allocation.safeguard_caps_heads is not triton_path
    got = adakv.adakv_counts_heads(scores, counts, [4, 9, 30], 0.2)
    assert calls and torch.equal(got, want), f"seed={seed}"


def test_heads_share_the_prompt_variant():
    """At one head count the decode events' launch compiles the same variant as the
    prompt's (unspecialised strides and table pointers): the warm-up's prompt launch
    covers it."""
    pytest.importorskip("triton.backends.nvidia")
    from tests.kernels.sm90_compile import record_launches, variant

    gen = torch.Generator().manual_seed(0)
    with record_launches() as prompt:
        hits, totals, bounds = _heads_case(gen, 2, 8, "equal")
        safeguard_caps_triton(hits, (totals // 8).tolist(), 0.2, bounds[:, 0].tolist())
    with record_launches() as heads:
        for regime in ("mixed", "full"):
            hits, totals, bounds = _heads_case(gen, 3, 8, regime)
            safeguard_caps_heads_triton(hits, totals, 0.2, bounds)
    assert {variant(r) for r in heads} == {variant(r) for r in prompt}

"""Ada-KV's safeguard in one Triton program (interpreter on CPU) == the torch reference.

Fresh random hit counts each run (ties included: many heads with equal hits and equal
remainders), every alpha regime (0, the default 0.2, large ones where the floor pushes
the sum above the total and units must be taken back), H from 1 to 40 (not a power of
two: padded lanes must not take part).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vllm_adakv.kernels.allocation import safeguard_caps_reference  # noqa: E402
from vllm_adakv.kernels.triton_allocation import safeguard_caps_triton  # noqa: E402


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

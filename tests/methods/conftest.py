"""Fixtures for the policy tests: fresh random inputs each run, seed shown on failure."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch


@dataclass
class Rng:
    seed: int
    gen: torch.Generator

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)

    def randint(self, low: int, high: int) -> int:
        """Uniform integer in [low, high]."""
        return int(torch.randint(low, high + 1, (1,), generator=self.gen))

    def __str__(self) -> str:
        return f"seed={self.seed}"


@pytest.fixture
def rng() -> Rng:
    seed = random.SystemRandom().randrange(2**31)
    return Rng(seed, torch.Generator().manual_seed(seed))

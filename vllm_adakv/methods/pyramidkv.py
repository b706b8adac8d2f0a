"""PyramidKV: per-layer budgets falling linearly with depth (mean over layers = budget)."""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Any

from .common import check_int
from .snapkv import SnapKV


def _lift_to_floor(values: list[Fraction], floor: int, total: int) -> list[Fraction]:
    """``max(floor, v - delta)`` with ``delta >= 0`` chosen so the sum stays ``total``.

    ``values`` must be non-increasing and ``total >= floor * len(values)``.
    """
    n = len(values)
    if values[-1] >= floor:
        return list(values)
    if total == floor * n:
        return [Fraction(floor)] * n
    for k in range(n, 0, -1):  # k = number of layers left above the floor
        delta = (sum(values[:k]) + (n - k) * floor - total) / k
        if values[k - 1] - delta >= floor and (k == n or values[k] - delta <= floor):
            return [max(Fraction(floor), v - delta) for v in values]
    raise AssertionError("unreachable: no feasible redistribution")  # pragma: no cover


def _largest_remainder(values: list[Fraction], total: int) -> list[int]:
    """Round to integers summing to ``total``; extra units go to the largest fractions
    (ties: lower index), which keeps a non-increasing sequence non-increasing."""
    ints = [math.floor(v) for v in values]
    extra = total - sum(ints)
    ranked = sorted(range(len(values)), key=lambda i: (-(values[i] - ints[i]), i))
    for i in ranked[:extra]:
        ints[i] += 1
    return ints


@functools.lru_cache(maxsize=256)
def _pyramid(budget: int, num_layers: int, window: int, beta: float) -> tuple[int, ...]:
    if num_layers == 1:
        return (budget,)
    total = budget * num_layers
    min_b = Fraction(budget) / Fraction(beta)
    top = 2 * budget - min_b
    step = (top - min_b) / (num_layers - 1)
    linear = [top - step * i for i in range(num_layers)]
    return tuple(_largest_remainder(_lift_to_floor(linear, window + 1, total), total))


def pyramid_layer_budgets(budget: int, num_layers: int, window: int,
                          beta: float = 20.0) -> list[int]:
    """Per-layer budgets (tokens per head, window included) for PyramidKV.

    Linear from ``2B - B/beta`` at layer 0 down to ``B/beta`` at the last layer, lifted to
    at least ``window + 1`` (taken evenly from the layers above, so the mean stays ``B``),
    rounded to non-increasing integers whose sum is exactly ``B * num_layers``.
    """
    budget = check_int("budget", budget, 1)
    num_layers = check_int("num_layers", num_layers, 1)
    window = check_int("window", window, 0)
    beta = float(beta)
    if not (math.isfinite(beta) and beta >= 1.0):
        raise ValueError(f"beta must be a finite number >= 1, got {beta}")
    if num_layers > 1 and budget < window + 1:
        raise ValueError(
            f"pyramidkv needs budget >= window + 1 (every layer keeps its window and at "
            f"least one more token), got budget={budget}, window={window}"
        )
    return list(_pyramid(budget, num_layers, window, beta))


class PyramidKV(SnapKV):
    """SnapKV's selection under per-layer budgets (``pyramid_layer_budgets``)."""

    name = "pyramidkv"

    def layer_budgets(self, cfg: Any, prompt_len: int, num_layers: int) -> tuple[int, ...]:
        budgets = pyramid_layer_budgets(cfg.budget, num_layers, cfg.window, cfg.pyramid_beta)
        return tuple(min(prompt_len, b) for b in budgets)

    def decode_layer_budgets(self, cfg: Any, budget: int, num_layers: int) -> tuple[int, ...]:
        """The pyramid schedule of the decode budget (unclamped)."""
        return tuple(pyramid_layer_budgets(budget, num_layers, cfg.window, cfg.pyramid_beta))

"""Scorers: how much future queries will attend each candidate, for the scored methods.

SnapKV, Ada-KV and PyramidKV select from the scores of one scorer (``--kv-scorer``,
per request ``kv_scorer``), as kvpress's presses wrap a scorer:

- ``window`` (default): the observation window's queries, the last ``w`` prompt tokens
  (``kernels.score_windows``). When the question ends the prompt this is the question
  asking; when it comes later (a shared prefix, a chat's earlier turns) it is whatever
  the context's last tokens were.
- ``expected``: the queries to come, modelled from the whole prompt's. A Gaussian is
  fitted to the prompt's queries before RoPE (mean and covariance over the prompt tokens
  this request computed, ``kernels.unrotated_moments``), moved to the ``FUTURE_POSITIONS``
  positions after the prompt by the averaged rotation, and each key is scored by the
  attention that Gaussian is expected to pay it (``kernels.score_expected``: logit
  ``s mu.k + s^2 k^T S k / 2``, softmax over the whole prompt), reduced over each GQA
  group, then pooled over the candidates ``[0, L - w)`` only, as the window scorer pools.
  This is the expected attention of arXiv 2510.00636 without its value-norm weighting.
Pure torch, no vLLM imports.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from vllm_adakv import kernels
from vllm_adakv.kernels.scoring import pool_rows

from .base import LayerRows

# Positions after the prompt whose rotations the expected query averages (kvpress's
# default for its expected attention).
FUTURE_POSITIONS = 512
# The first prompt positions are left out of the mean query: attention-sink tokens carry
# outlier activations (kvpress drops the same four).
FIRST_POSITIONS_SKIPPED = 4


class Scorer:
    """Scores ``[R, H, >= Lmax - w]`` (fp32, -inf padding) of one layer's candidates."""

    name: ClassVar[str]
    # What the worker keeps of each prompt for it: the window's queries, or the running
    # sum of the prompt's queries before RoPE.
    needs_query_sums: ClassVar[bool] = False

    def scores(self, batch: LayerRows) -> torch.Tensor:
        raise NotImplementedError

    def _score(self, queries: torch.Tensor, batch: LayerRows, pool_kernel: int
               ) -> torch.Tensor:
        cfg = batch.cfg
        return kernels.score_windows(
            queries, batch.key_cache, batch.block_table, batch.rows, batch.prompt_lens,
            batch.scale, gqa_reduce=cfg.gqa_reduce, pooling=cfg.pooling,
            pool_kernel=pool_kernel, k_scale=batch.k_scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class WindowScorer(Scorer):
    """The last ``w`` prompt queries (SnapKV's observation window)."""

    name = "window"

    def scores(self, batch: LayerRows) -> torch.Tensor:
        if batch.window_queries is None:
            raise ValueError("the window scorer needs the batch's window_queries")
        return self._score(batch.window_queries, batch, batch.cfg.pool_kernel)


class ExpectedScorer(Scorer):
    """The prompt's query Gaussian, moved to the positions to come."""

    name = "expected"
    needs_query_sums = True

    def scores(self, batch: LayerRows) -> torch.Tensor:
        if batch.future_queries is None or batch.future_covariances is None:
            raise ValueError("the expected scorer needs the batch's future_queries and "
                             "future_covariances")
        cfg = batch.cfg
        raw = kernels.score_expected(
            batch.future_queries[:, 0], batch.future_covariances, batch.key_cache,
            batch.block_table, batch.rows, batch.prompt_lens, batch.scale,
            gqa_reduce=cfg.gqa_reduce, k_scale=batch.k_scale)
        candidates = [n - cfg.window for n in batch.prompt_lens]
        return pool_rows(raw[..., : max(candidates)], candidates, cfg.pooling,
                         cfg.pool_kernel)


SCORERS: dict[str, Scorer] = {s.name: s for s in (WindowScorer(), ExpectedScorer())}
SCORER_NAMES: tuple[str, ...] = tuple(SCORERS)

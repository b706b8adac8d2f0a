"""What a compression method is: the questions the rest of the package asks about one.

Pure torch: nothing here imports vLLM or either side of the package (scheduler,
worker). A method is one object; the registry (``methods/__init__.py``) maps its name
to it. The scheduler side asks it how much memory a prompt keeps (``budget``,
``layer_budgets``, ``uniform``, ``measured``); the worker side asks it what it needs
(``needs_window_queries``) and for the keep masks of one layer over a batch of
requests (``keep_masks``); during decoding, for the re-selection of one event
(``reselect``, ``DecodeRows``; docs/decode-compression.md). Settings come as the
package's ``KVCompressionConfig`` (any object with the same attributes).

Notation: ``H`` KV heads, prompt length ``L``, window ``w`` (the last ``w`` prompt
tokens, always kept), candidates ``0..C-1`` with ``C = L - w``; a budget is tokens
kept per head *including* the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from vllm_adakv.tensors import on_device

from .common import check_int

if TYPE_CHECKING:
    from vllm_adakv.config import KVCompressionConfig


@dataclass(frozen=True)
class LayerRows:
    """One layer of ``R`` requests selected together (same settings but the budget).

    Keys are read in place from the paged cache: ``key_cache`` is the layer's logical
    ``[num_blocks, H, block_size, D]`` view and row ``r``'s blocks are
    ``block_table[rows[r]]``; an fp8 cache holds ``key / k_scale``.
    """

    cfg: KVCompressionConfig
    layer_idx: int
    prompt_lens: list[int]
    budgets: list[int]  # per row: tokens per head in this layer, window included
    key_cache: torch.Tensor
    block_table: torch.Tensor
    rows: list[int]
    scale: float
    window_queries: torch.Tensor | None = None  # [R, w, Hq, D] after RoPE
    # The expected scorer's query Gaussian per row and query head (methods.scorers): its
    # mean [R, 1, Hq, D] and covariance [R, Hq, D, D].
    future_queries: torch.Tensor | None = None
    future_covariances: torch.Tensor | None = None
    tp_shard: tuple[int, int] = (0, 1)  # (rank, size) of this worker's heads
    # An fp8 ``key_cache``'s key scale (one-element float32 on its device; None = 1),
    # passed to every kernel that reads keys; ignored for other caches.
    k_scale: torch.Tensor | None = None

    @property
    def num_heads(self) -> int:
        return self.key_cache.shape[1]


@dataclass(frozen=True)
class DecodeRows:
    """One decode-time event of one layer for ``R`` requests (dense, gathered inputs).

    Row ``r`` holds ``S_r = seq_lens[r]`` tokens; its window is the last ``w`` positions
    ``[S_r - w, S_r)``, held by every head and always kept. The candidates of head ``h``
    are the other tokens it holds (its kept tokens, then the tail outside the window), in
    position order: ``keys[r, h, :n]`` with ``n = num_candidates[r, h]``, padding after.
    Positions are true positions (keys keep their RoPE); the selection reads only their
    order, ``positions`` is checked, not used.
    """

    cfg: KVCompressionConfig
    layer_idx: int
    budgets: list[int]  # per row: tokens per head after the event, window included
    keys: torch.Tensor  # [R, H, Cmax, D] candidates per head, position order, padded
    num_candidates: torch.Tensor  # [R, H] integer
    positions: torch.Tensor  # [R, H, Cmax] integer true positions (padding: any)
    window_keys: torch.Tensor  # [R, H, w, D] keys of positions [S_r - w, S_r)
    window_queries: torch.Tensor  # [R, w, Hq, D] queries of the same positions, after RoPE
    seq_lens: list[int]
    scale: float
    tp_shard: tuple[int, int] = (0, 1)  # (rank, size) of this worker's heads (GVote noise)

    @property
    def num_heads(self) -> int:
        return self.keys.shape[1]


class Method:
    """A compression method; subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    compresses: ClassVar[bool] = True  # False: vanilla vLLM (the ``none`` method)
    # The worker keeps the observation window's queries of the prompt for it.
    needs_window_queries: ClassVar[bool] = False
    # Every head of a layer keeps the same number of tokens (else the layer's total is
    # split unevenly: the memory plan then bounds the partial last pages).
    uniform: ClassVar[bool] = True
    # The kept set is known only after selection: memory is planned at the budget (a
    # cap) and the workers report the blocks they used.
    measured: ClassVar[bool] = False
    # Kernel families the worker compiles at start for it (``kernels.warmup``).
    kernels: ClassVar[frozenset[str]] = frozenset()
    # It selects from a scorer's scores (``--kv-scorer``, ``methods.scorers``).
    takes_scorer: ClassVar[bool] = False
    # Its decode-time re-selection reads the window's scores of the candidates
    # (``select_candidates`` takes them; False: it needs only their counts).
    decode_scored: ClassVar[bool] = True

    def validate(self, cfg: KVCompressionConfig) -> None:
        """Raise ValueError (naming the flag) for settings this method cannot run."""

    def budget(self, cfg: KVCompressionConfig, prompt_len: int) -> int:
        """Mean tokens per head a prompt keeps (a cap for measured methods); a prompt not
        longer than this is left alone."""
        return cfg.budget

    def layer_budgets(self, cfg: KVCompressionConfig, prompt_len: int,
                      num_layers: int) -> tuple[int, ...]:
        """Tokens per head of each of the model's layers, window included, at most
        ``prompt_len``."""
        return (min(prompt_len, self.budget(cfg, prompt_len)),) * num_layers

    def keep_masks(self, batch: LayerRows) -> torch.Tensor:
        """Bool ``[R, H, Lmax]`` (True = kept): row ``r`` keeps its window and its
        selection within its first ``prompt_lens[r]`` positions, nothing past them."""
        raise NotImplementedError

    def decode_layer_budgets(self, cfg: KVCompressionConfig, budget: int,
                             num_layers: int) -> tuple[int, ...]:
        """Tokens per head each layer keeps after a decode event (window included) for the
        decode budget ``budget`` (unclamped: the sequence keeps growing)."""
        budget = check_int("decode budget", budget, 1)
        return (budget,) * check_int("num_layers", num_layers, 1)

    def reselect(self, event: DecodeRows) -> torch.Tensor:
        """Bool ``[R, H, Cmax]`` over the event's candidates (True = kept; padding never
        kept). The window is not in it: it is always kept."""
        raise ValueError(f"method {self.name!r} has no decode-time re-selection")

    def select_candidates(self, scores: torch.Tensor | None, num_candidates: torch.Tensor,
                          selectable: list[int], cfg: KVCompressionConfig, width: int
                          ) -> torch.Tensor:
        """``reselect``'s keep mask ``[R, H, width]`` from the candidates' scores
        ``[R, H, width]`` (pooled, -inf padding; None when ``decode_scored`` is False),
        their counts ``[R, H]`` and each row's selectable ``budget - w``: the part after
        the checks and the scoring, which the CUDA backend scores in place
        (``kernels.score_decode_event``). No host sync on CUDA."""
        raise ValueError(f"method {self.name!r} has no decode-time re-selection")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_decode_rows(event: DecodeRows) -> list[int]:
    """Validate one decode event; returns each row's selectable count ``budget - w``.

    Raises ValueError naming what is wrong. Reads the candidate counts and positions back
    to the host (a reference-path check)."""
    keys, counts, positions = event.keys, event.num_candidates, event.positions
    wkeys, wq = event.window_keys, event.window_queries
    window = check_int("window", event.cfg.window, 1)
    for name, t, dims in (("keys", keys, 4), ("num_candidates", counts, 2),
                          ("positions", positions, 3), ("window_keys", wkeys, 4),
                          ("window_queries", wq, 4)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            raise ValueError(f"{name} must be a {dims}-D torch.Tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
    rows, heads, width, dim = keys.shape
    if heads < 1:
        raise ValueError("keys must have at least one KV head")
    if tuple(counts.shape) != (rows, heads) or tuple(positions.shape) != (rows, heads, width):
        raise ValueError(f"num_candidates {tuple(counts.shape)} and positions "
                         f"{tuple(positions.shape)} must be [R, H] = {[rows, heads]} and "
                         f"[R, H, Cmax] = {[rows, heads, width]}")
    if tuple(wkeys.shape) != (rows, heads, window, dim):
        raise ValueError(f"window_keys must be [R, H, w, D] = {[rows, heads, window, dim]} "
                         f"(w = cfg.window), got {tuple(wkeys.shape)}")
    if wq.shape[0] != rows or wq.shape[1] != window or wq.shape[3] != dim \
            or wq.shape[2] % heads:
        raise ValueError(f"window_queries must be [R, w, Hq, D] = [{rows}, {window}, "
                         f"k * {heads}, {dim}], got {tuple(wq.shape)}")
    if counts.dtype.is_floating_point or positions.dtype.is_floating_point:
        raise ValueError("num_candidates and positions must be integer tensors")
    if len(event.budgets) != rows or len(event.seq_lens) != rows:
        raise ValueError(f"{rows} rows but {len(event.budgets)} budgets and "
                         f"{len(event.seq_lens)} seq_lens")
    selectable = []
    host_counts = counts.tolist()
    for r, (budget, seq_len) in enumerate(zip(event.budgets, event.seq_lens, strict=True)):
        budget = check_int("decode budget", budget, 0)
        if budget <= window:
            raise ValueError(f"decode budget ({budget}) must be greater than the window "
                             f"({window}): the budget includes the window")
        seq_len = check_int("seq_len", seq_len, window)
        n = host_counts[r]
        if min(n) < 0 or max(n) > min(width, seq_len - window):
            raise ValueError(f"row {r}: num_candidates {n} must lie in [0, min(Cmax, "
                             f"seq_len - w)] = [0, {min(width, seq_len - window)}]")
        for h, c in enumerate(n):
            pos = positions[r, h, :c]
            if c and (int(pos[0]) < 0 or int(pos[-1]) >= seq_len - window
                      or bool((pos[1:] <= pos[:-1]).any())):
                raise ValueError(f"row {r}, head {h}: candidate positions must increase "
                                 f"strictly within [0, seq_len - w) = [0, {seq_len - window})")
        selectable.append(budget - window)
    return selectable


def window_mask(prompt_lens: list[int], window: int, num_heads: int, width: int,
                device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool ``[R, 1, width]`` in-prompt positions, bool ``[R, 1, width]`` window
    positions ``[L_r - w, L_r)``)."""
    pos = torch.arange(width, device=device)
    lengths = on_device(prompt_lens, torch.long, device)[:, None, None]
    in_prompt = pos < lengths
    return in_prompt, (pos >= lengths - window) & in_prompt


def with_window(candidates: torch.Tensor, prompt_lens: list[int], window: int
                ) -> torch.Tensor:
    """Keep masks ``[R, H, Lmax]`` from candidate masks ``[R, H, >= Lmax - w]``: row ``r``'s
    candidates ``[0, C_r)`` then its window ``[C_r, L_r)``, always kept."""
    rows, heads = candidates.shape[:2]
    width = max(prompt_lens)
    _, in_window = window_mask(prompt_lens, window, heads, width, candidates.device)
    mask = torch.zeros(rows, heads, width, dtype=torch.bool, device=candidates.device)
    mask[..., : width - window] = candidates[..., : width - window]
    return mask | in_window

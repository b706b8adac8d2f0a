"""What a compression method is: the questions the rest of the package asks about one.

Pure torch: nothing here imports vLLM or either side of the package (scheduler,
worker). A method is one object; the registry (``methods/__init__.py``) maps its name
to it. The scheduler side asks it how much memory a prompt keeps (``budget``,
``layer_budgets``, ``uniform``, ``measured``); the worker side asks it what it needs
(``needs_window_queries``) and for the keep masks of one layer over a batch of
requests (``keep_masks``). Settings come as the package's ``KVCompressionConfig``
(any object with the same attributes).

Notation: ``H`` KV heads, prompt length ``L``, window ``w`` (the last ``w`` prompt
tokens, always kept), candidates ``0..C-1`` with ``C = L - w``; a budget is tokens
kept per head *including* the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from vllm_adakv.tensors import on_device

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
    # The expected scorer's one query per row and head, [R, 1, Hq, D] (methods.scorers).
    future_queries: torch.Tensor | None = None
    tp_shard: tuple[int, int] = (0, 1)  # (rank, size) of this worker's heads
    # An fp8 ``key_cache``'s key scale (one-element float32 on its device; None = 1),
    # passed to every kernel that reads keys; ignored for other caches.
    k_scale: torch.Tensor | None = None

    @property
    def num_heads(self) -> int:
        return self.key_cache.shape[1]


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

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


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

"""Question-agnostic mode: feed the question after compression, as forced decode tokens.

vLLM compresses a request's KV cache when its prompt's prefill completes, and a later
request cannot reuse that cache (compressed requests stay out of the prefix cache). So the
only way to ask a question *after* the context was compressed, within one request, is
to make the question part of the generated sequence: the prompt is the context alone,
and this logits processor forces the first ``len(forced)`` sampled tokens to be the
question's tokens (``SamplingParams.extra_args["adakv_forced"]``). Each forced token is
then processed by the decode path, attending to the compressed prompt cache plus the
uncompressed tail: exactly "context compressed before the question arrives". The tokens
and positions are the same as in the question-aware prompt; only what the cache holds
when the question is read differs (and decode vs prefill arithmetic).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

EXTRA_ARG = "adakv_forced"


def _forcer(forced: list[int]) -> Callable[[list[int], torch.Tensor], torch.Tensor]:
    def apply(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        n = len(output_ids)
        if n >= len(forced):
            return logits
        out = torch.full_like(logits, float("-inf"))
        out[forced[n]] = 0.0
        return out

    return apply


class ForcedPrefix(AdapterLogitsProcessor):
    """Per request: the first sampled tokens are ``extra_args["adakv_forced"]``."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        forced = (params.extra_args or {}).get(EXTRA_ARG)
        return _forcer(list(forced)) if forced else None

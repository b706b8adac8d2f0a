"""The compression methods, one object each, by name.

Pure torch, no vLLM imports. Everything that depends on the method (config
validation and CLI choices, per-request overrides, memory planning, the worker's
selection, kernel warm-up, metric labels, the all-methods tests) reads this
registry instead of comparing names. Adding a method: docs/adding-a-method.md.
"""

from __future__ import annotations

from .adakv import AdaKV
from .base import LayerRows, Method
from .gvote import GVote
from .none import NoCompression
from .pyramidkv import PyramidKV
from .snapkv import SnapKV
from .streamingllm import StreamingLLM

REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (NoCompression(), SnapKV(), AdaKV(SnapKV()), PyramidKV(), StreamingLLM(), GVote())
}
METHOD_NAMES: tuple[str, ...] = tuple(REGISTRY)


def get_method(name: str) -> Method:
    """The method called ``name``; ValueError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown compression method {name!r}; expected one of "
                         f"{METHOD_NAMES}") from None


__all__ = ["METHOD_NAMES", "REGISTRY", "LayerRows", "Method", "get_method"]

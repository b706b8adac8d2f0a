"""``triton.jit`` for kernels whose arguments vary from request to request.

Triton compiles one variant of a kernel per *specialisation* of its integer and
pointer arguments (an int equal to 1 or divisible by 16, a pointer aligned to 16
bytes). An argument such as a prompt length takes both kinds of values in
production, so each new kind would compile a new variant in the middle of a
forward pass (about a second each). Arguments named here are not specialised:
one variant serves every value, and the start-up warm-up (``kernels.warmup``)
compiles it before the first request.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import triton

_HAS_ALIGNMENT_FLAG = "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters


def jit_unspecialized(ints: Sequence[str] = (), pointers: Sequence[str] = ()
                      ) -> Callable:
    """``triton.jit`` with no value specialisation of ``ints`` and, where this Triton
    supports it, no alignment specialisation of ``pointers``."""
    kwargs: dict = {"do_not_specialize": list(ints)}
    if pointers and _HAS_ALIGNMENT_FLAG:
        kwargs["do_not_specialize_on_alignment"] = list(pointers)
    return triton.jit(**kwargs)

"""The converted SmolLM2-135M-Instruct for end-to-end tests on a real model."""

from __future__ import annotations

from pathlib import Path

import pytest


def smollm2_dir() -> Path:
    """Prepare (or reuse) SmolLM2 with ``prepare_model``; skip if the GGUF is unreachable."""
    from adakv_devtools import prepare_model as pm

    try:
        return pm.prepare_model("smollm2")
    except pm.PrepareError as e:
        if e.code in (pm._EXIT_NO_GGUF, pm._EXIT_MISSING_DEP):
            pytest.skip(f"SmolLM2 cannot be prepared here: {e}")
        raise

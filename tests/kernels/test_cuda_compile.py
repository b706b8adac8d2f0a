"""The decode kernels compile for an H100/H200 (sm_90) on this CPU-only machine.

The Triton interpreter runs a kernel's Python source: code that only the compiler
rejects (a name bound in one branch of a dynamic ``if``, a reassigned constexpr) passes
there and fails on the GPU. Triton's NVIDIA backend (LLVM and ptxas ship in its wheel)
compiles to a cubin without a GPU, so the variants the engine launches are compiled here;
the test reports each one's registers and stack (spills) from ``cuobjdump``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia")
from tests.kernels.sm90_compile import FORWARD_VARIANTS, ptxas_available  # noqa: E402

if not ptxas_available():
    pytest.skip("no ptxas for Triton's NVIDIA backend", allow_module_level=True)


def test_decode_kernels_compile_for_sm90():
    """Every variant the engine launches (and the options) compiles to a cubin; the
    registers and stack of each are printed (``-s``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-m", "tests.kernels.sm90_compile"], cwd=root,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    print("\n".join(json.dumps(line) for line in lines))
    assert [line["variant"] for line in lines if line["kernel"] == "_headwise_fwd"] == \
        FORWARD_VARIANTS
    assert len(lines) == len(FORWARD_VARIANTS) + 2
    assert all(line["cubin_bytes"] > 0 for line in lines)

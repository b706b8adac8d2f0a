"""The Triton kernels compile for an H100/H200 (sm_90) on this CPU-only machine.

The Triton interpreter runs a kernel's Python source: code that only the compiler
rejects (a name bound in one branch of a dynamic ``if``, a reassigned constexpr) passes
there and fails on the GPU. Triton's NVIDIA backend (LLVM and ptxas ship in its wheel)
compiles to a cubin without a GPU: the decode kernels at the engine's shape, and every
kernel the package launches with the arguments the interpreter tests launch it with
(recorded here, compiled in a subprocess without the interpreter), each on its CUDA path:
one compile per variant (``sm90_compile.variant``), e.g. compaction in place and into
destination blocks share theirs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton.backends.nvidia")
from tests.kernels.sm90_compile import (  # noqa: E402
    FORWARD_VARIANTS,
    LAUNCHED,
    SM90_MAX_SHARED,
    TILE_SHAPES,
    ptxas_available,
    record_launches,
    variant,
)

if not ptxas_available():
    pytest.skip("no ptxas for Triton's NVIDIA backend", allow_module_level=True)


def _launch_every_kernel(monkeypatch) -> None:
    """Interpreter tests that between them launch every kernel in ``LAUNCHED`` (in fp32,
    bf16 and fp16 where the kernel takes either), and those that read or move the cache
    on fp8 caches (e4m3 and e5m2; bf16 queries where the kernel takes them)."""
    from tests.kernels import (
        test_compaction_dst,
        test_expected,
        test_pooling,
        test_ranges,
        test_recompact,
        test_triton_allocation,
        test_triton_decode,
        test_triton_decode_voting,
        test_triton_reselect,
        test_triton_scoring,
        test_triton_voting,
    )

    test_triton_scoring.test_fp32_matches_reference(4, 128)
    test_triton_scoring.test_low_precision(torch.bfloat16)
    test_triton_scoring.test_rows_of_different_lengths("max", 7)
    test_triton_reselect.test_matches_float64_definition(4, 8, "avg", "max", 5, True)
    test_triton_reselect.test_matches_float64_definition(2, 4, "max", "mean", 7, False)
    test_triton_reselect.test_low_precision_cache()
    test_triton_voting.test_voter_probs_match_reference(4, 128, torch.bfloat16)
    test_triton_voting.test_min_mass_above_matches_reference(0.9, 40)
    test_triton_decode_voting.test_matches_float64_definition(4, 8, 9, True)
    test_triton_decode_voting.test_matches_float64_definition(2, 3, 40, False)
    test_triton_allocation.test_matches_reference(8, 0.2)
    test_triton_allocation.test_heads_match_reference(8, 0.2, "mixed")
    test_expected.test_triton_unrotated_moments_match_the_reference(True, 64, 64, torch.bfloat16)
    test_expected.test_triton_unrotated_moments_match_the_reference(False, 32, 64, torch.float32)
    test_ranges.test_triton_compaction_rows_match_reference(torch.bfloat16)
    test_pooling.test_triton_pooled_compaction_matches_reference(
        torch.bfloat16, 4, 64, "given", True, monkeypatch)
    test_compaction_dst.test_triton_rows_into_fresh_blocks_match_reference(
        torch.bfloat16, 8, 32, "strided")
    test_compaction_dst.test_triton_pooled_rows_into_fresh_blocks_match_reference(
        torch.bfloat16, 4, 64, "given", True, "strided", monkeypatch)
    test_recompact.test_triton_matches_reference(torch.bfloat16)
    test_triton_decode.test_low_precision(torch.float16, 2)
    test_triton_decode.test_low_precision(torch.bfloat16, 2)
    test_pooling.test_triton_pooled_decode_low_precision(torch.bfloat16)
    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
    test_triton_scoring.test_fp8_cache_matches_dequantized_definition(4, e4m3, torch.bfloat16)
    test_triton_scoring.test_fp8_cache_matches_dequantized_definition(8, e5m2, torch.float32)
    test_triton_voting.test_voter_probs_fp8_cache(4, 128, e4m3)
    test_triton_reselect.test_fp8_cache(e4m3, torch.bfloat16)
    test_triton_decode_voting.test_fp8_cache(e4m3, torch.bfloat16)
    test_compaction_dst.test_triton_rows_into_fresh_blocks_match_reference(e4m3, 2, 32, "fresh")
    test_recompact.test_triton_matches_reference(e4m3)
    test_compaction_dst.test_triton_pooled_rows_into_fresh_blocks_match_reference(
        e4m3, 4, 64, "given", True, "fresh", monkeypatch)
    test_triton_decode.test_fp8_cache_matches_dequantized_reference(4, e4m3, torch.bfloat16)
    test_triton_decode.test_fp8_cache_matches_dequantized_reference(8, e5m2, torch.bfloat16)
    test_triton_decode.test_fp8_pooled(e4m3)


def test_launched_lists_every_kernel_launch():
    """``LAUNCHED`` names every kernel a ``triton_*`` module launches (``name[grid](``)."""
    import importlib
    import re

    kernels_dir = Path(__file__).resolve().parents[2] / "vllm_adakv" / "kernels"
    found = {}
    for path in sorted(kernels_dir.glob("triton_*.py")):
        module = f"vllm_adakv.kernels.{path.stem}"
        mod = importlib.import_module(module)
        names = {n for n in re.findall(r"\b(_\w+)\[", path.read_text())
                 if hasattr(getattr(mod, n, None), "add_pre_run_hook")}
        if names:
            found[module] = names
    assert found == {m: set(names) for m, names in LAUNCHED.items()}


def test_every_kernel_compiles_for_sm90(monkeypatch, tmp_path):
    """The decode variants the engine launches at its shape, and every launched kernel as
    the interpreter tests launch it, compile to a cubin; registers and stack are printed
    (``-s``)."""
    with record_launches() as records:
        _launch_every_kernel(monkeypatch)
    launched = {name for names in LAUNCHED.values() for name in names}
    assert {r["kernel"] for r in records} == launched
    unique = list({variant(r): r for r in records}.values())
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(unique))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-m", "tests.kernels.sm90_compile", str(path)],
                         cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    print("\n".join(json.dumps(line) for line in lines))
    engine = [line for line in lines if "variant" in line]
    assert [line["variant"] for line in engine if line["kernel"] == "_headwise_fwd"] == \
        FORWARD_VARIANTS
    assert len(engine) == len(FORWARD_VARIANTS) + 2
    recorded = [line for line in lines if "recorded" in line]
    assert len(recorded) == len(unique)
    assert {line["kernel"] for line in recorded} == launched
    assert all(line["cubin_bytes"] > 0 for line in lines)
    # The safeguard's quotas round as torch's do: no fused multiply-add in fp64.
    assert all(line["fma_f64"] == 0 for line in recorded if line["kernel"] == "_safeguard_caps")


def test_default_decode_tiles_fit_in_shared_memory():
    """The decode's default tile fits an H100's shared memory at every shape of
    ``TILE_SHAPES`` (fp32 or bf16 queries, fp32/bf16/fp8 caches, head_dim 128-256); 128-token
    tiles at fp32 and head_dim 256 did not (287 KB, 344 KB on an fp8 cache)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-m", "tests.kernels.sm90_compile", "--tiles"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    print("\n".join(json.dumps(line) for line in lines))
    assert [line["shape"] for line in lines] == [list(shape) for shape in TILE_SHAPES]
    assert all(line["shared"] <= SM90_MAX_SHARED for line in lines), lines

"""Compile the decode kernels for sm_90 (H100/H200) without a GPU; run without
TRITON_INTERPRET (the test suite interprets kernels, and an interpreted kernel cannot be
compiled): ``python -m tests.kernels.sm90_compile`` prints one JSON line per variant.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vllm_adakv.kernels import triton_decode as td

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def ptxas_available() -> bool:
    """Whether Triton's NVIDIA backend can assemble a cubin here (its wheel ships ptxas)."""
    return os.path.exists(os.path.join(_BIN, "ptxas")) or shutil.which("ptxas") is not None

_SM90 = GPUTarget("cuda", 90, 32)
_BF16_PTRS = ("q_ptr", "k_ptr", "v_ptr", "out_ptr")
_FP32_PTRS = ("mid_acc_ptr", "mid_m_ptr", "mid_l_ptr")


def _signature(fn: triton.JITFunction, constexprs: dict) -> dict[str, str]:
    """Triton types of ``fn``'s parameters: bf16 activations, fp32 scratch, int32
    tables, fp32 scale, int32 integers (strides too: Triton passes ints below 2**31 so)."""
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _BF16_PTRS:
            sig[name] = "*bf16"
        elif name in _FP32_PTRS:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*i32"
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


# Innermost strides of contiguous activations and caches: 1, which Triton specialises as
# a constant at launch (what lets it vectorise the K/V loads).
_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od")


def _specialised(fn: triton.JITFunction, constexprs: dict) -> tuple[dict, dict]:
    """(constexprs, attrs) as a launch on real tensors specialises: unit innermost strides
    become constants; other integers and pointers not excluded from specialisation
    (``jit_unspecialized``) are taken divisible by 16, as aligned tensors' are."""
    consts = dict(constexprs)
    consts.update({name: 1 for name in _UNIT_STRIDES if name in fn.arg_names})
    no_value = set(fn.do_not_specialize or ())
    no_align = set(getattr(fn, "do_not_specialize_on_alignment", None) or ())
    sig = _signature(fn, consts)
    attrs = {}
    for idx, name in enumerate(fn.arg_names):
        kind = sig[name]
        if kind == "constexpr" or kind == "fp32":
            continue
        if (kind.startswith("*") and name not in no_align) or (
                not kind.startswith("*") and name not in no_value):
            attrs[(idx,)] = [["tt.divisibility", 16]]
    return consts, attrs


def _compile(fn: triton.JITFunction, constexprs: dict, **options):
    consts, attrs = _specialised(fn, constexprs)
    src = ASTSource(fn, _signature(fn, consts), consts, attrs)
    return triton.compile(src, target=_SM90, options={"num_warps": 4, "num_stages": 3,
                                                      **options})


def _resources(kernel) -> str:
    """cuobjdump's resource line of the compiled cubin (registers, stack, shared)."""
    tool = os.path.join(_BIN, "cuobjdump")
    if not os.path.exists(tool):
        return "(no cuobjdump)"
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"adakv-{kernel.metadata.hash}.cubin")
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.remove(path)
    return " ".join(line.strip() for line in out.splitlines() if "REG:" in line)


# Llama-3.1-8B decode (8 KV heads, GQA 4, d=128, block size 16, 128-token tiles), as
# ``_launch`` sets them for bf16 on CUDA.
_ENGINE = dict(NUM_KV_HEADS=8, GROUP=4, BLOCK_SIZE=16, HEAD_DIM=128, SPLIT=False,
               BALANCED=False, BLOCK_H=8, PAGE_RANGES=True, POOLED=True, PAGES=8, BLOCK_G=4,
               BLOCK_Q=4, BLOCK_N=128, BLOCK_D=128, USE_DOT=True, DOT_PRECISION="tf32",
               DOT_FP32=False, EARLY_TABLES=False)


FORWARD_VARIANTS = [
    {},  # the engine's default: pooled tables, one split
    {"SPLIT": True, "BALANCED": True},  # the balanced default at 17-65 rows
    {"EARLY_TABLES": True},
    {"EARLY_TABLES": True, "SPLIT": True, "BALANCED": True, "POOLED": False},
    {"POOLED": False, "PAGE_RANGES": False, "SPLIT": True},  # explicit page tables
    {"GROUP": 8, "BLOCK_G": 8, "BLOCK_Q": 2, "HEAD_DIM": 64, "BLOCK_D": 64, "PAGES": 4,
     "BLOCK_N": 64},
]
_REDUCE = dict(HEAD_DIM=128, BLOCK_S=4, BLOCK_D=128, BALANCED=False, NUM_KV_HEADS=8, GROUP=4,
               BLOCK_H=8, BLOCK_SIZE=16, PAGES=8)


def main() -> None:
    jobs = [("_headwise_fwd", td._headwise_fwd, {**_ENGINE, **v}, v) for v in FORWARD_VARIANTS]
    jobs += [("_headwise_reduce", td._headwise_reduce, {**_REDUCE, "BALANCED": b},
              {"BALANCED": b}) for b in (False, True)]
    for name, fn, consts, variant in jobs:
        kernel = _compile(fn, consts)
        print(json.dumps({"kernel": name, "variant": variant,
                          "cubin_bytes": len(kernel.asm["cubin"]),
                          "resources": _resources(kernel)}), flush=True)


if __name__ == "__main__":
    main()

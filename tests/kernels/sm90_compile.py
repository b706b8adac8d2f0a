"""Compile the Triton kernels for sm_90 (H100/H200) without a GPU.

Run without TRITON_INTERPRET (the test suite interprets kernels, and an interpreted kernel
cannot be compiled): ``python -m tests.kernels.sm90_compile [RECORDS.json]`` compiles the
decode forward/reduce at the engine's shape and every launch recorded in RECORDS.json (see
``record_launches``), printing one JSON line per kernel with its registers and stack;
``--tiles`` compiles the forward's default tiles at ``TILE_SHAPES`` and prints their shared
memory.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vllm_adakv.kernels import triton_decode as td
from vllm_adakv.kernels.triton_allocation import EXACT_OPTIONS

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def ptxas_available() -> bool:
    """Whether Triton's NVIDIA backend can assemble a cubin here (its wheel ships ptxas)."""
    return os.path.exists(os.path.join(_BIN, "ptxas")) or shutil.which("ptxas") is not None

_SM90 = GPUTarget("cuda", 90, 32)
_BF16_PTRS = ("q_ptr", "k_ptr", "v_ptr", "out_ptr")
_FP32_PTRS = ("mid_acc_ptr", "mid_m_ptr", "mid_l_ptr")


# Innermost strides of contiguous activations and caches: 1, which Triton specialises as
# a constant at launch (what lets it vectorise the K/V loads).
_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od")


def engine_record(kernel: str, constexprs: dict) -> dict:
    """A ``launch_record`` of a decode kernel on the engine's tensors: bf16 activations,
    fp32 scratch, int32 tables, unit innermost strides, other integers 16-divisible; with
    ``KV_FP8`` an fp8 (e4m3) cache and float32 scales (otherwise the scale pointers get the
    int32 row table, never read)."""
    fn = getattr(td, kernel)
    fp8 = constexprs.get("KV_FP8", False)
    args = {}
    for name in fn.arg_names:
        if name in constexprs:
            args[name] = {"constexpr": constexprs[name]}
        elif fp8 and name in ("k_ptr", "v_ptr"):
            args[name] = {"ptr": "fp8e4nv"}
        elif fp8 and name in ("ks_ptr", "vs_ptr"):
            args[name] = {"ptr": "fp32"}
        elif name.endswith("_ptr"):
            args[name] = {"ptr": "bf16" if name in _BF16_PTRS else
                          "fp32" if name in _FP32_PTRS else "i32"}
        elif name == "qk_scale":
            args[name] = {"float": 1.0}
        else:
            args[name] = {"int": 1 if name in _UNIT_STRIDES else 16}
    return {"module": td.__name__, "kernel": kernel, "args": args}


def compile_engine(kernel: str, constexprs: dict, **options):
    """``kernel`` of the decode compiled for sm_90 at the engine's tensors (``options``:
    Triton launch options such as ``num_stages``)."""
    return compile_record(engine_record(kernel, constexprs), **options)[0]


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
# ``headwise_attention_ranges_triton`` sets them for bf16 on CUDA.
_ENGINE = dict(NUM_KV_HEADS=8, GROUP=4, BLOCK_SIZE=16, HEAD_DIM=128, SPLIT=False,
               BALANCED=False, BLOCK_H=8, POOLED=True, PAGES=8, BLOCK_G=4, BLOCK_Q=4,
               BLOCK_N=128, BLOCK_D=128, USE_DOT=True, DOT_PRECISION="tf32", DOT_FP32=False)


FORWARD_VARIANTS = [
    {},  # the engine's default: pooled tables, one split
    {"SPLIT": True, "BALANCED": True},  # the balanced default at 17-65 rows
    {"SPLIT": True, "BALANCED": True, "POOLED": False},  # single-layer tables
    {"POOLED": False, "SPLIT": True},  # split-K over single-layer tables
    {"GROUP": 8, "BLOCK_G": 8, "BLOCK_Q": 2, "HEAD_DIM": 64, "BLOCK_D": 64, "PAGES": 4,
     "BLOCK_N": 64},
    {"KV_FP8": True},  # an fp8 KV cache (e4m3), pooled tables, one split
    {"KV_FP8": True, "SPLIT": True, "BALANCED": True},
]
_REDUCE = dict(HEAD_DIM=128, BLOCK_S=4, BLOCK_D=128, BALANCED=False, NUM_KV_HEADS=8, GROUP=4,
               BLOCK_H=8, BLOCK_SIZE=16, PAGES=8)


# Every kernel the package launches (``name[grid](...)``), by module.
LAUNCHED = {
    "vllm_adakv.kernels.triton_decode": ("_headwise_fwd", "_headwise_reduce"),
    "vllm_adakv.kernels.triton_scoring": ("_window_stats", "_candidate_scores"),
    "vllm_adakv.kernels.triton_reselect": ("_event_stats", "_event_scores"),
    "vllm_adakv.kernels.triton_compaction": ("_page_ranges", "_gather_kept", "_scatter_pages",
                                             "_pooled_plan", "_pooled_step"),
    # The decode event's compaction also launches the prompt compaction's scatter.
    "vllm_adakv.kernels.triton_recompact": ("_gather_candidates", "_scatter_pages"),
    "vllm_adakv.kernels.triton_voting": ("_voter_probs", "_min_mass_above"),
    "vllm_adakv.kernels.triton_decode_voting": ("_decode_voter_stats", "_decode_voter_probs"),
    "vllm_adakv.kernels.triton_allocation": ("_safeguard_caps",),  # prompt and decode events
    "vllm_adakv.kernels.triton_expected": ("_unrotated_partial_moments",),
}
# Launch options a launcher passes besides the arguments (the interpreter drops them before
# the pre-run hooks): compiled with the same.
LAUNCH_OPTIONS = {"_safeguard_caps": EXACT_OPTIONS}
_TORCH_TYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32",
                "torch.float64": "fp64",
                "torch.float8_e4m3fn": "fp8e4nv", "torch.float8_e5m2": "fp8e5",
                "torch.int32": "i32", "torch.int64": "i64", "torch.int8": "i8",
                "torch.uint8": "u8", "torch.bool": "i1"}


def _cuda_dot_fp32(kernel: str, args: dict) -> bool:
    """``DOT_FP32`` as the launchers set it on CUDA: the decode never (its dots take the
    cache dtype, fp32 ones at ieee precision); scoring and voting for fp32 queries."""
    return kernel != "_headwise_fwd" and args["q_ptr"]["ptr"] == "fp32"


def _is_constexpr(param: inspect.Parameter) -> bool:
    return "constexpr" in str(param.annotation)


def launch_record(module: str, name: str, fn, args: tuple, kwargs: dict) -> dict:
    """What a launch of kernel ``name`` passed, as JSON: tensors by dtype, integers and
    constexprs by value, floats by kind (for ``compile_record``)."""
    params = inspect.signature(fn.fn).parameters
    bound = dict(zip(fn.arg_names, args, strict=False))
    bound.update(kwargs)
    out = {}
    for pname, param in params.items():
        value = bound.get(pname, param.default)
        if _is_constexpr(param):
            out[pname] = {"constexpr": value}
        elif hasattr(value, "dtype") and hasattr(value, "data_ptr"):
            out[pname] = {"ptr": _TORCH_TYPES[str(value.dtype)]}
        elif isinstance(value, bool):
            out[pname] = {"bool": value}
        elif isinstance(value, int):
            out[pname] = {"int": value}
        elif isinstance(value, float):
            out[pname] = {"float": value}
        else:
            raise TypeError(f"{name}: argument {pname} of type {type(value).__name__}")
    return {"module": module, "kernel": name, "args": out}


@contextlib.contextmanager
def record_launches() -> Iterator[list[dict]]:
    """Within the block, every interpreted launch of a ``LAUNCHED`` kernel appends its
    ``launch_record`` to the yielded list (through Triton's pre-run hooks)."""
    records: list[dict] = []
    hooks = []
    for module, names in LAUNCHED.items():
        mod = importlib.import_module(module)
        for name in names:
            fn = getattr(mod, name)
            if any(f is fn for f, _ in hooks):  # launched by several modules: record once
                continue

            def hook(*args, _m=module, _n=name, _f=fn, **kwargs):
                records.append(launch_record(_m, _n, _f, args, kwargs))

            fn.add_pre_run_hook(hook)
            hooks.append((fn, hook))
    try:
        yield records
    finally:
        for fn, hook in hooks:
            fn.pre_run_hooks.remove(hook)


def _jit_option(fn, name: str) -> set[str]:
    """A ``triton.jit`` option listing argument names, compiled or interpreted (the
    interpreter's function keeps the options in ``kwargs``)."""
    value = getattr(fn, name, None)
    if value is None:
        value = getattr(fn, "kwargs", {}).get(name)
    return set(value or ())


def specialization(record: dict) -> tuple[dict, dict, dict]:
    """What a GPU launch of a recorded launch's arguments compiles: (signature, constants,
    attributes) as Triton specialises them: the CUDA path of the dots
    (``_cuda_dot_fp32``; the interpreter always takes the fp32 one), integers equal to 1
    as constants and 16-divisible ones (and pointers, taken as aligned) marked so, except
    those ``jit_unspecialized`` excludes."""
    fn = getattr(importlib.import_module(record["module"]), record["kernel"])
    no_value = _jit_option(fn, "do_not_specialize")
    no_align = _jit_option(fn, "do_not_specialize_on_alignment")
    sig, consts, attrs = {}, {}, {}
    for idx, pname in enumerate(fn.arg_names):
        arg = record["args"][pname]
        if "constexpr" in arg:
            value = (_cuda_dot_fp32(record["kernel"], record["args"]) if pname == "DOT_FP32"
                     else arg["constexpr"])
            sig[pname], consts[pname] = "constexpr", value
        elif "ptr" in arg:
            sig[pname] = "*" + arg["ptr"]
            if pname not in no_align:
                attrs[(idx,)] = [["tt.divisibility", 16]]
        elif "bool" in arg:
            sig[pname] = "i1"
        elif "float" in arg:
            sig[pname] = "fp32"
        else:
            value = arg["int"]
            if value == 1 and pname not in no_value:
                sig[pname], consts[pname] = "constexpr", 1
                continue
            sig[pname] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and pname not in no_value:
                attrs[(idx,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def variant(record: dict) -> str:
    """A key of the compiled variant a recorded launch uses (``specialization``): two
    launches with the same key share one compiled kernel."""
    sig, consts, attrs = specialization(record)
    return json.dumps([record["module"], record["kernel"], sig, consts,
                       sorted((list(k), v) for k, v in attrs.items())], sort_keys=True)


def compile_record(record: dict, **options) -> tuple:
    """Compile a recorded launch for sm_90 as a GPU launch of the same arguments would
    (``specialization``). Returns the compiled kernel and its constants."""
    fn = getattr(importlib.import_module(record["module"]), record["kernel"])
    sig, consts, attrs = specialization(record)
    src = ASTSource(fn, sig, consts, attrs)
    options = {"num_warps": 4, "num_stages": 3, **LAUNCH_OPTIONS.get(record["kernel"], {}),
               **options}
    return triton.compile(src, target=_SM90, options=options), consts


# The H100's and H200's shared memory per block (227 KiB, opt-in).
SM90_MAX_SHARED = 232448

# Decode shapes whose default tile (``default_pages_per_iter``) must fit in it: (queries,
# cache, head_dim, block_size, GQA group). fp32 at head_dim 256 stopped an engine's warm-up
# on an H100 with 128-token tiles (2026-12-07).
TILE_SHAPES = [("fp32", "fp32", 256, 32, 1), ("fp32", "fp8e4nv", 256, 32, 1),
               ("fp32", "fp8e4nv", 128, 16, 4), ("bf16", "bf16", 256, 16, 2),
               ("bf16", "fp8e4nv", 256, 16, 2)]


def default_tiles() -> None:
    """Compile the forward at each of ``TILE_SHAPES`` with the launcher's default tile and
    print its shared memory (one JSON line each)."""
    for q_type, cache_type, dim, block_size, group in TILE_SHAPES:
        pages = td.default_pages_per_iter(block_size, dim, 4 if q_type == "fp32" else 2)
        consts = {**_ENGINE, "GROUP": group, "BLOCK_G": group, "BLOCK_Q": max(1, 16 // group),
                  "HEAD_DIM": dim, "BLOCK_D": dim, "BLOCK_SIZE": block_size, "PAGES": pages,
                  "BLOCK_N": block_size * pages, "KV_FP8": cache_type == "fp8e4nv",
                  "DOT_PRECISION": "ieee" if q_type == "fp32" else "tf32"}
        record = engine_record("_headwise_fwd", consts)
        for name in ("q_ptr", "out_ptr"):
            record["args"][name] = {"ptr": q_type}
        for name in ("k_ptr", "v_ptr"):
            record["args"][name] = {"ptr": cache_type}
        kernel, _ = compile_record(record)
        print(json.dumps({"shape": [q_type, cache_type, dim, block_size, group],
                          "pages": pages, "shared": kernel.metadata.shared,
                          "resources": _resources(kernel)}), flush=True)


def main() -> None:
    if sys.argv[1:] == ["--tiles"]:
        default_tiles()
        return
    jobs = [("_headwise_fwd", {**_ENGINE, **v}, v) for v in FORWARD_VARIANTS]
    jobs += [("_headwise_reduce", {**_REDUCE, "BALANCED": b}, {"BALANCED": b})
             for b in (False, True)]
    for name, consts, variant in jobs:
        kernel = compile_engine(name, consts)
        print(json.dumps({"kernel": name, "variant": variant,
                          "cubin_bytes": len(kernel.asm["cubin"]),
                          "resources": _resources(kernel)}), flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1]) as f:
            records = json.load(f)
        for record in records:
            kernel, consts = compile_record(record)
            print(json.dumps({"kernel": record["kernel"], "recorded": consts,
                              "cubin_bytes": len(kernel.asm["cubin"]),
                              "fma_f64": kernel.asm["ptx"].count("fma.rn.f64"),
                              "resources": _resources(kernel)}), flush=True)


if __name__ == "__main__":
    main()

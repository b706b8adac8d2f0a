"""Where a compressed engine's step time goes: host syncs, GPU busy time, top kernels.

    python -m benchmarks.profile_steps --model CONFIG_DIR [--method adakv --ratio 8]
        [--num-prompts 12 --input-len 6000 --output-len 48 --kv-cache-gib 8] [--stagger S]
        [--out DIR]

Runs the same workload three times in one in-process engine (dummy weights, CUDA graphs
on, prefix caching off): the first pass pays every run-time compilation, the second is
measured, the third profiled. ``--stagger S`` adds one prompt every S engine steps, so
prompt steps run next to decoding requests as on a server; each step with prompt tokens
is listed with its prompt tokens, decoding rows and wall time (``mixed``). Each pass is
printed as it finishes. During the third pass PyTorch's sync debug mode reports every
synchronising CUDA call (grouped by the innermost call site in vllm / vllm_adakv), and
the torch profiler records kernel times; the summary gives the GPU busy share of mixed
and decode-only steps and the kernels that cost the most. Writes
``profile-steps-<method>-<gpu>-<date>[-staggerS].json`` and the profiler's table as text
next to it.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

from benchmarks.machine import current_commit, device_tag


def _call_site() -> str:
    """Innermost frame of vllm or vllm_adakv in the current stack."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if "vllm_adakv" in name or ("/vllm/" in name and "warnings" not in name):
            short = name.split("site-packages/")[-1].split("/main/")[-1]
            return f"{short}:{frame.lineno} {frame.name}"
    return "?"


def run_pass(llm, prompts, params, profile: bool, stagger: int = 0) -> dict:
    """One pass over ``prompts``: all added at once, or with ``stagger`` one every that
    many engine steps (arrivals while earlier requests decode, as on a server)."""
    import torch

    cuda = torch.cuda.is_available()
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pending = [(f"{time.monotonic_ns()}-{i}", ids) for i, ids in enumerate(prompts)]

    def add_next() -> None:
        req_id, ids = pending.pop(0)
        engine.add_request(req_id, {"prompt_token_ids": ids}, params)

    while pending and not stagger:
        add_next()
    kinds: list[str] = []
    # per step with prompt tokens: (prompt tokens, rows with one token, i.e. decoding)
    mixed_rows: list[tuple[int, int]] = []
    schedule = scheduler.schedule

    def recording_schedule(*a, **kw):
        out = schedule(*a, **kw)
        tok, rows = out.total_num_scheduled_tokens, len(out.num_scheduled_tokens)
        kinds.append("decode" if tok == rows and rows else "mixed")
        if kinds[-1] == "mixed":
            single = sum(1 for n in out.num_scheduled_tokens.values() if n == 1)
            mixed_rows.append((tok - single, single))
        return out

    scheduler.schedule = recording_schedule
    syncs: collections.Counter[str] = collections.Counter()
    prof = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        # with_stack: each host wait below is named by the code that made it
        prof = torch_profile(activities=[ProfilerActivity.CPU]
                             + ([ProfilerActivity.CUDA] if cuda else []), with_stack=True)
        prof.__enter__()
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
    step_s: list[float] = []
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                syncs[_call_site()] += 1
            else:
                original(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        try:
            while pending or engine.has_unfinished_requests():
                if pending and stagger and len(step_s) % stagger == 0:
                    add_next()
                ts = time.perf_counter()
                engine.step()
                step_s.append(time.perf_counter() - ts)
        finally:
            warnings.showwarning = original
            if profile and cuda:
                torch.cuda.set_sync_debug_mode(0)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    scheduler.schedule = schedule
    mixed_s = [t for t, k in zip(step_s, kinds, strict=False) if k == "mixed"]
    result = {"wall_s": wall, "steps": len(step_s),
              "mixed_s": sum(mixed_s),
              "decode_s": sum(t for t, k in zip(step_s, kinds, strict=False) if k == "decode"),
              "mixed_steps": kinds.count("mixed"), "decode_steps": kinds.count("decode"),
              "syncs": dict(syncs.most_common(40)),
              # each step with prompt tokens: prompt tokens, decoding rows, wall ms
              "mixed": [[c, d, round(t * 1e3, 2)]
                        for (c, d), t in zip(mixed_rows, mixed_s, strict=False)]}
    if prof is not None:
        prof.__exit__(None, None, None)
        events = prof.key_averages()
        kernels = sorted((e for e in events if e.device_time_total > 0),
                         key=lambda e: -e.self_device_time_total)
        busy_us = sum(e.self_device_time_total for e in kernels)
        result["gpu_busy_share"] = busy_us * 1e-6 / wall
        result["top_kernels"] = [
            {"name": e.key[:120], "count": e.count, "total_ms": e.self_device_time_total / 1e3}
            for e in kernels[:40]]
        result["table"] = events.table(sort_by="self_cuda_time_total", row_limit=60)
        result["host_waits"] = host_waits(prof.events())
        result["host_top_ops"] = [
            {"name": e.key[:120], "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3}
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]]
    return result


# CUDA runtime calls in which the host can wait for the device (or for a copy)
_WAITING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
                  "cudaMemcpy", "cudaMemcpyAsync", "cudaHostAlloc", "cudaMallocHost",
                  "cudaFreeHost", "cudaMalloc", "cudaFree", "cudaStreamWaitEvent")


def host_waits(function_events, top: int = 30) -> list[dict]:
    """Host time in CUDA runtime calls that can block, grouped by call and by the
    innermost vllm / vllm_adakv frame of the profiler's Python stack."""
    total: collections.Counter[tuple[str, str]] = collections.Counter()
    count: collections.Counter[tuple[str, str]] = collections.Counter()
    longest: dict[tuple[str, str], float] = {}
    for e in function_events:
        if e.name not in _WAITING_CALLS:
            continue
        node = e  # a runtime call has no stack of its own: its calling op has
        while node is not None and not node.stack:
            node = getattr(node, "cpu_parent", None)
        stack = node.stack if node is not None else []
        site = next((f for f in stack if "vllm_adakv" in f or "/vllm/" in f), "?")
        key = (e.name, site.split("site-packages/")[-1])
        us = e.cpu_time_total
        total[key] += us
        count[key] += 1
        longest[key] = max(longest.get(key, 0.0), us)
    return [{"call": k[0], "site": k[1], "count": count[k], "total_ms": round(v / 1e3, 3),
             "max_ms": round(longest[k] / 1e3, 3)} for k, v in total.most_common(top)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--method", default="adakv")
    ap.add_argument("--ratio", type=int, default=8)
    ap.add_argument("--num-prompts", type=int, default=12)
    ap.add_argument("--input-len", type=int, default=6000)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--kv-cache-gib", type=float, default=8.0)
    ap.add_argument("--stagger", type=int, default=0,
                    help="add one prompt every STAGGER engine steps (0: all at once)")
    ap.add_argument("--extra-engine-args", default="{}",
                    help="JSON of more LLM(...) arguments, e.g. '{\"enforce_eager\": true}'")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import numpy as np
    import torch
    from vllm import LLM, SamplingParams

    kwargs = dict(model=args.model, load_format="dummy", dtype="bfloat16", seed=0,
                  skip_tokenizer_init=True, max_model_len=args.input_len + args.output_len + 16,
                  kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)),
                  # the passes repeat the prompts: a cache hit would skip vanilla's prefill
                  # (compressed requests do not use the prefix cache)
                  enable_prefix_caching=False)
    if args.method == "none":
        if torch.cuda.is_available():  # the backend ours extends (the CPU has one)
            kwargs["attention_backend"] = "TRITON_ATTN"
    else:
        kwargs["additional_config"] = {"kv_compression": {
            "method": args.method, "budget": args.input_len // args.ratio}}
    kwargs.update(json.loads(args.extra_engine_args))
    llm = LLM(**kwargs)
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, vocab, args.input_len).tolist()
               for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                            detokenize=False)
    def timed_pass(name: str, profile: bool) -> dict:
        result = run_pass(llm, prompts, params, profile=profile, stagger=args.stagger)
        # printed at once: a call cut by its time limit keeps the passes that finished
        print(f"{name} pass:", json.dumps({k: v for k, v in result.items() if k != "table"}),
              flush=True)
        return result

    first = timed_pass("first", profile=False)
    second = timed_pass("second", profile=False)
    profiled = timed_pass("profiled", profile=True)
    table = profiled.pop("table", "")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"gpu": gpu, "date": dt.date.today().isoformat(), "commit": current_commit(None),
              "command": " ".join(["python -m benchmarks.profile_steps", *sys.argv[1:]]),
              "args": vars(args), "first_pass": first, "second_pass": second,
              "profiled_pass": profiled}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = device_tag(gpu)
    stem = (f"profile-steps-{args.method}-{tag}-{result['date']}"
            + (f"-stagger{args.stagger}" if args.stagger else ""))
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.txt").write_text(table)
    for name, p in (("first", first), ("second", second), ("profiled", profiled)):
        print(f"{name}: wall {p['wall_s']:.2f} s, mixed {p['mixed_steps']} steps "
              f"{p['mixed_s']:.2f} s, decode {p['decode_steps']} steps {p['decode_s']:.2f} s")
    print("gpu busy share (profiled pass):", round(profiled.get("gpu_busy_share", 0), 3))
    print("syncs:", json.dumps(profiled["syncs"], indent=0)[:3000])
    for w in profiled.get("host_waits", [])[:20]:
        print(f"host wait {w['total_ms']:9.2f} ms {w['count']:6d}x (max {w['max_ms']:.2f}) "
              f"{w['call']} {w['site'][:100]}")
    for k in profiled.get("top_kernels", [])[:25]:
        print(f"{k['total_ms']:9.2f} ms {k['count']:6d}x {k['name'][:90]}")


if __name__ == "__main__":
    main()

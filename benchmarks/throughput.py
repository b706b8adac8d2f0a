"""End-to-end offline throughput, vanilla vLLM vs vllm-adakv, measured side by side.

    python -m benchmarks.throughput --model CONFIG_DIR --regime B --input-len 6000 \
        --output-len 500 --num-prompts 64 --ratios 1,8,64 [--kv-cache-gib 8] [--out DIR]
    python -m benchmarks.throughput --model CONFIG_DIR --regime D --input-len 1000 \
        --output-len 4000 --num-prompts 32 --budgets 512 --decode-budgets 512,1024,2048 \
        --kv-cache-gib 4 --reserve-output 4000

Random-token prompts, ``max_tokens = output_len`` with ``ignore_eos``, weights
``--load-format dummy``, bf16, default compilation (CUDA graphs on). Vanilla = vLLM
with TRITON_ATTN and no plugin; ours = ``--kv-compression adakv``, each point's
requests carrying their budget ``input_len / ratio`` (vllm_xargs ``kv_budget``), so
all compressed points share one engine (one start, one compilation) and run one
after another; vanilla and the prefill-only run (vanilla with ``max_tokens = 1``)
share another. ``--fresh-engines`` starts one engine per point instead. Each point
draws its own prompts (seeded by its index: the engines' prefix caches never hit),
after an untimed warm-up request of ``input_len`` tokens. ``bound_speedup`` =
T_vanilla / T_prefill: compression after prefill cannot beat it.
Decode-time compression (issue 29): ``--decode-budgets D1,D2,...`` (default 0 = off, the
runs above) runs every compressed point once per decode budget, on an engine of its own
per decode budget (``decode_budget`` is a server setting, not a request's), with
``additional_config`` ``decode_budget`` = D and ``decode_interval`` =
``--decode-interval`` (default: the setting's, 32); a decode budget of 0 is today's
engine, without the keys. Only a request whose prompt is compressed is decode-compressed,
so its prompt budget must be below the prompt and compress it: ``--budgets`` gives the
points' prompt budgets directly instead of ``--ratios`` (a point's ``ratio`` is then
``input_len / budget``, a float). Regime D (1000 in, 4000 out) uses ``--budgets 512``: at
decode budget 512 the prompt keeps 512 tokens like every later event; at 1024 and 2048 no
prompt budget can equal the decode budget and still compress the 1000-token prompt, so 512
makes the requests eligible; the decode budget's pages then cover the whole prompt, the
prefill releases no block (``decode_plan``: ``prefill_compressed`` false) and the first
event comes once the sequence outgrows those pages. Regimes B and C use a ratio whose
budget equals the decode budget (B 8x: 750 + decode 750). Every point carries
``decode_budget`` (0: off); decode points also ``decode_interval`` and
``decode_released_blocks`` (blocks the events gave back, the manager's counter over the
point). ``bound_speedup`` stays the prefill-only bound T_vanilla / T_prefill on every
point: decode compression does not shorten the prefill either, so no point can beat it,
but where the generated tokens dominate (C, D) it is far above reach: their limit is
decoding every request at once, which is not computed.
``--kv-cache-dtype fp8`` puts the compressed points on an fp8 KV cache and adds a vanilla
run on the same fp8 cache (its own engine): points then carry ``speedup`` (vs vanilla
with the default cache) and ``speedup_vs_vanilla_fp8``; every run names its
``kv_cache_dtype``.
The engine core runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, the same for
every point) so the scheduler's running set and block pool are sampled each step.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.machine import current_commit, device_tag

NO_PLUGIN = {"VLLM_PLUGINS": "lora_filesystem_resolver"}  # vLLM's allow-list: ours left out


def make_engine(spec: dict):
    """The engine of ``spec`` (vanilla for method 'none', plugin loaded without
    compression for 'off', else compression with the spec's default budget)."""
    from vllm import LLM

    kwargs = dict(model=spec["model"], load_format="dummy", dtype=spec.get("dtype", "bfloat16"),
                  seed=0,
                  skip_tokenizer_init=True,
                  max_model_len=spec["input_len"] + spec["output_len"] + 16,
                  max_num_seqs=spec.get("max_num_seqs", 256))
    if spec.get("tp", 1) > 1:
        kwargs["tensor_parallel_size"] = spec["tp"]
    if spec.get("kv_cache_gib"):
        kwargs["kv_cache_memory_bytes"] = int(spec["kv_cache_gib"] * (1 << 30))
    if spec.get("kv_cache_dtype", "auto") != "auto":
        kwargs["kv_cache_dtype"] = spec["kv_cache_dtype"]
    if spec["method"] in ("none", "off"):
        kwargs["attention_backend"] = "TRITON_ATTN"
    else:
        kwargs["additional_config"] = {"kv_compression": {
            "method": spec["method"], "budget": spec["budget"],
            "reserve_output": spec.get("reserve_output", 0)}}
        if spec.get("decode_budget"):
            kwargs["additional_config"]["kv_compression"].update(
                decode_budget=spec["decode_budget"], decode_interval=spec["decode_interval"])
    kwargs.update(spec.get("engine", {}))
    return LLM(**kwargs), kwargs


def run_engine(spec: dict) -> list[dict]:
    """In the child process: one engine, then each of ``spec["points"]`` in turn."""
    import numpy as np
    from vllm import SamplingParams

    llm, kwargs = make_engine(spec)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    vocab = json.loads((Path(spec["model"]) / "config.json").read_text())["vocab_size"]

    def prompts(seed: int, n: int) -> list[list[int]]:
        rng = np.random.default_rng(seed)
        return [rng.integers(min(100, vocab // 2), vocab, spec["input_len"]).tolist()
                for _ in range(n)]

    def params(max_tokens: int, budget: int | None) -> SamplingParams:
        extra = {"kv_budget": budget} if budget else None
        return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                              detokenize=False, extra_args=extra)

    # Untimed warm-up: one full-length request (compressed on our engine, at its default
    # budget), so that nothing left to initialise lands in the first timed point.
    llm.generate([{"prompt_token_ids": prompts(10_000, 1)[0]}], params(8, spec.get("budget")),
                 use_tqdm=False)
    results = []
    manager = (scheduler.kv_cache_manager.coordinator.single_type_managers[0]
               if spec.get("decode_budget") else None)
    for index, point in enumerate(spec["points"]):
        sp = params(point["max_tokens"], point.get("budget"))
        for i, ids in enumerate(prompts(index, spec["num_prompts"])):
            engine.add_request(f"{index}-{i}", {"prompt_token_ids": ids}, sp)
        decode_released = manager.num_decode_released_blocks_total if manager else 0
        res = measure(engine, scheduler, pool)
        if manager is not None:
            res.update({"decode_interval": spec["decode_interval"], "decode_released_blocks":
                        manager.num_decode_released_blocks_total - decode_released})
        res.update({
            "total_tok_s": (res["out_tokens"] + spec["num_prompts"] * spec["input_len"])
            / res["wall_s"], "max_num_seqs": kwargs["max_num_seqs"],
            "engine_extra": spec.get("engine", {}), "tp": spec.get("tp", 1),
            "reserve_output": spec.get("reserve_output", 0), "prompt_seed": index,
            "kv_cache_dtype": spec.get("kv_cache_dtype", "auto"),
            "engine_points": len(spec["points"])})
        results.append(res)
        print(f"@@DONE@@ {json.dumps({**point, 'wall_s': res['wall_s']})}", flush=True)
    return results


def measure(engine, scheduler, pool, on_outputs=None) -> dict:
    """Step the engine until every request has finished; what the run did.
    ``on_outputs(outputs, seconds)``, if given, sees each step's request outputs and the
    time since the start."""
    peak, blocks_peak, out_tokens, blocks_sum = 0, 0, 0, 0
    preempted: dict[str, int] = {}
    total_blocks = pool.num_gpu_blocks
    # What each step scheduled (tokens, requests), to split step times by kind.
    scheduled: list[tuple[int, int]] = []
    schedule = scheduler.schedule

    def recording_schedule(*a, **kw):
        out = schedule(*a, **kw)
        scheduled.append((out.total_num_scheduled_tokens, len(out.num_scheduled_tokens)))
        return out

    scheduler.schedule = recording_schedule
    step_s: list[float] = []
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        ts = time.perf_counter()
        outs = engine.step()
        step_s.append(time.perf_counter() - ts)
        if on_outputs is not None:
            on_outputs(outs, time.perf_counter() - t0)
        for out in outs:
            if out.finished:
                out_tokens += len(out.outputs[0].token_ids)
        peak = max(peak, len(scheduler.running))
        for req_id, req in scheduler.requests.items():
            if req.num_preemptions:
                preempted[req_id] = max(preempted.get(req_id, 0), req.num_preemptions)
        in_use = total_blocks - pool.get_num_free_blocks()
        blocks_peak = max(blocks_peak, in_use)
        blocks_sum += in_use
    wall = time.perf_counter() - t0
    scheduler.schedule = schedule
    return {**step_breakdown(step_s, scheduled), "wall_s": wall, "out_tokens": out_tokens,
            "out_tok_s": out_tokens / wall, "peak_concurrency": peak,
            "preemptions": sum(preempted.values()), "peak_kv_blocks": blocks_peak,
            "mean_kv_blocks": blocks_sum / max(len(step_s), 1),
            "kv_blocks_total": total_blocks, "block_size": scheduler.block_size}


def step_breakdown(step_s: list[float], scheduled: list[tuple[int, int]]) -> dict:
    """Median step time of decode-only steps (one token per request) and of mixed steps.

    With async scheduling a step's wall time may belong to the step scheduled just before;
    over hundreds of steps of each kind the medians still tell them apart.
    """
    import numpy as np

    n = min(len(step_s), len(scheduled))
    decode = [(t, r) for t, (tok, r) in zip(step_s[:n], scheduled[:n], strict=True)
              if tok == r and r > 0]
    mixed = [t for t, (tok, r) in zip(step_s[:n], scheduled[:n], strict=True) if tok != r]
    times = np.array([t for t, _ in decode])
    median = float(np.median(times)) if decode else 0.0
    slow = times[times > 3 * median] if decode else times
    return {"decode_steps": len(decode),
            "decode_step_ms_median": median * 1e3 if decode else None,
            # Decode steps over 3x the median (e.g. those that run decode events) and the
            # seconds they took.
            "decode_slow_steps": int(slow.size), "decode_slow_s": float(slow.sum()),
            "decode_batch_median": float(np.median([r for _, r in decode])) if decode else None,
            "mixed_steps": len(mixed),
            "mixed_step_ms_median": float(np.median(mixed) * 1e3) if mixed else None}


def spawn(spec: dict, module: str = "benchmarks.throughput") -> list[dict]:
    """Run ``run_engine(spec)`` in a fresh process (``python -m MODULE --engine SPEC``,
    which prints ``@@POINTS@@`` and its results); one result (or error) per point."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if spec["method"] == "none":
        env.update(NO_PLUGIN)
    proc = subprocess.run([sys.executable, "-m", module, "--engine",
                           json.dumps(spec)], env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("@@POINTS@@"):
            return json.loads(line[len("@@POINTS@@"):])
    print(f"engine {spec} failed:\n{proc.stderr[-3000:]}", flush=True)
    return [{"error": proc.stderr[-3000:]} for _ in spec["points"]]


def kv_bytes_per_token(model_dir: str, kv_cache_dtype: str = "auto") -> int:
    """K and V of every layer for one token (bf16, or one byte per element for fp8)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    element = 1 if kv_cache_dtype.startswith("fp8") else 2
    return cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2 * element


def max_num_seqs(args: argparse.Namespace, budget: int, decode_budget: int = 0) -> int:
    """``--max-num-seqs`` for a compressed point; 'auto' sizes it for the end of generation:
    each request then holds its kept tokens, its output and up to two partial blocks, next
    to one whole prompt being prefilled. With a decode budget, a request holds at most
    about ``max(budget, decode_budget) + window + interval`` tokens per head (the plan's
    bound, docs/decode-compression.md), if that is less."""
    if args.max_num_seqs != "auto":
        return int(args.max_num_seqs)
    if not args.kv_cache_gib:
        raise SystemExit("--max-num-seqs auto needs --kv-cache-gib")
    # --kv-cache-gib is per GPU; each of the tp GPUs holds 1/tp of the KV heads.
    tokens = (int(args.kv_cache_gib * (1 << 30)) * args.tp
              // kv_bytes_per_token(args.model, args.kv_cache_dtype))
    per_request = budget + args.output_len
    if decode_budget:
        window = setting_default("window")
        per_request = min(per_request,
                          max(budget, decode_budget) + window + args.decode_interval)
    per_request += 32
    return max(1, min(256, (tokens - args.input_len) // per_request))


def setting_default(field: str):
    """The default of a compression setting (``vllm_adakv.config.SETTINGS``)."""
    from vllm_adakv.config import SETTING_OF_FIELD

    return SETTING_OF_FIELD[field].default


def prompt_points(args: argparse.Namespace) -> list[tuple[int | float, int]]:
    """``(ratio, budget)`` of each compressed point: ``--ratios`` (budget
    ``input_len // ratio``) or ``--budgets`` (ratio ``input_len / budget``)."""
    if args.budgets is not None:
        if args.ratios is not None:
            raise SystemExit("give --ratios or --budgets, not both")
        return [(args.input_len / int(b), int(b)) for b in args.budgets.split(",")]
    return [(int(r), args.input_len // int(r)) for r in (args.ratios or "1,8,64").split(",")]


def run_method(args: argparse.Namespace, base: dict, method: str,
               pairs: list[tuple[int | float, int]], add, save,
               decode_budget: int = 0) -> None:
    """The compressed points of one method (and decode budget): one engine for all
    ``(ratio, budget)`` pairs (each request carries its budget), or one per pair with
    ``--fresh-engines``."""
    out_len = args.output_len
    ours = {**base, "method": method, "reserve_output": args.reserve_output,
            "kv_cache_dtype": args.kv_cache_dtype,
            "engine": {**base["engine"], **json.loads(args.engine_extra)}}
    if decode_budget:
        ours.update(decode_budget=decode_budget, decode_interval=args.decode_interval)
    if args.fresh_engines:
        for ratio, budget in pairs:
            res, = spawn({**ours, "budget": budget,
                          "max_num_seqs": max_num_seqs(args, budget, decode_budget),
                          "points": [{"max_tokens": out_len, "budget": budget}]})
            add(ratio, budget, res)
            save()
        return
    budgets = [b for _, b in pairs]
    sizing = min((b for b in budgets if b < args.input_len), default=budgets[0],
                 key=lambda b: -b)
    results = spawn({**ours, "budget": sizing,
                     "max_num_seqs": max_num_seqs(args, sizing, decode_budget),
                     "points": [{"max_tokens": out_len, "budget": b} for b in budgets]})
    for (ratio, budget), res in zip(pairs, results, strict=True):
        add(ratio, budget, res)
    save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--model")
    ap.add_argument("--regime", choices=["A", "B", "C", "D"], default="A")
    ap.add_argument("--input-len", type=int, default=6000)
    ap.add_argument("--output-len", type=int, default=500)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--ratios", default=None,
                    help="compression ratios of the compressed points, prompt budget "
                         "input_len // ratio (default 1,8,64)")
    ap.add_argument("--budgets", default=None,
                    help="prompt budgets of the compressed points, given directly instead "
                         "of --ratios (ratio = input_len / budget)")
    ap.add_argument("--decode-budgets", default="0",
                    help="--kv-decode-budget of the compressed points, a comma list: each "
                         "point runs once per decode budget, one engine per decode budget "
                         "(0: off)")
    ap.add_argument("--decode-interval", type=int, default=None,
                    help="--kv-decode-interval of the decode points (default: the "
                         "setting's)")
    ap.add_argument("--method", default="adakv",
                    help="compression method of the compressed points; a comma list runs "
                         "each (its own engine) against the same vanilla run")
    ap.add_argument("--kv-cache-gib", type=float, default=None)
    ap.add_argument("--max-num-seqs", default="256",
                    help="for the compressed points: a number, or 'auto' = the requests the "
                         "KV space holds at the end of generation (needs --kv-cache-gib; "
                         "with a shared engine, sized for the smallest ratio above 1)")
    ap.add_argument("--tp", type=int, default=1,
                    help="tensor_parallel_size of every point (KV space is per GPU)")
    ap.add_argument("--reserve-output", type=int, default=0,
                    help="--kv-reserve-output of the compressed points (0: none)")
    ap.add_argument("--engine-extra", default="{}",
                    help="JSON of extra LLM(...) arguments for the compressed points, "
                         "e.g. '{\"watermark\": 0.3}' (vLLM's admission headroom)")
    ap.add_argument("--all-engines-extra", default="{}",
                    help="JSON of extra LLM(...) arguments for every engine, vanilla included")
    ap.add_argument("--fresh-engines", action="store_true",
                    help="one engine per point instead of one per method")
    ap.add_argument("--flag-off", action="store_true",
                    help="also run the plugin loaded with compression off (vs vanilla)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="KV cache dtype of the compressed points (vLLM's --kv-cache-dtype); "
                         "not auto: also a vanilla run on that cache")
    ap.add_argument("--suffix", default="", help="appended to the result file's name")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if args.engine:
        print("@@POINTS@@" + json.dumps(run_engine(json.loads(args.engine))), flush=True)
        return
    pairs = prompt_points(args)
    decode_budgets = [int(d) for d in args.decode_budgets.split(",")]
    if args.decode_interval is None:
        args.decode_interval = setting_default("decode_interval")
    base = {"model": args.model, "input_len": args.input_len, "output_len": args.output_len,
            "num_prompts": args.num_prompts, "kv_cache_gib": args.kv_cache_gib, "tp": args.tp,
            "dtype": args.dtype, "engine": json.loads(args.all_engines_extra)}
    out_len = args.output_len
    if args.fresh_engines:
        vanilla, = spawn({**base, "method": "none", "points": [{"max_tokens": out_len}]})
        prefill, = spawn({**base, "method": "none", "points": [{"max_tokens": 1}]})
    else:
        vanilla, prefill = spawn({**base, "method": "none",
                                  "points": [{"max_tokens": out_len}, {"max_tokens": 1}]})
    print("vanilla", json.dumps(vanilla), "\nprefill-only", json.dumps(prefill), flush=True)
    if "error" in vanilla or "error" in prefill:
        raise SystemExit("vanilla runs failed")
    vanilla_q = None  # vanilla on the compressed points' cache dtype, if not the default
    if args.kv_cache_dtype != "auto":
        vanilla_q, = spawn({**base, "method": "none", "kv_cache_dtype": args.kv_cache_dtype,
                            "points": [{"max_tokens": out_len}]})
        print(f"vanilla {args.kv_cache_dtype}", json.dumps(vanilla_q), flush=True)
        if "error" in vanilla_q:
            raise SystemExit(f"vanilla {args.kv_cache_dtype} failed")
    bound = vanilla["wall_s"] / prefill["wall_s"]
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    date = dt.date.today().isoformat()
    tag = device_tag(gpu)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"throughput-{tag}-{date}-{args.regime}{args.input_len}{args.suffix}.json"
    points: list[dict] = []
    flag_off: dict | None = None

    def save() -> None:  # after every engine: a run cut short keeps what it measured
        path.write_text(json.dumps({
            "gpu": gpu, "date": date, "commit": current_commit(None),
            "command": "python -m benchmarks.throughput "
            + " ".join(sys.argv[1:]), "model_shape": Path(args.model).name,
            "kv_cache_gib": args.kv_cache_gib,
            "engines": "one per point" if args.fresh_engines else "one per method"
            + (" and decode budget" if decode_budgets != [0] else ""),
            "vanilla": vanilla, "prefill_only": prefill, "flag_off": flag_off,
            **({f"vanilla_{args.kv_cache_dtype}": vanilla_q} if vanilla_q else {}),
            "points": points}, indent=1))

    def add(method: str, decode_budget: int, ratio: int | float, budget: int,
            res: dict) -> None:
        if "error" in res:
            return
        point = {"regime": args.regime, "input_len": args.input_len,
                 "output_len": out_len, "num_prompts": args.num_prompts,
                 "method": method, "ratio": ratio, "budget": budget,
                 "decode_budget": decode_budget, **res,
                 "vanilla_out_tok_s": vanilla["out_tok_s"],
                 "speedup": res["out_tok_s"] / vanilla["out_tok_s"], "bound_speedup": bound}
        if vanilla_q:
            point[f"speedup_vs_vanilla_{args.kv_cache_dtype}"] = (
                res["out_tok_s"] / vanilla_q["out_tok_s"])
        print(json.dumps(point), flush=True)
        points.append(point)

    save()
    if args.flag_off:
        flag_off, = spawn({**base, "method": "off", "points": [{"max_tokens": out_len}]})
        if "error" not in flag_off:
            flag_off["speedup"] = flag_off["out_tok_s"] / vanilla["out_tok_s"]
        save()
    for method in args.method.split(","):
        for decode_budget in decode_budgets:
            run_method(args, base, method, pairs,
                       lambda r, b, res, m=method, d=decode_budget: add(m, d, r, b, res),
                       save, decode_budget)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

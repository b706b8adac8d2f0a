"""Prefix caching (issue 28): vLLM with prefix caching vs vllm-adakv, on prompts that share.

    python -m benchmarks.prefix shared-prefix --model CONFIG_DIR --ratios 8 --kv-cache-gib 8
    python -m benchmarks.prefix multi-turn --model CONFIG_DIR --ratio 8 --kv-cache-gib 8
    python -m benchmarks.prefix merge OUT1/prefix-h100-DATE.json OUT2/prefix-h100-DATE.json
    python -m benchmarks.prefix unique-from benchmarks/results/throughput-...-B6000.json \
        --into benchmarks/results/prefix-h100-DATE.json
    python -m benchmarks.prefix plot benchmarks/results/prefix-h100-DATE.json

Vanilla = vLLM 0.32 without the plugin (``VLLM_PLUGINS``; TRITON_ATTN on CUDA) and with
prefix caching on (vLLM's default); ours = ``--kv-compression adakv`` with prefix
caching on too, budget = prompt tokens / ratio per request. Both in the same run, on the
same machine; dummy weights for a folder without any.

``shared-prefix`` (offline, engines as in benchmarks/throughput.py: one child process
per method, the engine core in-process so the scheduler is sampled each step): N
requests = one shared random prefix + unique random tokens each, all submitted at once,
``ignore_eos``, temperature 0. Before the timed requests, one untimed warm-up request
that shares nothing with them: the prefix is cold at the start (``--warm-prefix``: an
untimed request with the prefix first; each point says which in
``prefix_cache_at_start``). Each point's prompts are seeded by its index in its engine
(vanilla and the first ratio get the same prompts; a later ratio never finds an earlier
point's prefix). Recorded: seconds, req/s, TTFT (from the step each request's first
token came out of, all submitted at t=0), the prefix-cache hit tokens of the timed
requests (``RequestOutput.num_cached_tokens``), the most requests running at once,
preemptions.

``multi-turn`` (online, one OpenAI server per method, started and stopped as in
benchmarks/serving.py): C conversations x T turns. A conversation starts every
``--stagger`` seconds; turn 1 = a system prompt shared by all conversations + its own
user tokens; turn n+1 = turn n's prompt + turn n's generated token ids + new user
tokens, sent as soon as turn n's answer is complete (plus ``--think-time``). Prompts go
to /v1/completions as token ids, streamed, with ``return_token_ids`` (vLLM 0.32's
``vllm bench serve`` has no dataset that re-sends a conversation's history, so this
module has its own aiohttp client). Ours: every request carries ``vllm_xargs
{"kv_compression_ratio": R}`` (budget = its prompt tokens / R), or with ``--budget N``
the server's ``--kv-budget N`` for all. One untimed warm-up request that shares nothing.
Recorded: seconds (first send to last answer), completed requests/s, TTFT p50/p99 (and
p50 per turn), the server's prefix-cache hits and queries (``vllm:prefix_cache_*_total``,
difference over the timed run; vLLM leaves out requests that skip the lookup) and each
request's cached tokens (``--enable-prompt-tokens-details``).

Every run merges its points into ``OUT/prefix-<gpu>-<date>.json`` (a point with the
same workload, method, ratio and budget is replaced), so separate runs fill one file
(each device call starts with an empty $OUT: ``merge`` joins their files here):
``{"gpu", "date", "commit", "command", "points": [...]}``, each point with ``workload``,
``method`` ("none" = vanilla with prefix caching), ``ratio``, ``seconds``,
``vanilla_pc_seconds``, ``speedup_vs_vanilla_pc`` (vanilla seconds / seconds), ``req_s``,
``vanilla_pc_req_s``, ``ttft_p50_ms``, ``vanilla_pc_ttft_p50_ms`` (null where they do not
apply) and more. The top-level commit and command list those of the points.
``unique-from`` adds throughput.py's points (random prompts, nothing shared; its vanilla
runs with vLLM's default prefix caching) as ``"workload": "unique"``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gzip
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.machine import current_commit, device_tag

WORKLOADS = ("shared-prefix", "multi-turn", "unique")
# every point has these keys (None where they do not apply)
POINT_KEYS = ("workload", "method", "ratio", "seconds", "vanilla_pc_seconds",
              "speedup_vs_vanilla_pc", "req_s", "vanilla_pc_req_s", "ttft_p50_ms",
              "vanilla_pc_ttft_p50_ms")
# server counters read before and after a timed run -> key in the point (the difference)
COUNTERS = {"vllm:prefix_cache_hits_total": "server_prefix_cache_hits",
            "vllm:prefix_cache_queries_total": "server_prefix_cache_queries",
            "vllm:num_preemptions_total": "preemptions",
            "vllm_adakv:requests_compressed_total": "requests_compressed",
            "vllm_adakv:blocks_released_total": "blocks_released"}


# ---------------------------------------------------------------- pure parts (tested)

def random_ids(seed: Any, vocab: int, n: int) -> list[int]:
    """``n`` random token ids, seeded (an int or a tuple of ints), away from the lowest
    ids (special tokens of small vocabularies)."""
    import numpy as np

    return np.random.default_rng(seed).integers(min(100, vocab // 2), vocab, n).tolist()


def shared_prefix_prompts(seed: int, vocab: int, prefix_len: int, unique_len: int,
                          n: int) -> tuple[list[int], list[list[int]]]:
    """The prefix and ``n`` prompts = the prefix + ``unique_len`` tokens of their own."""
    prefix = random_ids((seed, 0), vocab, prefix_len)
    return prefix, [prefix + random_ids((seed, 1, i), vocab, unique_len) for i in range(n)]


def first_turn(system: list[int], user: list[int]) -> list[int]:
    return system + user


def next_turn(prompt: list[int], generated: list[int], user: list[int]) -> list[int]:
    """Turn n+1's prompt: turn n's prompt, the ids it generated, then the new user tokens."""
    return [*prompt, *generated, *user]


def turn_prompt_lens(system_len: int, user_len: int, output_len: int, turns: int) -> list[int]:
    """The prompt length of each turn when every answer has ``output_len`` tokens."""
    return [system_len + (t + 1) * user_len + t * output_len for t in range(turns)]


def percentile_ms(seconds: list[float], q: float) -> float | None:
    """The ``q``-th percentile of ``seconds``, in ms (None for no values)."""
    import numpy as np

    return float(np.percentile(seconds, q) * 1e3) if seconds else None


def point(workload: str, method: str, ratio: float | None, seconds: float | None,
          req_s: float | None, ttft_p50_ms: float | None, **extra: Any) -> dict:
    """A point of the results file; the vanilla_pc_* keys stay None until compared."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload {workload!r} is none of {WORKLOADS}")
    return {**dict.fromkeys(POINT_KEYS), "workload": workload, "method": method,
            "ratio": ratio, "seconds": seconds, "req_s": req_s, "ttft_p50_ms": ttft_p50_ms,
            **extra}


def compare(p: dict, vanilla: dict) -> dict:
    """``p`` with vanilla's seconds, req/s and TTFT p50, and the speedup vanilla seconds /
    seconds (None where either side lacks a number)."""
    secs, vsecs = p.get("seconds"), vanilla.get("seconds")
    return {**p, "vanilla_pc_seconds": vsecs,
            "speedup_vs_vanilla_pc": vsecs / secs if secs and vsecs else None,
            "vanilla_pc_req_s": vanilla.get("req_s"),
            "vanilla_pc_ttft_p50_ms": vanilla.get("ttft_p50_ms")}


def point_key(p: dict) -> tuple:
    return (p["workload"], p["method"], p.get("ratio"), p.get("budget"), p.get("stagger_s"))


def merge_points(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with each point of ``new`` in place of the one with its key (workload,
    method, ratio, budget, stagger), the others appended; in order of workload, then as
    they came."""
    merged = {point_key(p): p for p in old}
    for p in new:
        merged[point_key(p)] = p
    order = {w: i for i, w in enumerate(WORKLOADS)}
    return sorted(merged.values(), key=lambda p: order.get(p["workload"], len(order)))


def _distinct(values: list[Any]) -> list[Any]:
    return list(dict.fromkeys(v for v in values if v))


def merge_results(old: dict | None, new_points: list[dict], gpu: str, date: str) -> dict:
    """The results file after adding ``new_points`` (each carries its commit and command)."""
    if old is not None and old.get("gpu") != gpu:
        raise ValueError(f"the results file is of {old.get('gpu')!r}, this run of {gpu!r}")
    points = merge_points(old["points"] if old else [], new_points)
    return {"gpu": gpu, "date": date,
            "commit": ", ".join(_distinct([p.get("commit") for p in points])) or None,
            "command": " ; ".join(_distinct([p.get("command") for p in points])) or None,
            "points": points}


def results_path(out: Path, gpu: str, date: str, suffix: str = "") -> Path:
    return out / f"prefix-{device_tag(gpu)}-{date}{suffix}.json"


def save(path: Path, new_points: list[dict], gpu: str, date: str) -> None:
    """Merge ``new_points`` into the file at ``path`` (created if absent)."""
    old = json.loads(path.read_text()) if path.is_file() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merge_results(old, new_points, gpu, date), indent=1))


def unique_points(throughput: dict, commit: str | None = None) -> list[dict]:
    """A benchmarks/throughput.py result as ``unique`` points (its vanilla and each
    compressed point; its vanilla ran with vLLM's default, prefix caching on)."""
    v = throughput["vanilla"]
    n = v.get("num_prompts") or throughput["points"][0]["num_prompts"]
    common = {"commit": commit, "command": throughput.get("command"),
              "model_shape": throughput.get("model_shape"),
              "kv_cache_gib": throughput.get("kv_cache_gib")}
    vanilla = point("unique", "none", None, v["wall_s"], n / v["wall_s"], None,
                    max_running=v.get("peak_concurrency"), preemptions=v.get("preemptions"),
                    **common)
    out = [compare(vanilla, vanilla)]
    for p in throughput["points"]:
        out.append(compare(point(
            "unique", p["method"], p["ratio"], p["wall_s"], p["num_prompts"] / p["wall_s"],
            None, budget=p["budget"], input_len=p["input_len"], output_len=p["output_len"],
            num_prompts=p["num_prompts"], regime=p.get("regime"),
            max_running=p.get("peak_concurrency"), preemptions=p.get("preemptions"),
            **common), vanilla))
    return out


# ---------------------------------------------------------------- shared-prefix (offline)

def run_engine(spec: dict) -> list[dict]:
    """In the child process: one engine (benchmarks.throughput.make_engine), an untimed
    warm-up request sharing nothing, then each point of ``spec["points"]``."""
    from vllm import SamplingParams

    from benchmarks.throughput import make_engine, measure

    llm, kwargs = make_engine(spec)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    vocab = json.loads((Path(spec["model"]) / "config.json").read_text())["vocab_size"]

    def params(max_tokens: int, budget: int | None) -> SamplingParams:
        extra = {"kv_budget": budget} if budget else None
        return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                              detokenize=False, extra_args=extra)

    llm.generate([{"prompt_token_ids": random_ids(10_000, vocab, spec["input_len"])}],
                 params(8, spec.get("budget")), use_tqdm=False)
    results = []
    for index, pt in enumerate(spec["points"]):
        prefix, prompts = shared_prefix_prompts(index, vocab, spec["prefix_len"],
                                                spec["unique_len"], spec["num_prompts"])
        sp = params(pt["max_tokens"], pt.get("budget"))
        if spec.get("warm_prefix"):
            warm = prefix + random_ids((index, 2), vocab, spec["unique_len"])
            llm.generate([{"prompt_token_ids": warm}], params(8, pt.get("budget")),
                         use_tqdm=False)
        for i, ids in enumerate(prompts):
            engine.add_request(f"{index}-{i}", {"prompt_token_ids": ids}, sp)
        first: dict[str, float] = {}
        cached: dict[str, int] = {}

        def seen(outs, t: float, first=first, cached=cached) -> None:
            for out in outs:
                if out.outputs and out.outputs[0].token_ids:
                    first.setdefault(out.request_id, t)
                if out.finished:
                    cached[out.request_id] = out.num_cached_tokens or 0

        res = measure(engine, scheduler, pool, on_outputs=seen)
        res.update({"ttfts_s": [first.get(f"{index}-{i}") for i in range(len(prompts))],
                    "cached_tokens": [cached.get(f"{index}-{i}") for i in range(len(prompts))],
                    "max_num_seqs": kwargs["max_num_seqs"], "prompt_seed": index})
        results.append(res)
        print(f"@@DONE@@ {json.dumps({**pt, 'wall_s': res['wall_s']})}", flush=True)
    return results


def shared_point(args: argparse.Namespace, method: str, ratio: int | None,
                 budget: int | None, res: dict, common: dict) -> dict:
    n = args.num_prompts
    ttfts = [t for t in res["ttfts_s"] if t is not None]
    hits = sum(c or 0 for c in res["cached_tokens"])
    queries = n * (args.prefix_len + args.unique_len)
    return point(
        "shared-prefix", method, ratio, res["wall_s"], n / res["wall_s"],
        percentile_ms(ttfts, 50), budget=budget, ttft_p99_ms=percentile_ms(ttfts, 99),
        prefix_cache_hit_tokens=hits, prefix_cache_query_tokens=queries,
        prefix_cache_hit_rate=hits / queries,
        requests_with_hits=sum(1 for c in res["cached_tokens"] if c),
        max_running=res["peak_concurrency"], preemptions=res["preemptions"],
        out_tok_s=res["out_tok_s"], out_tokens=res["out_tokens"],
        peak_kv_blocks=res["peak_kv_blocks"], kv_blocks_total=res["kv_blocks_total"],
        block_size=res["block_size"], decode_step_ms_median=res["decode_step_ms_median"],
        max_num_seqs=res["max_num_seqs"], prompt_seed=res["prompt_seed"], **common)


def shared_prefix(args: argparse.Namespace, gpu: str, path: Path, common: dict) -> None:
    from benchmarks.throughput import spawn

    cuda = gpu != "cpu"
    input_len = args.prefix_len + args.unique_len
    base = {"model": args.model, "input_len": input_len, "output_len": args.output_len,
            "prefix_len": args.prefix_len, "unique_len": args.unique_len,
            "num_prompts": args.num_prompts, "kv_cache_gib": args.kv_cache_gib,
            "dtype": args.dtype or ("bfloat16" if cuda else "float32"),
            "max_num_seqs": args.max_num_seqs, "warm_prefix": args.warm_prefix,
            "engine": json.loads(args.all_engines_extra)}
    common = {**common, "prefix_len": args.prefix_len, "unique_len": args.unique_len,
              "output_len": args.output_len, "num_prompts": args.num_prompts,
              "prefix_cache_at_start": "warm" if args.warm_prefix else "cold",
              "reserve_output": args.reserve_output}
    module = "benchmarks.prefix"
    res, = spawn({**base, "method": "none", "points": [{"max_tokens": args.output_len}]},
                 module)
    if "error" in res:
        raise SystemExit("vanilla run failed")
    vanilla = shared_point(args, "none", None, None, res, common)
    vanilla = compare(vanilla, vanilla)
    report(vanilla)
    save(path, [vanilla], gpu, common["date"])
    ratios = [int(r) for r in args.ratios.split(",")]
    budgets = [input_len // r for r in ratios]
    results = spawn({**base, "method": args.method, "budget": min(budgets),
                     "reserve_output": args.reserve_output,
                     "points": [{"max_tokens": args.output_len, "budget": b}
                                for b in budgets]}, module)
    points = []
    for ratio, budget, res in zip(ratios, budgets, results, strict=True):
        if "error" in res:
            continue
        p = compare(shared_point(args, args.method, ratio, budget, res, common), vanilla)
        report(p)
        points.append(p)
    save(path, points, gpu, common["date"])
    if len(points) < len(ratios):
        raise SystemExit(f"{args.method} run failed")


# ---------------------------------------------------------------- multi-turn (online)

async def stream_completion(session, url: str, body: dict, timeout_s: float) -> dict:
    """POST a streamed completion; its TTFT, latency, generated ids and usage."""
    import aiohttp

    t0 = time.perf_counter()
    ttft, ids, usage, buf = None, [], None, b""
    async with session.post(url + "/v1/completions", json=body,
                            timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:500]}")
        # iter_any, not line iteration: the first event carries the whole prompt's ids
        async for chunk in resp.content.iter_any():
            buf += chunk
            *events, buf = buf.split(b"\n\n")
            for event in events:
                data = event.strip().removeprefix(b"data:").strip()
                if not data or data == b"[DONE]":
                    continue
                msg = json.loads(data)
                if msg.get("usage"):
                    usage = msg["usage"]
                for choice in msg.get("choices") or ():
                    toks = choice.get("token_ids") or ()
                    if toks and ttft is None:
                        ttft = time.perf_counter() - t0
                    ids.extend(toks)
    return {"ttft_s": ttft, "latency_s": time.perf_counter() - t0, "ids": ids,
            "usage": usage}


def request_body(prompt: list[int], max_tokens: int, xargs: dict | None) -> dict:
    from benchmarks.serving import SERVED_NAME

    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    if xargs:
        body["vllm_xargs"] = xargs
    return body


async def run_conversations(url: str, system: list[int], users: list[list[list[int]]],
                            output_len: int, stagger_s: float, think_s: float,
                            xargs: dict | None, deadline_s: float | None,
                            timeout_s: float = 900) -> tuple[list[dict], float, bool]:
    """Conversation c starts at c * stagger_s and sends users[c][t] after turn t-1's
    answer. Every request's record (conversation, turn, sent, TTFT, latency, prompt and
    generated lengths, cached tokens), the run's seconds (first send to last answer) and
    whether it was cut at ``deadline_s`` (the turns still going are then left out and
    the seconds are the deadline's)."""
    import aiohttp

    records: list[dict] = []
    t0 = time.perf_counter()

    async def conversation(c: int, session) -> None:
        await asyncio.sleep(c * stagger_s)
        prompt = first_turn(system, users[c][0])
        for t in range(len(users[c])):
            sent = time.perf_counter() - t0
            try:
                answer = await stream_completion(session, url,
                                                 request_body(prompt, output_len, xargs),
                                                 timeout_s)
            except Exception as err:  # noqa: BLE001 - recorded, the conversation ends
                records.append({"conversation": c, "turn": t, "sent_s": sent,
                                "prompt_len": len(prompt), "error": repr(err)[:500]})
                return
            usage = answer["usage"] or {}
            details = usage.get("prompt_tokens_details") or {}
            records.append({
                "conversation": c, "turn": t, "sent_s": sent,
                "done_s": time.perf_counter() - t0, "ttft_s": answer["ttft_s"],
                "latency_s": answer["latency_s"], "prompt_len": len(prompt),
                "output_len": len(answer["ids"]),
                "cached_tokens": details.get("cached_tokens")})
            if t + 1 < len(users[c]):
                if think_s:
                    await asyncio.sleep(think_s)
                prompt = next_turn(prompt, answer["ids"], users[c][t + 1])

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.ensure_future(conversation(c, session)) for c in range(len(users))]
        done, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()
    ends = [r["done_s"] for r in records if "done_s" in r]
    seconds = deadline_s if pending else max(ends, default=0.0)
    return sorted(records, key=lambda r: (r["conversation"], r["turn"])), seconds, bool(pending)


def summarize_turns(records: list[dict], seconds: float, turns: int) -> dict:
    """Seconds, completed req/s, TTFT p50/p99 (ms, all requests and p50 per turn), output
    tokens and the cached tokens the server reported, of a multi-turn run's records."""
    ok = [r for r in records if "error" not in r]
    ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    cached = [r["cached_tokens"] for r in ok if r["cached_tokens"] is not None]
    return {"seconds": seconds, "completed": len(ok),
            "failed": len(records) - len(ok),
            "req_s": len(ok) / seconds if seconds else None,
            "ttft_p50_ms": percentile_ms(ttfts, 50), "ttft_p99_ms": percentile_ms(ttfts, 99),
            "ttft_p50_ms_by_turn": [percentile_ms([r["ttft_s"] for r in ok if r["turn"] == t
                                                   and r["ttft_s"] is not None], 50)
                                    for t in range(turns)],
            "out_tokens": sum(r["output_len"] for r in ok),
            "prompt_tokens": sum(r["prompt_len"] for r in ok),
            "cached_tokens": sum(cached) if cached else None,
            "errors": sorted({r["error"] for r in records if "error" in r})[:5]}


def counters(url: str) -> tuple[dict[str, float], str]:
    """COUNTERS of the server's /metrics (absent: 0) and the page."""
    from benchmarks.serving import metric_sum

    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {key: metric_sum(text, name) or 0.0 for name, key in COUNTERS.items()}, text


def multi_turn_point(args: argparse.Namespace, method: str, cuda: bool, tokenizer: Path,
                     load_format: str, common: dict) -> dict:
    """Start a server for ``method``, run the conversations against it, stop it."""
    from benchmarks.serving import (
        Server,
        free_port,
        parse_iterations,
        parse_metrics,
        server_command,
        summarize_steps,
    )

    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    lens = turn_prompt_lens(args.system_len, args.user_len, args.output_len, args.turns)
    ours = method != "none"
    fixed = args.budget
    budget = (fixed or max(64, lens[0] // args.ratio)) if ours else None  # server default
    xargs = {"kv_compression_ratio": args.ratio} if ours and not fixed else None
    port = args.port or free_port()
    server, env = server_command(args, method, cuda, tokenizer, load_format, port,
                                 lens[-1] + args.output_len + 64, budget,
                                 prefix_caching=True)
    server.append("--enable-prompt-tokens-details")
    tmp = Path(tempfile.mkdtemp(prefix=f"prefix-{method}-"))
    system = random_ids((args.seed, 0), vocab, args.system_len)
    users = [[random_ids((args.seed, 1, c, t), vocab, args.user_len)
              for t in range(args.turns)] for c in range(args.conversations)]
    print(f"[{method}] server: {shlex.join(server)}", flush=True)
    srv = Server(server, env, port, tmp)
    try:
        srv.wait_healthy(args.server_timeout)
        print(f"[{method}] healthy; warm-up, then {args.conversations} conversations x "
              f"{args.turns} turns", flush=True)
        # untimed warm-up: a turn-1-sized prompt that shares nothing with the run
        warm = random_ids((args.seed, 2), vocab, lens[0])
        asyncio.run(run_conversations(srv.url, [], [[warm]], 8, 0, 0, xargs, None))
        before, _ = counters(srv.url)
        records, seconds, cut = asyncio.run(run_conversations(
            srv.url, system, users, args.output_len, args.stagger, args.think_time, xargs,
            args.deadline))
        after, page = counters(srv.url)
    except (RuntimeError, OSError) as err:
        print(f"[{method}] failed: {err}\nserver log: {srv.log}", flush=True)
        return {"method": method, "error": str(err)[-3000:]}
    finally:
        srv.stop()
        if args.server_logs:  # gzipped: with --step-log a line per engine step
            Path(args.server_logs).mkdir(parents=True, exist_ok=True)
            with open(srv.log, "rb") as src, gzip.open(
                    Path(args.server_logs) / f"prefix-multi-turn-{method}.log.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
    steps = parse_iterations(srv.log.read_text(errors="replace")) if args.step_log else None
    shutil.rmtree(tmp, ignore_errors=True)
    summary = summarize_turns(records, seconds, args.turns)
    diff = {key: after[key] - before[key] for key in after}
    hits, queries = diff["server_prefix_cache_hits"], diff["server_prefix_cache_queries"]
    p = point("multi-turn", method, args.ratio if ours and not fixed else None,
              summary.pop("seconds"), summary.pop("req_s"), summary.pop("ttft_p50_ms"),
              budget=fixed if ours else None, **summary, **diff,
              server_prefix_cache_hit_rate=hits / queries if queries else None,
              cut_at_deadline=cut,
              **{k: v for k, v in parse_metrics(page).items() if k.endswith("_mean")
                 or k.endswith("_mean_s")},
              server_command="python " + shlex.join(server[1:]),
              server_env={k: env[k] for k in ("VLLM_PLUGINS", "VLLM_CPU_KVCACHE_SPACE")
                          if k in env},
              vllm_xargs=xargs, requests=records,
              **common)
    if steps is not None:
        p["step_summary"] = summarize_steps(steps)
        p["max_running"] = p["step_summary"].get("running_max")
    return p


def multi_turn(args: argparse.Namespace, gpu: str, path: Path, common: dict) -> None:
    from benchmarks.serving import has_weights, resolve_tokenizer

    model = Path(args.model)
    tokenizer, _ = resolve_tokenizer(model, args.tokenizer)
    load_format = args.load_format or ("auto" if has_weights(model) else "dummy")
    cuda = gpu != "cpu"
    common = {**common, "conversations": args.conversations, "turns": args.turns,
              "system_len": args.system_len, "user_len": args.user_len,
              "output_len": args.output_len, "stagger_s": args.stagger,
              "think_time_s": args.think_time, "reserve_output": args.reserve_output,
              "prefix_cache_at_start": "cold",
              "prompt_lens": turn_prompt_lens(args.system_len, args.user_len,
                                              args.output_len, args.turns)}
    vanilla = multi_turn_point(args, "none", cuda, tokenizer, load_format, common)
    if "error" in vanilla:
        raise SystemExit("vanilla run failed")
    vanilla = compare(vanilla, vanilla)
    report(vanilla)
    save(path, [vanilla], gpu, common["date"])
    ours = multi_turn_point(args, args.method, cuda, tokenizer, load_format, common)
    if "error" in ours:
        raise SystemExit(f"{args.method} run failed")
    ours = compare(ours, vanilla)
    report(ours)
    save(path, [ours], gpu, common["date"])
    if vanilla["failed"] or ours["failed"] or vanilla["cut_at_deadline"] \
            or ours["cut_at_deadline"]:
        raise SystemExit("some requests failed or were cut at the deadline")


# ---------------------------------------------------------------- report, plot, main

def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def report(p: dict) -> None:
    """One line per point (the JSON line first, for a run cut short)."""
    print(json.dumps({k: v for k, v in p.items() if k not in ("requests",)}), flush=True)
    hits = p.get("prefix_cache_hit_tokens", p.get("server_prefix_cache_hits"))
    label = "vanilla+PC" if p["method"] == "none" else series_label(p)
    print(f"{p['workload']:>13} {label:>16}: "
          f"{fmt(p['seconds'], '.2f')} s, {fmt(p['req_s'], '.3f')} req/s, "
          f"TTFT p50 {fmt(p['ttft_p50_ms'], '.0f')} ms, vs vanilla+PC "
          f"{fmt(p['speedup_vs_vanilla_pc'], '.3f')}x, hit tokens {fmt(hits, '.0f')}, "
          f"max running {fmt(p.get('max_running'), '')}", flush=True)


def series_label(p: dict) -> str:
    """A compressed point's bar label: method and ratio, or method and fixed budget."""
    return f"{p['method']} x{p['ratio']}" if p.get("ratio") else \
        f"{p['method']} budget {p.get('budget')}"


def workload_label(p: dict) -> str:
    """A point's group on the plot: its workload, and how its conversations arrived."""
    stagger = p.get("stagger_s")
    if stagger is None:
        return p["workload"]
    return f"{p['workload']}\n" + ("all at once" if stagger == 0 else f"{stagger:g} s apart")


def bar_groups(points: list[dict], key: str) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The workload groups (``workload_label``, in WORKLOADS order, then by stagger) and,
    per series label, group -> ``key`` of the compressed points that have it (the last one
    of a label and group)."""
    points = [p for p in points if p["method"] != "none" and p.get(key)]
    order = {w: i for i, w in enumerate(WORKLOADS)}
    ranked = sorted(points, key=lambda p: (order.get(p["workload"], len(order)),
                                           p.get("stagger_s") or 0))
    workloads = list(dict.fromkeys(workload_label(p) for p in ranked))
    series: dict[str, dict[str, float]] = {}
    for p in points:
        series.setdefault(series_label(p), {})[workload_label(p)] = p[key]
    return workloads, dict(sorted(series.items()))


def plot(files: list[Path], out: Path) -> None:
    """Bars per workload: the time speedup of each compressed point vs vanilla+PC, and
    its TTFT p50 gain (vanilla's / its own) where there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [json.loads(f.read_text()) for f in files]
    points = [p for d in data for p in d["points"]]
    for p in points:
        if p.get("ttft_p50_ms") and p.get("vanilla_pc_ttft_p50_ms"):
            p["ttft_gain"] = p["vanilla_pc_ttft_p50_ms"] / p["ttft_p50_ms"]
    panels = [("speedup_vs_vanilla_pc", "time: vanilla+PC seconds / seconds"),
              ("ttft_gain", "TTFT p50: vanilla+PC / ours")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        workloads, series = bar_groups(points, key)
        width = 0.8 / max(len(series), 1)
        for i, (label, values) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width
                  for j, w in enumerate(workloads) if w in values]
            ys = [values[w] for w in workloads if w in values]
            bars = ax.bar(xs, ys, width, label=label, color=f"C{i}")
            ax.bar_label(bars, labels=[f"{y:.2f}x" for y in ys], fontsize=8)
        ax.axhline(1.0, color="k", ls="--", lw=1, label="vanilla vLLM + prefix caching")
        ax.set_xticks(range(len(workloads)), workloads)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    gpus = " / ".join(sorted({d["gpu"] for d in data}))
    fig.suptitle(f"Prefix-sharing workloads, {gpus}: vllm-adakv vs vanilla vLLM 0.32 with "
                 "prefix caching, same run (> 1: ours better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def add_common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True, help="model folder (config; weights optional)")
    ap.add_argument("--method", default="adakv")
    ap.add_argument("--kv-cache-gib", type=float, default=None,
                    help="KV cache size (CUDA: kv_cache_memory_bytes; CPU: "
                    "VLLM_CPU_KVCACHE_SPACE for servers, whole GiB)")
    ap.add_argument("--reserve-output", type=int, default=0,
                    help="--kv-reserve-output of ours (0: none)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--commit", default=None,
                    help="recorded in the points (default: COMMIT file, else git)")
    ap.add_argument("--date", default=None, help="of the result file (default: today)")
    ap.add_argument("--out", default="benchmarks/results", help="folder of the result JSON")
    ap.add_argument("--suffix", default="", help="appended to the result file's name")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--engine":
        print("@@POINTS@@" + json.dumps(run_engine(json.loads(sys.argv[2]))), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="workload", required=True)
    sp = sub.add_parser("shared-prefix", help="offline: one shared prefix, N requests at once")
    add_common(sp)
    sp.add_argument("--prefix-len", type=int, default=5000)
    sp.add_argument("--unique-len", type=int, default=1000)
    sp.add_argument("--output-len", type=int, default=500)
    sp.add_argument("--num-prompts", type=int, default=64)
    sp.add_argument("--ratios", default="8",
                    help="budget = (prefix + unique) // ratio, each a point of one engine")
    sp.add_argument("--max-num-seqs", type=int, default=256)
    sp.add_argument("--warm-prefix", action="store_true",
                    help="an untimed request with the prefix before each point")
    sp.add_argument("--all-engines-extra", default="{}",
                    help="JSON of extra LLM(...) arguments for both engines")
    mt = sub.add_parser("multi-turn", help="online: conversations re-sending their history")
    add_common(mt)
    mt.add_argument("--conversations", type=int, default=32)
    mt.add_argument("--turns", type=int, default=6)
    mt.add_argument("--system-len", type=int, default=1000, help="shared system prompt")
    mt.add_argument("--user-len", type=int, default=800, help="new user tokens per turn")
    mt.add_argument("--output-len", type=int, default=200, help="generated tokens per turn")
    mt.add_argument("--stagger", type=float, default=1.0,
                    help="seconds between conversation starts")
    mt.add_argument("--think-time", type=float, default=0.0,
                    help="seconds between an answer and the next turn")
    mt.add_argument("--ratio", type=int, default=8,
                    help="ours: budget = each request's prompt tokens / ratio")
    mt.add_argument("--budget", type=int, default=None,
                    help="ours: this fixed budget for every request instead of --ratio")
    mt.add_argument("--deadline", type=float, default=None,
                    help="seconds: cut a run still going then (its point says so)")
    mt.add_argument("--tokenizer", default=None,
                    help="default: the model's, else a word-level one of its vocabulary")
    mt.add_argument("--load-format", default=None,
                    help="default: dummy for a folder without weights, else auto")
    mt.add_argument("--vanilla-backend", default="TRITON_ATTN",
                    help="vanilla's attention backend on CUDA ('' for vLLM's choice)")
    mt.add_argument("--seed", type=int, default=0)
    mt.add_argument("--port", type=int, default=0, help="0: a free port per server")
    mt.add_argument("--server-timeout", type=float, default=900, help="seconds to /health")
    mt.add_argument("--step-log", action="store_true",
                    help="servers log every engine step; the point keeps step_summary "
                    "(max running, KV usage)")
    mt.add_argument("--server-logs", default=None,
                    help="copy each server's log here (prefix-multi-turn-METHOD.log.gz)")
    mt.add_argument("--extra-server-args", default="",
                    help="appended to both servers' flags; write --extra-server-args='...'")
    uq = sub.add_parser("unique-from", help="add benchmarks/throughput.py results as "
                        "'unique' points")
    uq.add_argument("files", nargs="+", type=Path)
    uq.add_argument("--commit", default=None, help="recorded in the points")
    mg = sub.add_parser("merge", help="merge results files (e.g. of two device calls)")
    mg.add_argument("files", nargs="+", type=Path)
    for p in (uq, mg):
        p.add_argument("--into", type=Path, default=None,
                       help="the results file to merge into (default: OUT/prefix-<gpu>-"
                       "<date>.json of the first file's GPU and date)")
        p.add_argument("--out", default="benchmarks/results")
    pl = sub.add_parser("plot", help="PNG: speedup vs vanilla+PC per workload")
    pl.add_argument("files", nargs="+", type=Path)
    pl.add_argument("--out", type=Path, default=None, help="default: the first file's .png")
    args = ap.parse_args()

    if args.workload == "plot":
        out = args.out or args.files[0].with_suffix(".png")
        plot(args.files, out)
        print(out)
        return
    if args.workload in ("unique-from", "merge"):
        datas = [json.loads(f.read_text()) for f in args.files]
        gpu, date = datas[0]["gpu"], datas[0]["date"]
        path = args.into or results_path(Path(args.out), gpu, date)
        for data in datas:
            new = unique_points(data, args.commit) if args.workload == "unique-from" \
                else data["points"]
            save(path, new, gpu, json.loads(path.read_text())["date"] if path.is_file()
                 else date)
        print(f"wrote {path}")
        return
    from benchmarks.serving import device_name

    gpu = device_name()
    date = args.date or dt.date.today().isoformat()
    path = results_path(Path(args.out), gpu, date, args.suffix)
    common = {"commit": current_commit(args.commit), "date": date,
              "command": "python -m benchmarks.prefix " + shlex.join(sys.argv[1:]),
              "model_shape": Path(args.model).name, "kv_cache_gib": args.kv_cache_gib,
              "machine": f"{gpu}, {os.cpu_count()} CPU cores"}
    if args.workload == "shared-prefix":
        shared_prefix(args, gpu, path, common)
    else:
        multi_turn(args, gpu, path, common)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Decode events of many requests (issue 29): host time, device time, launches.

    python -m benchmarks.decode_event [--rows 32] [--prompt 1000] [--generated 2048]
        [--decode-budgets 512,1024,2048] [--methods adakv,snapkv] [--interval 32]
        [--layers 1] [--per-layer] [--out DIR] [--smoke]

Builds the state regime-D requests have after several events (Llama-3.1-8B layers: 32
query heads, 8 KV heads, d=128, bf16, block 16; Ada-KV counts uneven over heads, their
sum the decode budget's selection; a tail of one interval; the window queries in a
``QueryRing``; ``--layers`` layers in one buffer, as vLLM allocates them), then times
the events of all rows in every layer as the CUDA backend runs them before a step's
forward (``_decode_events_before``): ``DecodeEvents.across_layers``, one launch set for
all layers, or with ``--per-layer`` one ``DecodeEvents`` per layer (the way before it).
Reported per event step: the host's time to issue it (the step waits for this), the
device's time (CUDA events around it, after a sync), and the profiler's kernel launches
and top kernels; Ada-KV points also with candidates sized by each row's true largest
count (``_exact_width``). On the CPU (``--smoke``) the same code runs on the torch
references: a check that the script runs, not a measurement.
Writes ``decode-event-<gpu>-<date>[suffix].json``.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import inspect
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.machine import current_commit, device_tag
from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.decode_plan import plan_decode
from vllm_adakv.kernels.decode import row_table
from vllm_adakv.memory import plan_compression
from vllm_adakv.worker.batch import RowPlan
from vllm_adakv.worker.compressor import CompressionStore, LayerPages, RequestKV
from vllm_adakv.worker.decode_events import DecodeEvents, Segment
from vllm_adakv.worker.query_ring import QueryRing
from vllm_adakv.worker.range_pool import RangePool

Q_HEADS, KV_HEADS, DIM, BS, WINDOW = 32, 8, 128, 16, 32


def event_layout(rows: int, prompt: int, generated: int, decode_budget: int, method: str,
                 interval: int, device: torch.device, dtype: torch.dtype, layers: int = 1,
                 seed: int = 0) -> dict:
    """The store, caches (``layers`` layers in one buffer, as vLLM allocates them), block
    table, ring and due segments of ``rows`` requests due for their event at
    ``S = prompt + generated`` in every layer (module doc)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = KVCompressionConfig(method=method, budget=decode_budget, window=WINDOW,
                              decode_budget=decode_budget, decode_interval=interval)
    store = CompressionStore(cfg, tuple(range(layers)))
    seq = prompt + generated
    per_row = -(-seq // BS)
    num_blocks = rows * per_row + 1
    key = torch.randn(layers * num_blocks, KV_HEADS, BS, DIM, device=device, dtype=dtype)
    value = torch.randn(layers * num_blocks, KV_HEADS, BS, DIM, device=device, dtype=dtype)
    table = (torch.randperm(num_blocks - 1, generator=gen)[: rows * per_row] + 1).view(
        rows, per_row).to(device, torch.int32)
    ring = QueryRing(layers, rows, WINDOW, Q_HEADS, DIM, dtype, device)
    ring.buffer.normal_()
    pool = RangePool(rows, layers, KV_HEADS, device)
    due = []
    selectable = decode_budget - WINDOW
    uniform = method != "adakv"
    for r in range(rows):
        plan = plan_compression(cfg, prompt, KV_HEADS, BS, layers)
        decode = plan_decode(cfg, prompt, KV_HEADS, BS, layers, interval=interval,
                             budget=decode_budget)
        if generated < decode.first_event + interval or generated % interval:
            raise ValueError(f"--generated must be a multiple of --interval past the first "
                             f"event ({decode.first_event})")
        row = RowPlan(row=r, req_id=f"r{r}", prompt_len=prompt, context_start=seq,
                      query_len=1, plan=plan, decode=decode)
        state = store.requests[row.req_id] = RequestKV(prompt_len=prompt)
        capacity = decode.page_blocks * KV_HEADS
        for k in range(layers):
            if uniform:
                counts = torch.full((KV_HEADS,), selectable)
            else:  # uneven heads, the layer's total
                share = torch.distributions.Dirichlet(torch.ones(KV_HEADS)).sample()
                counts = (share * KV_HEADS * selectable).floor().long().clamp(
                    max=4 * selectable)
                counts[0] += KV_HEADS * selectable - int(counts.sum())
            pages = -(-counts // BS)
            page_start = (torch.cumsum(pages, 0) - pages).int() + k * capacity
            state.pages[f"l{k}"] = LayerPages(
                page_start=page_start.to(device), counts=counts.int().to(device),
                capacity=capacity, tail_start=seq - interval - WINDOW,
                last_event=generated - interval,
                count_bound=selectable if uniform else KV_HEADS * selectable)
            state.recent_queries[f"l{k}"] = ring.view(k, pool.slot(row.req_id))
        due.append(Segment(row, seq, seq, True))
    return dict(store=store, key=key, value=value, table=table, due=due, pool=pool, ring=ring,
                layers=layers, num_blocks=num_blocks,
                saved={(r, n): p for r, s in store.requests.items() for n, p in s.pages.items()})


def run_events(x: dict, per_layer: bool = False) -> None:
    """The events of every row in every layer, from the saved state: in one launch set
    (``DecodeEvents.across_layers``) or one per layer (``per_layer``, and trees before
    it), as the CUDA backend runs them before a step's forward."""
    store, pool = x["store"], x["pool"]
    for (req_id, name), pages in x["saved"].items():
        store.requests[req_id].pages[name] = pages
    hook = getattr(pool, "store_events", None) or pool.store_layer
    if hasattr(DecodeEvents, "across_layers") and not per_layer:
        from vllm_adakv.worker.decode_events import EventLayer

        nb = x["num_blocks"]
        DecodeEvents.across_layers(
            store, [EventLayer(f"l{k}", k, k * nb) for k in range(x["layers"])], x["key"],
            x["value"], x["table"], DIM ** -0.5, x["ring"], pool.slot, on_event=hook,
            in_place=True).run(x["due"])
        return
    extra = {}
    if "ring" in inspect.signature(DecodeEvents).parameters:  # (not in trees before it)
        extra = {"ring": x["ring"], "slot_of": pool.slot}
    nb = x["num_blocks"]
    for k in range(x["layers"]):
        DecodeEvents(store, f"l{k}", k, x["key"][k * nb:(k + 1) * nb],
                     x["value"][k * nb:(k + 1) * nb], x["table"], DIM ** -0.5,
                     on_event=hook, in_place=True, **extra).run(x["due"])


def score_inputs(x: dict) -> tuple:
    """The in-place scoring's arguments for the saved state (as ``DecodeEvents`` builds
    them for layer 0: its chunk starts at entry 0)."""
    segs, store, ring, pool = x["due"], x["store"], x["ring"], x["pool"]
    pages = [x["saved"][(s.row.req_id, "l0")] for s in segs]
    dev = x["key"].device
    seq = [s.end for s in segs]
    tails = [p.tail_start for p in pages]
    table = row_table(torch.tensor([s.row.row for s in segs]), torch.arange(len(segs)),
                      torch.zeros(len(segs)), torch.zeros(len(segs)), torch.tensor(tails),
                      torch.tensor(seq)).to(dev)
    index = [ring.index(pool.slot(s.row.req_id), p) for s in segs
             for p in range(s.end - WINDOW, s.end)]
    queries = ring.buffer[0][index].view(len(segs), WINDOW, Q_HEADS, DIM)
    width = max(p.count_bound + s - WINDOW - t for p, s, t in zip(pages, seq, tails, strict=True))
    local = torch.stack([p.page_start for p in pages])  # (layer 0: chunk 0)
    counts = torch.stack([p.counts for p in pages])
    del store
    return queries, x["key"], local, counts, x["table"], table, width, DIM ** -0.5


def score_splits(x: dict) -> list[dict]:
    """Device time of the in-place scoring alone at each split count of its statistics
    pass (CUDA), and the compiled event kernels' registers and spills."""
    import triton

    from benchmarks.kernels import compiled_kernel_resources
    from vllm_adakv.kernels import triton_recompact, triton_reselect

    args = score_inputs(x)
    out = []
    for splits in (None, 1, 2, 4, 8, 16):
        ms = triton.testing.do_bench(lambda s=splits: triton_reselect.score_decode_event_triton(
            *args, gqa_reduce="mean", pooling="max", pool_kernel=7, num_splits=s))
        out.append({"num_splits": splits, "us": round(1e3 * ms, 1)})
    for fn in (triton_reselect._event_stats, triton_reselect._event_scores,
               triton_recompact._gather_candidates):
        out.append({"kernel": fn.__name__ if hasattr(fn, "__name__") else str(fn),
                    "compiled": compiled_kernel_resources(fn)})
    return out


def measure(x: dict, reps: int, cuda: bool, profile: bool = True,
            per_layer: bool = False, warmup: int = 3) -> dict:
    """Host and device time of the events of every layer (medians over ``reps``), launches
    and top kernels from a profiled run."""
    def run_event(x: dict) -> None:
        run_events(x, per_layer)

    for _ in range(warmup):
        run_event(x)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    host, device = [], []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)
            start.record()
        run_event(x)
        host.append(time.perf_counter() - t0)
        if cuda:
            end.record()
            sync()
            device.append(start.elapsed_time(end) / 1e3)
    out = {"host_ms": 1e3 * sorted(host)[len(host) // 2]}
    if cuda:
        # Device time of back-to-back events without the host in the way: a graph-free
        # lower bound is not available (the event's host work decides its launches), so
        # this is the device time between the first and last launch of one event.
        out["wall_ms"] = 1e3 * sorted(device)[len(device) // 2]
    if not profile:
        return out
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run_event(x)
        sync()
    kernels: collections.Counter = collections.Counter()
    launches = 0
    gpu_us = 0.0
    for e in prof.events():
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
            launches += 1
            kernels[e.name[:80]] += e.device_time
            gpu_us += e.device_time
    out["launches"] = launches
    if cuda:
        out["kernel_ms"] = gpu_us / 1e3
        if x["layers"] == 1:
            out["score_splits"] = score_splits(x)
        out["top_kernels"] = [{"name": n, "us": round(t, 1)} for n, t in kernels.most_common(12)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=1000)
    ap.add_argument("--generated", type=int, default=2048)
    ap.add_argument("--decode-budgets", default="512,1024,2048")
    ap.add_argument("--methods", default="adakv,snapkv")
    ap.add_argument("--interval", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--suffix", default="")
    ap.add_argument("--layers", type=int, default=1,
                    help="layers whose events run together (one buffer, as vLLM's)")
    ap.add_argument("--per-layer", action="store_true",
                    help="one launch set per layer (as before DecodeEvents.across_layers)")
    ap.add_argument("--smoke", action="store_true", help="small shapes on the CPU (a check)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    rows, prompt, generated, reps = args.rows, args.prompt, args.generated, args.reps
    warmup = 3
    if args.smoke:
        rows, prompt, generated, reps, warmup = 2, 300, 128, 1, 0
    points = []
    budgets = [96] if args.smoke else [int(b) for b in args.decode_budgets.split(",")]
    for method in args.methods.split(","):
        for budget in budgets:
            x = event_layout(rows, prompt, generated, budget, method, args.interval, device,
                             dtype, layers=args.layers)
            point = {"method": method, "rows": rows, "layers": args.layers,
                     "per_layer": args.per_layer, "prompt": prompt, "generated": generated,
                     "decode_budget": budget, "interval": args.interval,
                     **measure(x, reps, cuda, per_layer=args.per_layer, warmup=warmup)}
            if method == "adakv":
                # The same event with each head's candidates sized by the rows' true
                # largest count instead of the host bound (what a host mirror would give).
                x["saved"] = {r: replace(p, count_bound=int(p.counts.max()))
                              for r, p in x["saved"].items()}
                exact = measure(x, reps, cuda, profile=False, per_layer=args.per_layer,
                                warmup=warmup)
                point.update({f"{k}_exact_width": v for k, v in exact.items()})
            points.append(point)
            print(json.dumps(point), flush=True)
            del x
            if cuda:
                torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    date = dt.date.today().isoformat()
    result = {"gpu": gpu, "date": date, "commit": current_commit(None),
              "command": " ".join(["python -m benchmarks.decode_event", *sys.argv[1:]]),
              "torch": torch.__version__, "points": points}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"decode-event-{device_tag(gpu)}-{date}{args.suffix}.json").write_text(
        json.dumps(result, indent=1))
    for p in points:
        print(f"{p['method']:>8} B={p['decode_budget']:>5} rows={p['rows']} layers="
              f"{p.get('layers', 1)}{' (per layer)' if p.get('per_layer') else ''}: host "
              f"{p['host_ms']:.2f} ms, device {p.get('wall_ms', float('nan')):.2f} ms, "
              f"kernels {p.get('kernel_ms', float('nan')):.2f} ms, {p['launches']} launches "
              "per event step" + (f"; exact width: host {p['host_ms_exact_width']:.2f} ms, "
                                   f"device {p.get('wall_ms_exact_width', float('nan')):.2f} ms"
                                   if "host_ms_exact_width" in p else ""))


if __name__ == "__main__":
    main()

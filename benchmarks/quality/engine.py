"""One vLLM engine (one method, one budget) over a batch of token-id prompts.

Run in its own process so that every (method, budget) gets a fresh engine and KV space:

    python -m benchmarks.quality.engine JOB.json RESULT.json

JOB: ``{"model", "device", "dtype", "max_model_len", "compression": {...} | null,
"requests": [{"id", "prompt": [ids], "forced": [ids], "max_tokens", "xargs"?}]}``
(``xargs``: the request's vllm_xargs, e.g. its own ``kv_compression`` and ``kv_budget``).
RESULT: ``{"outputs": {id: [generated ids after the forced ones]}, "kept_per_head":
{id: mean kept tokens per (layer, KV head)} (compressed requests), "wall_s", "load_s"}``;
with ``"logprobs": true`` in the job also ``"logprobs": {id: [log-probability of each
sampled token, forced ones included]}`` (vLLM's default raw logprobs: the model's, before
the forcing logits processor).
Generation is greedy with ``ignore_eos`` (fixed length; the caller cuts at the first
end-of-turn token), so that forced end-of-turn tokens in the question do not stop it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Build the engine, generate every request, return the outputs."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from benchmarks.quality.forcing import EXTRA_ARG, ForcedPrefix

    t0 = time.perf_counter()
    kwargs: dict[str, Any] = dict(
        model=job["model"], dtype=job.get("dtype", "float32"), seed=0,
        max_model_len=job["max_model_len"], enforce_eager=job.get("enforce_eager", True),
        logits_processors=[ForcedPrefix], enable_prefix_caching=False,
    )
    if job.get("compression"):
        kwargs["additional_config"] = {"kv_compression": job["compression"]}
    kwargs.update(job.get("engine", {}))
    llm = LLM(**kwargs)
    load_s = time.perf_counter() - t0
    prompts, params = [], []
    for r in job["requests"]:
        forced = list(r.get("forced", []))
        prompts.append(TokensPrompt(prompt_token_ids=list(r["prompt"])))
        extra = {**r.get("xargs", {}), **({EXTRA_ARG: forced} if forced else {})}
        params.append(SamplingParams(
            temperature=0.0, max_tokens=len(forced) + r["max_tokens"], ignore_eos=True,
            extra_args=extra or None, detokenize=False,
            logprobs=0 if job.get("logprobs") else None,
        ))
    t1 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall_s = time.perf_counter() - t1
    result: dict[str, list[int]] = {}
    kept: dict[str, float] = {}
    logprobs: dict[str, list[float]] = {}
    usage = _page_usage()
    for r, out in zip(job["requests"], outs, strict=True):
        ids = list(out.outputs[0].token_ids)
        if job.get("logprobs"):
            logprobs[str(r["id"])] = [float(step[tok].logprob) for tok, step in
                                      zip(ids, out.outputs[0].logprobs, strict=True)]
        forced = list(r.get("forced", []))
        if ids[: len(forced)] != forced:
            raise RuntimeError(f"request {r['id']}: forced question tokens were not followed")
        result[str(r["id"])] = ids[len(forced):]
        u = usage.get(out.request_id)
        if u is not None:
            kept[str(r["id"])] = u.kept_tokens / (len(u.layer_pages) * u.num_kv_heads)
    res = {"outputs": result, "kept_per_head": kept, "wall_s": wall_s, "load_s": load_s}
    if job.get("logprobs"):
        res["logprobs"] = logprobs
    return res


def _page_usage() -> dict[str, Any]:
    """The in-process worker's page usage by LLM request id (compressed requests only):
    kept tokens per (layer, head), the memory a request actually holds."""
    from vllm_adakv.worker.context import current

    usage: dict[str, Any] = {}
    for store in [current().store]:
        if store is not None:
            # The engine's ids carry a random suffix ("<LLM id>-<8 chars>").
            usage.update({rid.rsplit("-", 1)[0]: u for rid, u in store.page_usage.items()})
    return usage


def run_in_subprocess(job: dict[str, Any], workdir: Path, *, kv_space_gib: int = 2,
                      env: dict[str, str] | None = None, timeout: float | None = None,
                      log: Path | None = None) -> dict[str, Any]:
    """Run ``job`` through ``python -m benchmarks.quality.engine`` in a fresh process."""
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{time.time_ns()}"
    job_path, res_path = workdir / f"job-{tag}.json", workdir / f"result-{tag}.json"
    job_path.write_text(json.dumps(job))
    full_env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(kv_space_gib),
                    VLLM_ENABLE_V1_MULTIPROCESSING="0",
                    PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                             os.environ.get("PYTHONPATH")])))
    full_env.pop("TRITON_INTERPRET", None)
    full_env.update(env or {})
    out = open(log, "a") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.quality.engine", str(job_path), str(res_path)],
            cwd=REPO, env=full_env, stdout=out, stderr=subprocess.PIPE, text=True,
            timeout=timeout)
    finally:
        if log:
            out.close()
    if proc.returncode != 0 or not res_path.is_file():
        raise RuntimeError(f"engine failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(res_path.read_text())
    job_path.unlink()
    res_path.unlink()
    return result


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    job_file, result_file = sys.argv[1], sys.argv[2]
    res = run_job(json.loads(Path(job_file).read_text()))
    Path(result_file).write_text(json.dumps(res))

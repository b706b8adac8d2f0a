"""How the backends hand an fp8 KV cache to the compression kernels (issue 30).

Which ``--kv-cache-dtype`` values compression takes (CUDA: the model's dtype and fp8; CPU:
the model's dtype), how the CUDA backend views vLLM's raw fp8 bytes (as TRITON_ATTN does),
which scales and queries it passes, and what its warm-up compiles. The kernels themselves
are tested on fp8 caches in ``tests/kernels``; the worker's whole step in
``tests/worker/test_compressor.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_adakv.config import (
    CUDA_FP8_KV_CACHE_DTYPES,
    FP8_KV_CACHE_DTYPES,
    KVCompressionConfig,
    KVCompressionConfigError,
    check_kv_cache_dtype,
)
from vllm_adakv.worker.backend import check_cache_dtype, dequantize_query, layer_scales


@pytest.mark.parametrize("dtype", ["auto", None, *CUDA_FP8_KV_CACHE_DTYPES])
def test_cuda_takes_the_model_dtype_and_fp8(dtype):
    check_kv_cache_dtype(dtype, "cuda")
    check_cache_dtype(dtype, "cuda")


def test_fp8_e5m2_on_cuda_is_an_error_naming_the_flag():
    """vLLM 0.32 stops any fp8_e5m2 engine on TRITON_ATTN (an assert in its attention
    layer); compression says so at start-up instead."""
    for check in (check_kv_cache_dtype, check_cache_dtype):
        with pytest.raises(KVCompressionConfigError,
                           match="--kv-cache-dtype fp8_e5m2 .*use --kv-cache-dtype fp8"):
            check("fp8_e5m2", "cuda")


@pytest.mark.parametrize("dtype", FP8_KV_CACHE_DTYPES)
def test_fp8_on_cpu_is_an_error_naming_the_flag(dtype):
    for check in (check_kv_cache_dtype, check_cache_dtype):
        with pytest.raises(KVCompressionConfigError,
                           match=f"--kv-cache-dtype {dtype} .*CPU.*--kv-cache-dtype auto"):
            check(dtype, "cpu")
    check_kv_cache_dtype("auto", "cpu")


@pytest.mark.parametrize("dtype", ["bfloat16", "int8_per_token_head", "fp8_per_token_head"])
def test_other_cache_dtypes_are_an_error_naming_the_flag(dtype):
    with pytest.raises(KVCompressionConfigError,
                       match=f"--kv-cache-dtype {dtype} .*supported: auto, fp8, "):
        check_kv_cache_dtype(dtype, "cuda")


def test_fp8_strings_are_those_vllm_backends_accept():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    for backend in (CPUAttentionBackend, TritonAttentionBackend):
        assert set(FP8_KV_CACHE_DTYPES) <= set(backend.supported_kv_cache_dtypes)


def _triton_impl(kv_cache_dtype: str, heads=4, kv_heads=2, dim=16):
    from vllm_adakv.worker.cuda_backend import AdaKVTritonImpl

    return AdaKVTritonImpl(num_heads=heads, head_size=dim, scale=dim**-0.5,
                           num_kv_heads=kv_heads, alibi_slopes=None, sliding_window=None,
                           kv_cache_dtype=kv_cache_dtype)


@pytest.mark.parametrize("kv_cache_dtype", FP8_KV_CACHE_DTYPES)
def test_cuda_views_fp8_bytes_as_triton_attn_does(kv_cache_dtype):
    """vLLM allocates an fp8 cache as uint8 and TRITON_ATTN reads it as the platform's fp8
    dtype whatever the string (``float8_e4m3fn`` on CUDA); the backend's logical views are
    the same bytes, head-major."""
    from vllm.platforms import current_platform

    impl = _triton_impl(kv_cache_dtype)
    dim = impl.head_size
    raw = torch.randint(0, 255, (3, 2, 32, 2 * dim), dtype=torch.uint8)
    key, value = impl._split_kv(raw)
    assert key.dtype == value.dtype == current_platform.fp8_dtype() == torch.float8_e4m3fn
    assert key.shape == value.shape == (3, 2, 32, dim)
    # TRITON_ATTN's own split (triton_attn.py): [nb, bs, H, 2D] then the fp8 view.
    want_k, want_v = raw.transpose(1, 2).split(dim, dim=-1)
    assert torch.equal(key.transpose(1, 2).view(torch.uint8), want_k)
    assert torch.equal(value.transpose(1, 2).view(torch.uint8), want_v)
    assert key.data_ptr() == raw.data_ptr()  # a view: compaction writes vLLM's cache


def test_cuda_keeps_a_model_dtype_cache():
    impl = _triton_impl("auto")
    raw = torch.randn(3, 2, 32, 2 * impl.head_size, dtype=torch.bfloat16)
    key, value = impl._split_kv(raw)
    assert key.dtype == torch.bfloat16
    assert torch.equal(key, raw[..., : impl.head_size])
    assert torch.equal(value, raw[..., impl.head_size:])


def test_layer_scales_only_for_fp8_caches():
    layer = SimpleNamespace(_k_scale=torch.tensor(0.5), _v_scale=torch.tensor(2.0))
    k, v = layer_scales(layer, torch.zeros(1, 1, 32, 8, dtype=torch.float8_e4m3fn))
    assert k is layer._k_scale and v is layer._v_scale  # read on the device, never copied
    assert layer_scales(layer, torch.zeros(1, 1, 32, 8)) == (None, None)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("shape3", [False, True])
def test_fp8_queries_are_dequantized_as_vllm_attends_with_them(per_head, shape3):
    """TRITON_ATTN with an fp8 cache gets queries quantized to fp8 (``layer._q_scale``,
    per tensor or per KV head); the compressed path reads ``fp8 * q_scale``."""
    tokens, kv_heads, group, dim = 5, 2, 3, 8
    q = torch.randn(tokens, kv_heads * group, dim)
    scale = torch.tensor([0.5, 3.0]) if per_head else torch.tensor(0.25)
    per_query_head = scale.reshape(-1).repeat_interleave(group) if per_head else scale
    fp8 = (q / per_query_head.reshape(-1, 1)).to(torch.float8_e4m3fn)
    want = fp8.float() * per_query_head.reshape(-1, 1)
    given = fp8 if shape3 else fp8.view(tokens, -1)
    got = dequantize_query(given, scale, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == given.shape
    torch.testing.assert_close(got.view(want.shape), want.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("cache_dtype,want", [("auto", None),
                                              ("fp8", torch.float8_e4m3fn),
                                              ("fp8_e4m3", torch.float8_e4m3fn)])
def test_cuda_warm_up_compiles_for_the_cache_dtype(monkeypatch, cache_dtype, want):
    import vllm_adakv.kernels.warmup as warmup
    from vllm_adakv.worker import cuda_backend

    seen = {}

    def fake_warm_up(*args, **kwargs):
        seen.update(kwargs)
        return 0.0

    monkeypatch.setattr(warmup, "warm_up", fake_warm_up)
    spec = SimpleNamespace(compression=KVCompressionConfig(method="adakv", budget=64),
                           num_kv_heads=2, head_size=16, block_size=16,
                           compressed_layers=(0, 1))
    model = SimpleNamespace(dtype=torch.bfloat16, get_num_attention_heads=lambda p: 4)
    config = SimpleNamespace(model_config=model, parallel_config=None,
                             cache_config=SimpleNamespace(cache_dtype=cache_dtype))
    cuda_backend._warm_up_kernels(spec, config, "cpu")
    assert seen["cache_dtype"] == want


def test_cuda_forward_hands_the_headwise_decode_fp8_views_scales_and_queries(monkeypatch):
    """``AdaKVTritonImpl.forward`` after vLLM's kernel (stubbed: it needs a GPU) on a step
    with head-wise rows: the decode gets the fp8 views of vLLM's uint8 cache, the layer's
    scale tensors themselves, and the fp8 queries dequantized to the output's dtype."""
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

    from vllm_adakv.worker import backend, cuda_backend
    from vllm_adakv.worker.layer_views import GroupBlocks

    impl = _triton_impl("fp8")
    heads, kv_heads, dim, tokens = impl.num_heads, impl.num_kv_heads, impl.head_size, 3
    raw = torch.randint(0, 120, (6, kv_heads, 32, 2 * dim), dtype=torch.uint8)
    name = "model.layers.0.self_attn.attn"
    views = SimpleNamespace(group_blocks=lambda kv, names: GroupBlocks(
        kv, {name: 0}, torch.zeros(1, dtype=torch.int32)))
    monkeypatch.setattr(backend, "current", lambda: SimpleNamespace(views=views))
    monkeypatch.setattr(TritonAttentionImpl, "forward", lambda self, *a, **k: None)
    seen = {}

    def fake_decode(query, key_cache, value_cache, *args, **kwargs):
        seen.update(query=query, key=key_cache, value=value_cache, **kwargs)

    monkeypatch.setattr(cuda_backend, "headwise_attention_ranges_triton", fake_decode)
    pool = SimpleNamespace(page_start=torch.zeros(2, 1, kv_heads), chunk_base=None,
                           kept_counts=torch.zeros(2, 1, kv_heads), capacity=None)
    meta = cuda_backend.AdaKVTritonMetadata.__new__(cuda_backend.AdaKVTritonMetadata)
    meta.__dict__.update(prefill_rows=None, headwise_rows=torch.zeros(1, 7), store=object(),
                         pool=pool, layer_names=[name], query_start_cpu=[0, tokens],
                         block_table=torch.zeros(1, 2, dtype=torch.int32),
                         headwise_block_table=None, num_headwise_tokens=tokens)
    layer = SimpleNamespace(layer_name=name, _k_scale=torch.tensor(0.5),
                            _v_scale=torch.tensor(2.0), _q_scale=torch.tensor(0.25))
    q = torch.randn(tokens, heads * dim).to(torch.float8_e4m3fn)
    output = torch.zeros(tokens, heads * dim, dtype=torch.bfloat16)
    impl.forward(layer, q, None, None, raw, meta, output)
    assert seen["query"].dtype == torch.bfloat16
    assert torch.equal(seen["query"].view(tokens, -1), (q.float() * 0.25).bfloat16())
    assert seen["key"].dtype == seen["value"].dtype == torch.float8_e4m3fn
    assert seen["key"].data_ptr() == raw.data_ptr()
    assert torch.equal(seen["value"].view(torch.uint8), raw[..., dim:])
    assert seen["k_scale"] is layer._k_scale and seen["v_scale"] is layer._v_scale

"""patches.select_cuda_backend: what a CUDA engine with compression is switched to."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from vllm_adakv.config import KVCompressionConfigError
from vllm_adakv.patches import select_cuda_backend


def _args(backend=None, config_backend=None):
    return SimpleNamespace(attention_backend=backend,
                           attention_config=SimpleNamespace(backend=config_backend))


def test_selects_custom_backend_and_v1_runner(monkeypatch):
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    args = _args()
    select_cuda_backend(args)
    assert args.attention_backend == "CUSTOM"
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"


def test_explicit_custom_is_kept(monkeypatch):
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    args = _args(config_backend=SimpleNamespace(name="CUSTOM"))
    select_cuda_backend(args)
    assert args.attention_backend is None  # already chosen through attention_config


@pytest.mark.parametrize("backend", ["FLASH_ATTN", "TRITON_ATTN"])
def test_other_backend_is_an_error(monkeypatch, backend):
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    with pytest.raises(KVCompressionConfigError, match=f"drop --attention-backend {backend}"):
        select_cuda_backend(_args(backend=backend))


def test_v2_runner_request_is_an_error(monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(KVCompressionConfigError, match="V1 model runner"):
        select_cuda_backend(_args())

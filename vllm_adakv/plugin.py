"""Entry point ``vllm.general_plugins`` -> :func:`register` (runs in every vLLM process)."""

from __future__ import annotations

_registered = False


def register() -> None:
    """Install the backend override, the KV spec/manager pair and the flags (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from vllm_adakv.patches import (
        patch_engine_args,
        patch_input_processor,
        patch_kept_block_reports,
        patch_metrics,
        patch_model_runner,
        patch_scheduler,
    )
    from vllm_adakv.scheduler.manager import register_spec

    # The CPU platform always asks for CPU_ATTN (it ignores --attention-backend), so
    # the override goes on that member; with compression off it behaves identically.
    register_backend(
        AttentionBackendEnum.CPU_ATTN, "vllm_adakv.worker.cpu_backend.AdaKVCPUBackend"
    )
    # CUDA: compression runs on our TRITON_ATTN extension, selected as CUSTOM only
    # when --kv-compression is on (patches.select_cuda_backend).
    register_backend(
        AttentionBackendEnum.CUSTOM, "vllm_adakv.worker.cuda_backend.AdaKVTritonBackend"
    )
    register_spec()
    patch_engine_args()
    patch_model_runner()
    patch_input_processor()
    patch_scheduler()
    patch_kept_block_reports()
    patch_metrics()
    _registered = True

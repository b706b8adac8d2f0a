"""Read the compression settings from the vLLM config of this process."""

from __future__ import annotations

from typing import Any

from vllm_adakv.config import KVCompressionConfig


def compression_of(vllm_config: Any) -> KVCompressionConfig:
    if vllm_config is None:
        return KVCompressionConfig()
    return KVCompressionConfig.from_additional_config(vllm_config.additional_config)


_MODEL_SETTINGS: tuple[KVCompressionConfig, int, tuple[int, ...]] | None = None


def remember_model_settings() -> None:
    """Record the settings of the model being built in this process.

    Called while vLLM constructs the attention layers (the current VllmConfig is
    set then); ``customize_spec`` runs later, outside that context.
    """
    global _MODEL_SETTINGS
    from vllm.config import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()
    if vllm_config is None:
        return
    _MODEL_SETTINGS = (compression_of(vllm_config), num_model_layers(vllm_config),
                       full_attention_layers(vllm_config))


def model_settings() -> tuple[KVCompressionConfig, int, tuple[int, ...]]:
    """(compression config, number of model layers, full-attention layer indices, empty
    when all are) of the model built in this process."""
    if _MODEL_SETTINGS is None:
        return KVCompressionConfig(), 1, ()
    return _MODEL_SETTINGS


def full_attention_layers(vllm_config: Any) -> tuple[int, ...]:
    """Indices of the full-attention layers when the model mixes layer types (its
    config's ``layer_types``, e.g. Gemma 3's sliding-window layers); empty otherwise."""
    types = getattr(vllm_config.model_config.hf_text_config, "layer_types", None)
    if not types or all(t == "full_attention" for t in types):
        return ()
    return tuple(i for i, t in enumerate(types) if t == "full_attention")


def num_model_layers(vllm_config: Any) -> int:
    """Layers of the whole model (the pyramid schedule spans all of them)."""
    return int(vllm_config.model_config.hf_text_config.num_hidden_layers)


def compressible_spec(spec: Any) -> Any:
    """``spec`` as a CompressedAttentionSpec when this model compresses it, else unchanged.

    Full-attention layers without a sliding window are compressed; every other
    kind (sliding window, Mamba, cross attention, ...) is left to vLLM.
    """
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_adakv.core.spec import CompressedAttentionSpec

    cfg, num_layers, layer_indices = model_settings()
    if not cfg.enabled or type(spec) is not FullAttentionSpec or spec.sliding_window:
        return spec
    return CompressedAttentionSpec.wrap(spec, cfg, num_layers, layer_indices)


_PROMPT_FREE_DECODE_GRAPHS = False


def mark_decode_graphs_need_prompt_free_steps() -> None:
    """Called by the CUDA builder of a compressed layer group in this process."""
    global _PROMPT_FREE_DECODE_GRAPHS
    _PROMPT_FREE_DECODE_GRAPHS = True


def decode_graphs_need_prompt_free_steps() -> bool:
    """Whether a step with prompt tokens must stay out of full CUDA graphs here
    (its per-layer compression work runs in Python)."""
    return _PROMPT_FREE_DECODE_GRAPHS


def tensor_parallel_shard() -> tuple[int, int]:
    """(rank, size) of this worker in its tensor-parallel group; (0, 1) without one."""
    from vllm.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())

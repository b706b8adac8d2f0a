"""KV compression settings: one frozen, validated, picklable dataclass.

The same object travels from the CLI flags (or ``LLM(additional_config=...)``)
to every vLLM process inside ``VllmConfig.additional_config["kv_compression"]``.
Nothing here imports vLLM.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

METHODS: tuple[str, ...] = ("none", "snapkv", "adakv", "pyramidkv", "streamingllm")
POOLINGS: tuple[str, ...] = ("max", "avg")
GQA_REDUCES: tuple[str, ...] = ("mean", "max")

ADDITIONAL_CONFIG_KEY = "kv_compression"

# Field name -> the CLI flag that sets it (used in every error message).
FLAG_OF_FIELD: dict[str, str] = {
    "method": "--kv-compression",
    "budget": "--kv-budget",
    "window": "--kv-window",
    "pooling": "--kv-pooling",
    "pool_kernel": "--kv-pool-kernel",
    "alpha": "--kv-alpha",
    "gqa_reduce": "--kv-gqa-reduce",
    "sink_tokens": "--kv-sink-tokens",
    "pyramid_beta": "--kv-pyramid-beta",
}


class KVCompressionConfigError(ValueError):
    """A compression setting is invalid; the message names the flag."""


@dataclass(frozen=True)
class KVCompressionConfig:
    """What to compress and how much.

    budget: mean tokens kept per KV head (window included) per layer.
    window: the last ``window`` prompt tokens are always kept; their queries
        score the older tokens (SnapKV observation window).
    """

    method: str = "none"
    budget: int = 1024
    window: int = 32
    pooling: str = "max"
    pool_kernel: int = 7
    alpha: float = 0.2
    gqa_reduce: str = "mean"
    sink_tokens: int = 4
    pyramid_beta: float = 20.0

    def __post_init__(self) -> None:
        validate(self)

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def selectable(self) -> int:
        """B' = budget - window: tokens a head selects on average."""
        return self.budget - self.window

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> KVCompressionConfig:
        """Build from ``additional_config["kv_compression"]`` (unknown keys rejected)."""
        if raw is None:
            return cls()
        if isinstance(raw, KVCompressionConfig):
            return raw
        if not isinstance(raw, dict):
            raise KVCompressionConfigError(
                f"additional_config['{ADDITIONAL_CONFIG_KEY}'] must be a dict, "
                f"got {type(raw).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise KVCompressionConfigError(
                f"unknown key(s) {unknown} in additional_config['{ADDITIONAL_CONFIG_KEY}']; "
                f"allowed: {sorted(known)}"
            )
        return cls(**_coerce(raw))

    @classmethod
    def from_additional_config(
        cls, additional_config: dict[str, Any] | None
    ) -> KVCompressionConfig:
        return cls.from_dict((additional_config or {}).get(ADDITIONAL_CONFIG_KEY))


def _coerce(raw: dict[str, Any]) -> dict[str, Any]:
    """Type-check values coming from JSON/dicts; booleans are not integers here."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        flag = FLAG_OF_FIELD[key]
        if key in ("budget", "window", "pool_kernel", "sink_tokens"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise KVCompressionConfigError(f"{flag} must be an integer, got {value!r}")
        elif key in ("alpha", "pyramid_beta"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise KVCompressionConfigError(f"{flag} must be a number, got {value!r}")
            value = float(value)
        elif not isinstance(value, str):
            raise KVCompressionConfigError(f"{flag} must be a string, got {value!r}")
        out[key] = value
    return out


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise KVCompressionConfigError(
            f"{flag}: invalid choice {value!r} (allowed: {', '.join(allowed)})"
        )


def validate(cfg: KVCompressionConfig) -> None:
    """Raise KVCompressionConfigError naming the flag and what is allowed."""
    _choice("--kv-compression", cfg.method, METHODS)
    _choice("--kv-pooling", cfg.pooling, POOLINGS)
    _choice("--kv-gqa-reduce", cfg.gqa_reduce, GQA_REDUCES)
    if cfg.window < 1:
        raise KVCompressionConfigError(f"--kv-window must be >= 1, got {cfg.window}")
    if cfg.budget <= cfg.window:
        raise KVCompressionConfigError(
            f"--kv-budget must be greater than --kv-window "
            f"(got budget={cfg.budget}, window={cfg.window})"
        )
    if not (math.isfinite(cfg.alpha) and 0.0 <= cfg.alpha <= 1.0):
        raise KVCompressionConfigError(f"--kv-alpha must be in [0, 1], got {cfg.alpha}")
    if cfg.pool_kernel < 1 or cfg.pool_kernel % 2 == 0:
        raise KVCompressionConfigError(
            f"--kv-pool-kernel must be a positive odd integer, got {cfg.pool_kernel}"
        )
    if cfg.sink_tokens < 0:
        raise KVCompressionConfigError(f"--kv-sink-tokens must be >= 0, got {cfg.sink_tokens}")
    if cfg.method == "streamingllm" and cfg.sink_tokens > cfg.selectable:
        raise KVCompressionConfigError(
            f"--kv-sink-tokens ({cfg.sink_tokens}) must not exceed "
            f"--kv-budget minus --kv-window ({cfg.selectable}) for streamingllm"
        )
    if not (math.isfinite(cfg.pyramid_beta) and cfg.pyramid_beta >= 1.0):
        raise KVCompressionConfigError(
            f"--kv-pyramid-beta must be a finite number >= 1, got {cfg.pyramid_beta}"
        )

"""KV compression settings: one frozen, validated, picklable dataclass.

The same object travels from the CLI flags (or ``LLM(additional_config=...)``)
to every vLLM process inside ``VllmConfig.additional_config["kv_compression"]``.
Nothing here imports vLLM; the method names and each method's own checks come from
the registry (``vllm_adakv.methods``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from vllm_adakv.methods import METHOD_NAMES, get_method

METHODS: tuple[str, ...] = METHOD_NAMES
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
    "gvote_samples": "--kv-gvote-samples",
    "gvote_p": "--kv-gvote-p",
    "gvote_seed": "--kv-gvote-seed",
    "max_budget": "--kv-max-budget",
    "min_compression": "--kv-min-compression",
    "reserve_output": "--kv-reserve-output",
}

INT_FIELDS = ("budget", "window", "pool_kernel", "sink_tokens", "gvote_samples", "gvote_seed",
              "max_budget", "reserve_output")
FLOAT_FIELDS = ("alpha", "pyramid_beta", "gvote_p", "min_compression")


class KVCompressionConfigError(ValueError):
    """A compression setting is invalid; the message names the flag."""


@dataclass(frozen=True)
class KVCompressionConfig:
    """What to compress and how much.

    budget: mean tokens kept per KV head (window included) per layer.
    window: the last ``window`` prompt tokens are always kept; their queries
        score the older tokens (SnapKV observation window).
    gvote_*: GVote's synthetic queries (samples), nucleus mass (p) and seed.
    max_budget / min_compression: GVote's cap per KV head and layer, window
        included: at most ``max_budget`` tokens (0: no such cap) and at most
        ``prompt_len / min_compression`` (1: no such cap); with neither, ``budget``.
    reserve_output: when the scheduler admits a new request, it keeps free the blocks
        each compressed running request still needs for up to this many output tokens
        (at most its max_tokens): compressed requests then grow into room of their own
        instead of being preempted. 0: vLLM's admission, no reserve.
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
    gvote_samples: int = 8
    gvote_p: float = 0.95
    gvote_seed: int = 0
    max_budget: int = 0
    min_compression: float = 1.0
    reserve_output: int = 0

    def __post_init__(self) -> None:
        validate(self)

    @property
    def enabled(self) -> bool:
        return get_method(self.method).compresses

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
        cfg = cls(**_coerce(raw))
        check_caps_apply(cfg)
        return cfg

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
        if key in INT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise KVCompressionConfigError(f"{flag} must be an integer, got {value!r}")
        elif key in FLOAT_FIELDS:
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
    if not (math.isfinite(cfg.pyramid_beta) and cfg.pyramid_beta >= 1.0):
        raise KVCompressionConfigError(
            f"--kv-pyramid-beta must be a finite number >= 1, got {cfg.pyramid_beta}"
        )
    if cfg.reserve_output < 0:
        raise KVCompressionConfigError(
            f"--kv-reserve-output must be >= 0 (tokens), got {cfg.reserve_output}")
    _validate_gvote(cfg)
    try:
        get_method(cfg.method).validate(cfg)
    except ValueError as exc:
        raise KVCompressionConfigError(str(exc)) from None


def _validate_gvote(cfg: KVCompressionConfig) -> None:
    if cfg.gvote_samples < 0:
        raise KVCompressionConfigError(
            f"--kv-gvote-samples must be >= 0, got {cfg.gvote_samples}")
    if not (math.isfinite(cfg.gvote_p) and 0.0 < cfg.gvote_p <= 1.0):
        raise KVCompressionConfigError(f"--kv-gvote-p must be in (0, 1], got {cfg.gvote_p}")
    if not 0 <= cfg.gvote_seed < 2**63:
        raise KVCompressionConfigError(
            f"--kv-gvote-seed must be in [0, 2**63), got {cfg.gvote_seed}")
    if cfg.max_budget != 0 and cfg.max_budget <= cfg.window:
        raise KVCompressionConfigError(
            f"--kv-max-budget must be 0 (no cap) or greater than --kv-window "
            f"(got max_budget={cfg.max_budget}, window={cfg.window})"
        )
    if not (math.isfinite(cfg.min_compression) and cfg.min_compression >= 1.0):
        raise KVCompressionConfigError(
            f"--kv-min-compression must be a finite number >= 1, got {cfg.min_compression}")


def check_caps_apply(cfg: KVCompressionConfig) -> None:
    """Reject a GVote cap set for another method (user-facing settings only).

    Not part of ``validate``: a per-request override may switch a capped gvote
    server's request to another method, which then simply ignores the cap.
    """
    if cfg.method != "gvote" and (cfg.max_budget != 0 or cfg.min_compression != 1.0):
        raise KVCompressionConfigError(
            "--kv-max-budget and --kv-min-compression only apply to --kv-compression gvote "
            f"(got method={cfg.method!r}); other methods keep exactly --kv-budget"
        )

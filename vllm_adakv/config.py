"""KV compression settings: one table, one frozen, validated, picklable dataclass.

``SETTINGS`` describes every setting once (field, flag, type, default, help, choices,
single-value rule, whether a request may override it); the dataclass fields and
defaults, the ``--kv-*`` flags (cli.py), the typing of ``additional_config`` and of
``vllm_xargs`` (overrides.py) all come from it. The same object travels from the CLI
flags (or ``LLM(additional_config=...)``) to every vLLM process inside
``VllmConfig.additional_config["kv_compression"]``. Nothing here imports vLLM; the
method names and each method's own checks come from the registry (``vllm_adakv.methods``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from vllm_adakv.methods import METHOD_NAMES, REGISTRY, get_method
from vllm_adakv.methods.scorers import SCORER_NAMES

METHODS: tuple[str, ...] = METHOD_NAMES
POOLINGS: tuple[str, ...] = ("max", "avg")
GQA_REDUCES: tuple[str, ...] = ("mean", "max")

ADDITIONAL_CONFIG_KEY = "kv_compression"


class KVCompressionConfigError(ValueError):
    """A compression setting is invalid; the message names the flag."""


@dataclass(frozen=True)
class Setting:
    """One compression setting.

    help: the flag's help; ``{default}`` stands for the default.
    rule, ok: a value for which ``ok(value)`` is false is rejected with
        "<flag> must be <rule>, got <value>" (rules between settings: ``validate``).
    per_request: a request may set it in ``vllm_xargs`` under ``key``.
    """

    field: str
    flag: str
    type: type  # int, float or str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    rule: str = ""
    ok: Callable[[Any], bool] | None = None
    per_request: bool = False

    @property
    def key(self) -> str:
        """argparse's dest and the vllm_xargs key: --kv-budget -> kv_budget."""
        return self.flag.removeprefix("--").replace("-", "_")


def _finite_at_least_1(value: float) -> bool:
    return math.isfinite(value) and value >= 1.0


SETTINGS: tuple[Setting, ...] = (
    Setting("method", "--kv-compression", str, "none",
            "Compression policy (default: {default}).", choices=METHODS, per_request=True),
    Setting("budget", "--kv-budget", int, 1024,
            "Mean tokens kept per KV head, window included (default: {default}).",
            per_request=True),
    Setting("window", "--kv-window", int, 32,
            "Observation window: last prompt tokens always kept (default: {default}).",
            rule=">= 1", ok=lambda v: v >= 1, per_request=True),
    Setting("scorer", "--kv-scorer", str, "window",
            "Scores of SnapKV, Ada-KV and PyramidKV: 'window' = the last prompt tokens' "
            "queries, 'expected' = a Gaussian of the prompt's queries at the positions to "
            "come, for a question that comes later (default: {default}).",
            choices=SCORER_NAMES, per_request=True),
    Setting("pooling", "--kv-pooling", str, "max",
            "Pooling of scores along positions (default: {default}).", choices=POOLINGS),
    Setting("pool_kernel", "--kv-pool-kernel", int, 7,
            "Odd pooling kernel size (default: {default}).",
            rule="a positive odd integer", ok=lambda v: v >= 1 and v % 2 == 1),
    Setting("alpha", "--kv-alpha", float, 0.2,
            "Ada-KV safeguard: share of the budget every head keeps, in [0, 1] "
            "(default: {default}).",
            rule="in [0, 1]", ok=lambda v: math.isfinite(v) and 0.0 <= v <= 1.0),
    Setting("gqa_reduce", "--kv-gqa-reduce", str, "mean",
            "Reduce scores over a GQA group (default: {default}).", choices=GQA_REDUCES),
    Setting("sink_tokens", "--kv-sink-tokens", int, 4,
            "StreamingLLM sink tokens (default: {default}).", rule=">= 0", ok=lambda v: v >= 0),
    Setting("pyramid_beta", "--kv-pyramid-beta", float, 20.0,
            "PyramidKV: last layer keeps budget/beta (default: {default}).",
            rule="a finite number >= 1", ok=_finite_at_least_1),
    Setting("gvote_samples", "--kv-gvote-samples", int, 8,
            "GVote: synthetic future queries per query head (default: {default}).",
            rule=">= 0", ok=lambda v: v >= 0),
    Setting("gvote_p", "--kv-gvote-p", float, 0.95,
            "GVote: nucleus mass in (0, 1]; higher keeps more (default: {default}).",
            rule="in (0, 1]", ok=lambda v: math.isfinite(v) and 0.0 < v <= 1.0,
            per_request=True),
    Setting("gvote_seed", "--kv-gvote-seed", int, 0,
            "GVote: seed of the synthetic queries (default: {default}).",
            rule="in [0, 2**63)", ok=lambda v: 0 <= v < 2**63),
    Setting("max_budget", "--kv-max-budget", int, 0,
            "GVote cap: at most N tokens per KV head and layer, window included; memory "
            "is reserved for it (default: {default} = no such cap)."),
    Setting("min_compression", "--kv-min-compression", float, 1.0,
            "GVote cap: keep at most prompt_len / R tokens per KV head and layer "
            "(default: {default} = no such cap). With neither cap, --kv-budget.",
            rule="a finite number >= 1", ok=_finite_at_least_1),
    Setting("reserve_output", "--kv-reserve-output", int, 0,
            "Admission headroom: a new request is admitted only if the blocks every "
            "compressed running request still needs for up to N more output tokens (at "
            "most its max_tokens) stay free (default: {default} = vLLM's admission, no "
            "reserve).",
            rule=">= 0 (tokens)", ok=lambda v: v >= 0),
    Setting("decode_budget", "--kv-decode-budget", int, 0,
            "Decode-time compression: tokens kept per KV head and layer, window included, "
            "over prompt + generated tokens, re-selected every --kv-decode-interval "
            "generated tokens (Ada-KV: mean over heads) (default: {default} = off: "
            "generated tokens are never evicted). A request may set its own (0: off for "
            "it) on a server started with one.",
            rule=">= 0 (tokens)", ok=lambda v: v >= 0, per_request=True),
    Setting("decode_interval", "--kv-decode-interval", int, 32,
            "Decode-time compression: generated tokens between two re-selections "
            "(default: {default}).",
            rule=">= 1 (tokens)", ok=lambda v: v >= 1),
)

SETTING_OF_FIELD: dict[str, Setting] = {s.field: s for s in SETTINGS}
# Field name -> the CLI flag that sets it (used in every error message).
FLAG_OF_FIELD: dict[str, str] = {s.field: s.flag for s in SETTINGS}

_KINDS = {int: "an integer", float: "a number", str: "a string"}


def check_type(kind: type, value: Any, error: Callable[[str], Exception]) -> Any:
    """``value`` as ``kind`` (int, float or str; an int is a float here, a bool is no
    number), else raise ``error("must be an integer, got 1.5")``."""
    if kind is str:
        good = isinstance(value, str)
    else:
        good = not isinstance(value, bool) and isinstance(
            value, (int, float) if kind is float else kind)
    if not good:
        raise error(f"must be {_KINDS[kind]}, got {value!r}")
    return float(value) if kind is float else value


def _with_settings(cls: type) -> type:
    """``cls`` as a frozen dataclass with one field per setting, in table order."""
    cls.__annotations__ = {s.field: s.type.__name__ for s in SETTINGS}
    for s in SETTINGS:
        setattr(cls, s.field, s.default)
    return dataclass(frozen=True)(cls)


@_with_settings
class KVCompressionConfig:
    """What to compress and how much: one field per entry of ``SETTINGS``.

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
        check_decode_applies(cfg)
        check_scorer_applies(cfg)
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
        out[key] = check_type(SETTING_OF_FIELD[key].type, value,
                              lambda message, f=flag: KVCompressionConfigError(f"{f} {message}"))
    return out


def validate(cfg: KVCompressionConfig) -> None:
    """Raise KVCompressionConfigError naming the flag and what is allowed."""
    for s in SETTINGS:
        value = getattr(cfg, s.field)
        if s.choices and value not in s.choices:
            raise KVCompressionConfigError(
                f"{s.flag}: invalid choice {value!r} (allowed: {', '.join(s.choices)})"
            )
        if s.ok is not None and not s.ok(value):
            raise KVCompressionConfigError(f"{s.flag} must be {s.rule}, got {value}")
    # Rules between settings.
    if cfg.budget <= cfg.window:
        raise KVCompressionConfigError(
            f"--kv-budget must be greater than --kv-window "
            f"(got budget={cfg.budget}, window={cfg.window})"
        )
    try:
        get_method(cfg.method).validate(cfg)
    except ValueError as exc:
        raise KVCompressionConfigError(str(exc)) from None
    if cfg.decode_budget != 0 and cfg.decode_budget <= cfg.window:
        raise KVCompressionConfigError(
            f"--kv-decode-budget must be 0 (off) or greater than --kv-window "
            f"(got decode_budget={cfg.decode_budget}, window={cfg.window})")
    if cfg.max_budget != 0 and cfg.max_budget <= cfg.window:
        raise KVCompressionConfigError(
            f"--kv-max-budget must be 0 (no cap) or greater than --kv-window "
            f"(got max_budget={cfg.max_budget}, window={cfg.window})"
        )


# Methods whose decode-time re-selection runs in the engine: those whose head-pages can
# stay in each layer's own tensor (PyramidKV does so under a decode budget,
# ``memory.plan_compression``). GVote's pages are always pooled across layers (counts
# unknown before its vote), and decode events cannot compact a pooled layout yet
# (docs/decode-compression.md).
DECODE_METHODS: tuple[str, ...] = ("snapkv", "adakv", "pyramidkv", "streamingllm")


def check_decode_applies(cfg: KVCompressionConfig) -> None:
    """A server's decode budget needs a method with an engine-side re-selection
    (user-facing settings only, as ``check_caps_apply``: a request may opt out with
    ``none``; ``overrides.check_overrides`` refuses the other methods)."""
    if cfg.decode_budget == 0:
        return
    if cfg.method not in DECODE_METHODS:
        raise KVCompressionConfigError(
            f"--kv-decode-budget is not supported with --kv-compression {cfg.method} "
            f"(supported: {', '.join(DECODE_METHODS)})")


def check_scorer_applies(cfg: KVCompressionConfig, flag: str = "--kv-scorer") -> None:
    """Reject a scorer other than the default for a method that selects without one
    (user-facing settings only, as ``check_caps_apply``)."""
    if cfg.scorer != "window" and not get_method(cfg.method).takes_scorer:
        scored = ", ".join(n for n, m in REGISTRY.items() if m.takes_scorer)
        raise KVCompressionConfigError(
            f"{flag} {cfg.scorer} applies to the scored methods ({scored}), "
            f"not to --kv-compression {cfg.method}")


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


# vLLM's --kv-cache-dtype values of an fp8 cache with one float32 scale per layer for the
# keys and one for the values (``kernels/fp8.py``).
FP8_KV_CACHE_DTYPES: tuple[str, ...] = ("fp8", "fp8_e4m3", "fp8_e5m2")
# Those compression runs with on CUDA. fp8_e5m2 is not among them: vLLM 0.32's attention
# layer quantizes the queries for TRITON_ATTN's fp8 cache and asserts an e4m3 cache there,
# so it stops every fp8_e5m2 engine on TRITON_ATTN, vanilla included (H100, 2026-12-07).
CUDA_FP8_KV_CACHE_DTYPES: tuple[str, ...] = ("fp8", "fp8_e4m3")


def compressible_cache_dtypes(platform: str) -> tuple[str, ...]:
    """The --kv-cache-dtype values compression runs with on ``platform`` ("cuda": vLLM's
    TRITON_ATTN, which stores every fp8 string as ``float8_e4m3fn``; "cpu": CPU_ATTN).

    CPU: the model's dtype only. vLLM's CPU fp8 cache needs AVX-512 or AMX and packs keys
    per ISA; no machine here runs it, so compression on it is refused, not guessed."""
    if platform == "cuda":
        return ("auto", *CUDA_FP8_KV_CACHE_DTYPES)
    return ("auto",)


def check_kv_cache_dtype(cache_dtype: Any, platform: str) -> None:
    """Reject a --kv-cache-dtype compression cannot read or write on ``platform``."""
    name = "auto" if cache_dtype is None else str(cache_dtype)
    accepted = compressible_cache_dtypes(platform)
    if name in accepted:
        return
    if name in FP8_KV_CACHE_DTYPES and platform == "cuda":
        raise KVCompressionConfigError(
            f"--kv-cache-dtype {name} is not supported with --kv-compression: vLLM's "
            "TRITON_ATTN stops on it (its query quantization asserts an e4m3 cache, without "
            "compression too); use --kv-cache-dtype fp8")
    if name in FP8_KV_CACHE_DTYPES:
        raise KVCompressionConfigError(
            f"--kv-cache-dtype {name} is not supported with --kv-compression on the CPU "
            "(fp8 KV caches are compressed on CUDA only); use --kv-cache-dtype auto")
    raise KVCompressionConfigError(
        f"--kv-cache-dtype {name} is not supported with --kv-compression on "
        f"{platform.upper()} (supported: {', '.join(accepted)})")

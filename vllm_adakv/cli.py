"""``--kv-*`` flags on ``vllm serve`` / EngineArgs, folded into ``additional_config``."""

from __future__ import annotations

import argparse
from typing import Any

from vllm_adakv.config import (
    ADDITIONAL_CONFIG_KEY,
    FLAG_OF_FIELD,
    GQA_REDUCES,
    METHODS,
    POOLINGS,
    KVCompressionConfig,
)

# argparse dest (--kv-budget -> kv_budget) -> KVCompressionConfig field
FLAG_DESTS: dict[str, str] = {
    flag.removeprefix("--").replace("-", "_"): field for field, flag in FLAG_OF_FIELD.items()
}


def add_kv_compression_args(parser: Any) -> Any:
    """Add the flags (idempotent: a parser that has them is returned unchanged)."""
    if any("--kv-compression" in a.option_strings for a in parser._actions):
        return parser
    d = KVCompressionConfig()
    group = parser.add_argument_group(
        title="KV compression (vllm-adakv)",
        description="Compress each request's KV cache after prefill and free the memory "
        "per attention head. Same settings: --additional-config "
        "'{\"kv_compression\": {\"method\": \"adakv\", \"budget\": 1024}}'.",
    )
    group.add_argument("--kv-compression", choices=METHODS, default=argparse.SUPPRESS,
                       help=f"Compression policy (default: {d.method}).")
    group.add_argument("--kv-budget", type=int, default=argparse.SUPPRESS,
                       help=f"Mean tokens kept per KV head, window included (default: {d.budget}).")
    group.add_argument("--kv-window", type=int, default=argparse.SUPPRESS,
                       help=f"Observation window: last prompt tokens always kept (default: "
                       f"{d.window}).")
    group.add_argument("--kv-pooling", choices=POOLINGS, default=argparse.SUPPRESS,
                       help=f"Pooling of scores along positions (default: {d.pooling}).")
    group.add_argument("--kv-pool-kernel", type=int, default=argparse.SUPPRESS,
                       help=f"Odd pooling kernel size (default: {d.pool_kernel}).")
    group.add_argument("--kv-alpha", type=float, default=argparse.SUPPRESS,
                       help=f"Ada-KV safeguard: share of the budget every head keeps, in [0, 1] "
                       f"(default: {d.alpha}).")
    group.add_argument("--kv-gqa-reduce", choices=GQA_REDUCES, default=argparse.SUPPRESS,
                       help=f"Reduce scores over a GQA group (default: {d.gqa_reduce}).")
    group.add_argument("--kv-sink-tokens", type=int, default=argparse.SUPPRESS,
                       help=f"StreamingLLM sink tokens (default: {d.sink_tokens}).")
    group.add_argument("--kv-pyramid-beta", type=float, default=argparse.SUPPRESS,
                       help=f"PyramidKV: last layer keeps budget/beta (default: {d.pyramid_beta}).")
    group.add_argument("--kv-gvote-samples", type=int, default=argparse.SUPPRESS,
                       help=f"GVote: synthetic future queries per query head (default: "
                       f"{d.gvote_samples}).")
    group.add_argument("--kv-gvote-p", type=float, default=argparse.SUPPRESS,
                       help=f"GVote: nucleus mass in (0, 1]; higher keeps more (default: "
                       f"{d.gvote_p}).")
    group.add_argument("--kv-gvote-seed", type=int, default=argparse.SUPPRESS,
                       help=f"GVote: seed of the synthetic queries (default: {d.gvote_seed}).")
    group.add_argument("--kv-max-budget", type=int, default=argparse.SUPPRESS,
                       help="GVote cap: at most N tokens per KV head and layer, window "
                       "included; memory is reserved for it (default: 0 = no such cap).")
    group.add_argument("--kv-min-compression", type=float, default=argparse.SUPPRESS,
                       help="GVote cap: keep at most prompt_len / R tokens per KV head and "
                       "layer (default: 1 = no such cap). With neither cap, --kv-budget.")
    group.add_argument("--kv-reserve-output", type=int, default=argparse.SUPPRESS,
                       help="Admission headroom: a new request is admitted only if the "
                       "blocks every compressed running request still needs for up to N "
                       "more output tokens (at most its max_tokens) stay free (default: 0 = "
                       "vLLM's admission, no reserve).")
    return parser


def fold_into_additional_config(args: argparse.Namespace, additional_config: dict | None) -> dict:
    """additional_config with the flags merged over any ``kv_compression`` dict; validated."""
    merged: dict[str, Any] = dict(additional_config or {})
    raw = merged.get(ADDITIONAL_CONFIG_KEY)
    if raw is not None and not isinstance(raw, dict):
        KVCompressionConfig.from_dict(raw)  # raises the "must be a dict" error
    section = dict(raw or {})
    for dest, field_name in FLAG_DESTS.items():
        value = getattr(args, dest, None)
        if value is not None:
            section[field_name] = value
    if section:
        merged[ADDITIONAL_CONFIG_KEY] = KVCompressionConfig.from_dict(section).to_dict()
    return merged

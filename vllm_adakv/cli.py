"""``--kv-*`` flags on ``vllm serve`` / EngineArgs, folded into ``additional_config``.

One flag per entry of ``config.SETTINGS``.
"""

from __future__ import annotations

import argparse
from typing import Any

from vllm_adakv.config import ADDITIONAL_CONFIG_KEY, SETTINGS, KVCompressionConfig

# argparse dest (--kv-budget -> kv_budget) -> KVCompressionConfig field
FLAG_DESTS: dict[str, str] = {s.key: s.field for s in SETTINGS}


def add_kv_compression_args(parser: Any) -> Any:
    """Add the flags (idempotent: a parser that has them is returned unchanged)."""
    if any(SETTINGS[0].flag in a.option_strings for a in parser._actions):
        return parser
    group = parser.add_argument_group(
        title="KV compression (vllm-adakv)",
        description="Compress each request's KV cache after prefill and free the memory "
        "per attention head. Same settings: --additional-config "
        "'{\"kv_compression\": {\"method\": \"adakv\", \"budget\": 1024}}'.",
    )
    for s in SETTINGS:
        kind = {"choices": s.choices} if s.choices else {"type": s.type}
        # Unset flags stay out of the namespace: they must not override additional_config.
        group.add_argument(s.flag, default=argparse.SUPPRESS,
                           help=s.help.format(default=s.default), **kind)
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

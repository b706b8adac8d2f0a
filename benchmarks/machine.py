"""The machine tag in result file names (``kernels-h200-<date>.json``)."""

from __future__ import annotations


def device_tag(name: str) -> str:
    """``h100`` / ``h200`` for those GPUs, else the device name lower-cased with dashes
    (``cpu`` on the CPU)."""
    if "H100" in name:
        return "h100"
    if "H200" in name:
        return "h200"
    return "-".join(name.lower().split())

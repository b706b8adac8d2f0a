"""What a result file records of where it ran: the machine tag in its name
(``kernels-h200-<date>.json``) and the commit measured."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def device_tag(name: str) -> str:
    """``h100`` / ``h200`` for those GPUs, else the device name lower-cased with dashes
    (``cpu`` on the CPU)."""
    if "H100" in name:
        return "h100"
    if "H200" in name:
        return "h200"
    return "-".join(name.lower().split())


def current_commit(given: str | None) -> str | None:
    """``--commit``, else the COMMIT file at the repository root (written before a device
    call: the device copy's git HEAD is stale), else ``git rev-parse --short HEAD``."""
    if given:
        return given
    if (REPO / "COMMIT").is_file():
        return (REPO / "COMMIT").read_text().strip() or None
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def gpu_name() -> str | None:
    """The first GPU's name from ``nvidia-smi`` (no CUDA context in this process, which
    engines in subprocesses would share the memory with), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None

"""benchmarks/kernels.py's decode-variant options (parsed on CPU; timed on a GPU)."""

from __future__ import annotations

import pytest

from benchmarks.kernels import balance_configs, launch_configs, variant_label


def test_launch_configs_parse_warps_stages_and_maxnreg() -> None:
    assert launch_configs("4:3:168,8:2") == [
        {"launch": {"num_warps": 4, "num_stages": 3, "maxnreg": 168}},
        {"launch": {"num_warps": 8, "num_stages": 2}},
    ]
    assert launch_configs("") == []


@pytest.mark.parametrize("spec", ["4", "4:3:168:1", "4:x"])
def test_launch_configs_reject_bad_items(spec: str) -> None:
    with pytest.raises(ValueError):
        launch_configs(spec)


def test_variant_labels_tell_the_variants_apart() -> None:
    configs = balance_configs("4,8", "2") + launch_configs("4:3:168,8:2")
    labels = [variant_label(c) for c in configs]
    assert labels == ["balance4/2", "balance8/2", "launch4:3:168", "launch8:2"]

"""``benchmarks/quality/decode_nll.py --task needle`` end to end on the CPU with SmolLM2.

One sample: a 512-token prompt, then at most 256 forced tokens holding the needle and
the question, 12 free tokens; the full cache and decode budget 128 (interval 32), one
engine each. Checks the result file's shape, and that the full cache finds the needle
(it does on this sample: the forcing and the needle's placement work). About 2 minutes
on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from tests.e2e.real_model import smollm2_dir  # noqa: E402

pytestmark = pytest.mark.e2e

ROW_KEYS = ["task", "generated", "decode_budget", "n", "value", "full_cache_value"]


def test_needle_in_generation_rows(tmp_path: Path) -> None:
    from benchmarks.quality.decode_nll import main

    out = tmp_path / "needle.json"
    result = main(["--task", "needle", "--model", str(smollm2_dir()), "--budgets", "128",
                   "--prompt", "512", "--generated", "256", "--samples", "1",
                   "--kv-space-gib", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert list(result) == ["model", "date", "machine", "commit", "command", "settings",
                            "rows", "details"]
    assert result["model"] == "SmolLM2-135M-Instruct" and result["machine"] == "cpu"
    (row,) = result["rows"]
    assert list(row) == ROW_KEYS
    assert row["task"] == "needle-in-generation"
    assert (row["generated"], row["decode_budget"], row["n"]) == (256, 128, 1)
    assert row["value"] in (0.0, 1.0)
    assert row["full_cache_value"] == 1.0
    (forced,) = result["settings"]["forced_tokens"]
    assert 256 - 64 <= forced <= 256
    assert [d["decode_budget"] for d in result["details"]] == [0, 128]
    for d in result["details"]:
        # at least window + interval filler tokens and the question after the needle
        assert 64 + 30 <= d["needle_to_question"] < forced
        assert d["correct"] == (d["answer"] in d["output"])

"""The quality summaries: exact McNemar, merged runs, the per-mode table."""

from __future__ import annotations

import json
import math
import random

import pytest

from benchmarks.quality.summarize import load_details, mcnemar_p, paired, table


def test_mcnemar_is_the_two_sided_binomial_on_discordant_pairs():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(0, 5) == pytest.approx(2 / 32)
    n, k = 20, 4
    assert mcnemar_p(k, n - k) == pytest.approx(2 * sum(math.comb(n, i) for i in range(k + 1))
                                                / 2**n)
    assert mcnemar_p(9, 1) == mcnemar_p(1, 9)


def _details(method, budget, correct, mode="agnostic", context=2048, kept=0.5):
    return [{"method": method, "budget": budget, "task": "vt", "context": context, "index": i,
             "mode": mode, "correct": c, "kept_fraction": kept if budget else 1.0}
            for i, c in enumerate(correct)]


def test_runs_merge_and_the_table_counts_them(tmp_path):
    rng = random.Random()
    full = [rng.random() < 0.8 for _ in range(12)]
    a = [rng.random() < 0.5 for _ in range(12)]
    b = [rng.random() < 0.5 for _ in range(12)]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text(json.dumps({"details": _details("none", None, full)
                               + _details("adakv", 1024, a)}))
    two.write_text(json.dumps({"details": _details("adakv+expected", 1024, b, kept=0.25)}))
    details = load_details([one, two])
    text = table(details, "agnostic")
    assert f"| adakv | 2x | {sum(a)} / 12 |" in text
    assert f"| adakv+expected | 2x | {sum(b)} / 12 |" in text
    assert "0.250" in text
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    [line] = paired(details, "adakv", "adakv+expected")
    assert f"only adakv {only_a}, only adakv+expected {only_b}" in line
    with pytest.raises(ValueError, match="in two runs"):
        load_details([one, one])
    # A run's methods picked by name: the rest of it left out, so no clash.
    picked = load_details([f"{one}:adakv", two])
    assert {d["method"] for d in picked} == {"adakv", "adakv+expected"}
    assert len(picked) == 24
    assert load_details([one, f"{one}:other"]) == load_details([one])


"""``benchmarks/serving_timeline.py``: the replay of a step log against send times."""

from __future__ import annotations

from benchmarks.serving_timeline import timeline


def test_replay_skips_the_warmup_and_counts_sent_admitted_running() -> None:
    # warm-up prompt + 2 decode steps, then prompt A, 3 decode steps, prompt B, 1 decode step
    steps = {"ctx_tokens": [100, 0, 0, 100, 0, 0, 0, 100, 0],
             "gen_reqs": [0, 1, 1, 0, 1, 1, 1, 1, 2],
             "elapsed_ms": [500.0, 500.0, 500.0, 500.0, 500.0, 500.0, 500.0, 500.0, 500.0],
             "kv_usage_pct": [1.0] * 9}
    point = {"steps": steps, "input_len": 100, "duration_s": 3.5,
             "step_summary": {"busy_s": 4.5, "steps": 9},  # busy > duration: no time outside
             "requests": {"start_s": [0.0, 1.2]}}
    rows = timeline(point, every=1.0, warmups=1)
    # sampled before the step at that time: A's tokens count once its step has run
    assert [r["t_s"] for r in rows] == [0.0, 1.0, 2.0]
    assert [r["sent"] for r in rows] == [1, 1, 2]
    assert [r["admitted"] for r in rows] == [0.0, 1.0, 1.0]
    assert [r["running"] for r in rows] == [0, 1, 1]
    # time outside the logged windows is spread over the steps
    point["duration_s"] = 4.5 + 9 * 0.5
    assert [r["t_s"] for r in timeline(point, every=1.0, warmups=1)] == [0.0, 1.0, 2.0, 3.0,
                                                                          4.0, 5.0]

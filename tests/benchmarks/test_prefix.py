"""``benchmarks/prefix.py`` without an engine: prompts, conversation histories (the client
against a fake streaming server), speedups, the results file's merging, the plot."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from benchmarks import prefix

REPO = Path(__file__).resolve().parents[2]


def test_shared_prefix_prompts_share_exactly_the_prefix() -> None:
    pre, prompts = prefix.shared_prefix_prompts(0, 512, prefix_len=40, unique_len=10, n=4)
    assert len(pre) == 40 and len(prompts) == 4
    assert all(len(p) == 50 and p[:40] == pre for p in prompts)
    assert len({tuple(p[40:]) for p in prompts}) == 4  # the suffixes differ
    assert all(100 <= t < 512 for p in prompts for t in p)
    again, _ = prefix.shared_prefix_prompts(0, 512, 40, 10, 4)
    other, _ = prefix.shared_prefix_prompts(1, 512, 40, 10, 4)
    assert again == pre and other[:10] != pre[:10]  # seeded by the point's index


def test_turn_prompts_grow_by_the_answer_and_the_user_tokens() -> None:
    p1 = prefix.first_turn([1, 2], [3])
    p2 = prefix.next_turn(p1, [9, 9], [4, 5])
    assert p1 == [1, 2, 3] and p2 == [1, 2, 3, 9, 9, 4, 5]
    assert p1 == [1, 2, 3]  # not changed in place
    assert prefix.turn_prompt_lens(1000, 800, 200, 6) == [1800, 2800, 3800, 4800, 5800, 6800]


def test_compare_gives_vanilla_numbers_and_speedup() -> None:
    vanilla = prefix.point("shared-prefix", "none", None, 20.0, 3.2, 500.0)
    ours = prefix.compare(prefix.point("shared-prefix", "adakv", 8, 16.0, 4.0, None), vanilla)
    assert ours["speedup_vs_vanilla_pc"] == 1.25
    assert (ours["vanilla_pc_seconds"], ours["vanilla_pc_req_s"],
            ours["vanilla_pc_ttft_p50_ms"]) == (20.0, 3.2, 500.0)
    assert ours["ttft_p50_ms"] is None  # not measured: stays None
    assert prefix.compare(vanilla, vanilla)["speedup_vs_vanilla_pc"] == 1.0
    assert prefix.compare(prefix.point("unique", "adakv", 8, None, None, None),
                          vanilla)["speedup_vs_vanilla_pc"] is None
    with pytest.raises(ValueError):
        prefix.point("other", "none", None, 1.0, 1.0, None)


def _pt(workload: str, method: str, ratio, seconds: float, commit: str, command: str) -> dict:
    return prefix.point(workload, method, ratio, seconds, 1 / seconds, None, commit=commit,
                        command=command, budget=None)


def test_merge_replaces_by_workload_method_ratio_and_keeps_the_rest(tmp_path: Path) -> None:
    path = prefix.results_path(tmp_path, "NVIDIA H100 80GB HBM3", "2026-12-07")
    assert path.name == "prefix-h100-2026-12-07.json"
    first = [_pt("multi-turn", "none", None, 60.0, "abc", "mt"),
             _pt("multi-turn", "adakv", 8, 50.0, "abc", "mt")]
    prefix.save(path, first, "NVIDIA H100 80GB HBM3", "2026-12-07")
    second = [_pt("shared-prefix", "none", None, 20.9, "def", "sp"),
              _pt("shared-prefix", "adakv", 8, 30.0, "def", "sp"),
              _pt("multi-turn", "adakv", 8, 40.0, "def", "mt2")]  # replaces its twin
    prefix.save(path, second, "NVIDIA H100 80GB HBM3", "2026-12-07")
    data = json.loads(path.read_text())
    assert list(data) == ["gpu", "date", "commit", "command", "points"]
    assert [(p["workload"], p["method"], p["seconds"]) for p in data["points"]] == [
        ("shared-prefix", "none", 20.9), ("shared-prefix", "adakv", 30.0),
        ("multi-turn", "none", 60.0), ("multi-turn", "adakv", 40.0)]
    assert all(set(prefix.POINT_KEYS) <= p.keys() for p in data["points"])
    assert data["commit"] == "def, abc" and data["command"] == "sp ; mt ; mt2"
    with pytest.raises(ValueError, match="H200"):
        prefix.merge_results(data, [], "NVIDIA H200", "2026-12-07")


def test_unique_points_from_a_throughput_result() -> None:
    throughput = {"command": "python -m benchmarks.throughput ...", "model_shape": "m",
                  "kv_cache_gib": 8,
                  "vanilla": {"wall_s": 42.0, "peak_concurrency": 40, "preemptions": 0},
                  "points": [{"method": "adakv", "ratio": r, "budget": 6000 // r,
                              "wall_s": w, "num_prompts": 64, "input_len": 6000,
                              "output_len": 500, "regime": "B", "peak_concurrency": 64,
                              "preemptions": 0} for r, w in ((1, 42.0), (8, 24.0))]}
    points = prefix.unique_points(throughput, commit="abc")
    assert [(p["workload"], p["method"], p["ratio"]) for p in points] == [
        ("unique", "none", None), ("unique", "adakv", 1), ("unique", "adakv", 8)]
    assert points[0]["req_s"] == 64 / 42.0 and points[2]["speedup_vs_vanilla_pc"] == 1.75
    assert points[2]["vanilla_pc_req_s"] == 64 / 42.0 and points[2]["commit"] == "abc"


def test_summarize_turns() -> None:
    records = [{"conversation": c, "turn": t, "ttft_s": 0.1 * (t + 1), "prompt_len": 10,
                "output_len": 4, "cached_tokens": 8 * t} for c in range(2) for t in range(2)]
    records.append({"conversation": 2, "turn": 0, "prompt_len": 10, "error": "boom"})
    s = prefix.summarize_turns(records, 2.0, turns=2)
    assert (s["completed"], s["failed"], s["req_s"], s["out_tokens"]) == (4, 1, 2.0, 16)
    assert s["ttft_p50_ms"] == pytest.approx(150.0)
    assert s["ttft_p50_ms_by_turn"] == [pytest.approx(100.0), pytest.approx(200.0)]
    assert s["cached_tokens"] == 16 and s["errors"] == ["boom"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _with_fake_server(run):
    """A /v1/completions that streams like vLLM's with return_token_ids: the prompt's ids
    in the first event, then 3 tokens one per event, then usage (cached tokens = the
    prompt's length // 2); ``run(url, received)`` gets the prompts it received."""
    from aiohttp import web

    received: list[dict] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        received.append(body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        prompt = body["prompt"]
        gen = [(len(prompt) + k) % 500 for k in range(body["max_tokens"])]
        for k, tok in enumerate(gen):
            choice = {"index": 0, "text": "x", "token_ids": [tok]}
            if k == 0:
                choice["prompt_token_ids"] = prompt
            await resp.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            await asyncio.sleep(0.005)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(gen),
                 "prompt_tokens_details": {"cached_tokens": len(prompt) // 2}}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        return await run(f"http://127.0.0.1:{port}", received)
    finally:
        await runner.cleanup()


def test_conversations_resend_their_history_with_the_generated_ids() -> None:
    pytest.importorskip("aiohttp")
    # a system prompt long enough that the first event is over aiohttp's 64 KiB line limit
    system = prefix.random_ids(0, 100_000, 12_000)
    users = [[prefix.random_ids((c, t), 512, 5) for t in range(3)] for c in range(3)]

    async def run(url, received):
        out = await prefix.run_conversations(url, system, users, 3, stagger_s=0.2,
                                             think_s=0.0, xargs={"kv_compression_ratio": 8},
                                             deadline_s=30)
        return out, received

    (records, seconds, cut), received = asyncio.run(_with_fake_server(run))
    assert not cut and len(records) == 9 and all("error" not in r for r in records)
    assert [(r["conversation"], r["turn"]) for r in records] == [
        (c, t) for c in range(3) for t in range(3)]
    assert len(received) == 9
    for c in range(3):
        prompt = system + users[c][0]
        for t in range(3):
            r = records[3 * c + t]
            assert r["prompt_len"] == len(prompt) and r["output_len"] == 3
            assert r["cached_tokens"] == len(prompt) // 2 and 0 < r["ttft_s"] <= r["latency_s"]
            # the server received exactly this history
            body = next(b for b in received if b["prompt"] == prompt)
            assert body["stream"] and body["return_token_ids"]
            assert body["ignore_eos"] and body["vllm_xargs"] == {"kv_compression_ratio": 8}
            gen = [(len(prompt) + k) % 500 for k in range(3)]
            if t < 2:
                prompt = prefix.next_turn(prompt, gen, users[c][t + 1])
        # conversation c starts c * stagger after the first
        assert records[3 * c]["sent_s"] == pytest.approx(0.2 * c, abs=0.1)
    assert seconds == pytest.approx(max(r["done_s"] for r in records))


def test_deadline_cuts_the_run() -> None:
    pytest.importorskip("aiohttp")
    users = [[[101] * 4 for _ in range(50)]]

    async def run(url, received):
        return await prefix.run_conversations(url, [100] * 8, users, 3, 0.0, 0.0, None,
                                              deadline_s=0.3)

    records, seconds, cut = asyncio.run(_with_fake_server(run))
    assert cut and seconds == 0.3 and 0 < len(records) < 50


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "prefix-cpu-2026-12-07.json"
    vanilla = prefix.point("shared-prefix", "none", None, 20.0, 3.2, 500.0)
    points = [prefix.compare(vanilla, vanilla),
              prefix.compare(prefix.point("shared-prefix", "adakv", 8, 16.0, 4.0, 400.0),
                             vanilla),
              prefix.compare(prefix.point("multi-turn", "adakv", None, 30.0, 6.0, 300.0,
                                          budget=750), vanilla)]
    prefix.save(path, points, "cpu", "2026-12-07")
    prefix.plot([path], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    workloads, series = prefix.bar_groups(points, "speedup_vs_vanilla_pc")
    assert workloads == ["shared-prefix", "multi-turn"]
    assert series == {"adakv budget 750": {"multi-turn": 20.0 / 30.0},
                      "adakv x8": {"shared-prefix": 1.25}}

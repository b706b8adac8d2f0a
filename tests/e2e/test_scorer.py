"""The expected scorer through vLLM (``--kv-scorer expected`` / ``kv_scorer``).

Its kept sets against an independent HF computation are in ``test_kept_sets_hf.py``; here
the settings paths on the small random model: a request's ``kv_scorer`` selects what a
server started with that scorer selects, other requests of the same step keep the window
scorer's selection, and prompts prefilled in chunks select what one chunk selects; a
request that hits a cached prefix computes only the rest, and its mean query is theirs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import run_scenario

pytestmark = pytest.mark.e2e

ADAKV = {"method": "adakv", "budget": 96, "window": 16}


def kept(spec: dict, folder: Path) -> dict[str, object]:
    """Run ``spec`` recording keep masks; {"<request>.L<layer>": mask}."""
    import torch

    run_scenario(spec, env={"VLLM_ADAKV_RECORD_KEPT": str(folder)})
    # Files are <request id>.L<layer>.pt; vLLM suffixes our ids ("3-<random>").
    return {p.name.split("-")[0] + p.suffixes[0]: torch.load(p)
            for p in sorted(folder.glob("*.pt"))}


def test_per_request_scorer_selects_as_the_server_setting(small_model, tmp_path):
    import torch

    # Request 0 and 1: the same prompt; request 1 asks for the expected scorer. Prefix
    # caching off: a request that hits the other's cached prompt computes (and counts in
    # its mean query) only the tokens after the hit.
    requests = [{"len": 700, "seed": 3, "max_tokens": 4}, {"len": 700, "seed": 3, "max_tokens": 4}]
    off = {"enable_prefix_caching": False}
    base = {"model_dir": str(small_model), "requests": requests}
    mixed = kept({**base, "compression": ADAKV, "engine": off,
                  "request_extra_args": {"1": {"kv_scorer": "expected"}}}, tmp_path / "mixed")
    server = kept({**base, "compression": {**ADAKV, "scorer": "expected"}, "engine": off},
                  tmp_path / "server")
    chunked = kept({**base, "compression": {**ADAKV, "scorer": "expected"},
                    "engine": {**off, "max_num_batched_tokens": 256, "max_num_seqs": 2}},
                   tmp_path / "chunked")
    assert len(mixed) == 4  # 2 requests x 2 layers
    for layer in ("000", "001"):
        window, expected = mixed[f"0.L{layer}"], mixed[f"1.L{layer}"]
        assert not torch.equal(window, expected), layer
        assert torch.equal(expected, server[f"0.L{layer}"]), layer
        assert torch.equal(server[f"0.L{layer}"], server[f"1.L{layer}"]), layer
        assert torch.equal(chunked[f"0.L{layer}"], server[f"0.L{layer}"]), layer
        assert int(expected.sum()) == int(window.sum())  # same budget: H * B per layer


def test_a_prefix_hit_leaves_its_tokens_out_of_the_mean_query(small_model, tmp_path):
    """Prefix caching on: the second request of a prompt hits the first's blocks up to its
    window and averages only the queries it computes, so it may select otherwise (the
    documented limit of the expected scorer with a cached prefix)."""
    import torch

    requests = [{"len": 700, "seed": 3, "max_tokens": 4}, {"len": 700, "seed": 3, "max_tokens": 4}]
    res = kept({"model_dir": str(small_model), "requests": requests,
                "compression": {**ADAKV, "scorer": "expected"},
                "arrive_at_step": {"0": [0], "8": [1]}}, tmp_path / "hit")
    assert any(not torch.equal(res[f"0.L{k}"], res[f"1.L{k}"]) for k in ("000", "001"))

"""The worker side of kept-block reports (worker/reports.py) and the wire format
(protocol.py), against vLLM's real output classes and aggregator."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("vllm.v1.core.block_pool")

from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator  # noqa: E402
from vllm.v1.outputs import (  # noqa: E402
    EMPTY_MODEL_RUNNER_OUTPUT,
    AsyncModelRunnerOutput,
    KVConnectorOutput,
    ModelRunnerOutput,
)

from vllm_adakv import protocol  # noqa: E402
from vllm_adakv.protocol import KeptBlocks  # noqa: E402
from vllm_adakv.worker import reports  # noqa: E402
from vllm_adakv.worker.reports import KeptBlockPosts  # noqa: E402

BS = 32

# ------------------------------------------------------------------ worker side


@pytest.fixture
def posts() -> KeptBlockPosts:
    return KeptBlockPosts()


def test_posts_are_numbered_per_request_and_taken_once(posts):
    posts.post("a", 3)
    posts.post("b", 1)
    posts.post("a", 2)
    got = posts.take({"a", "b"}, rank=1)
    assert got == (KeptBlocks(1, "a", 0, 3), KeptBlocks(1, "b", 0, 1), KeptBlocks(1, "a", 1, 2))
    assert posts.take({"a", "b"}, rank=1) == ()
    posts.post("a", 4)
    assert posts.take({"a"}, rank=0) == (KeptBlocks(0, "a", 2, 4),)


def test_posts_of_finished_requests_are_dropped_and_forgotten(posts):
    posts.post("gone", 3)
    posts.post("live", 1)
    assert posts.take({"live"}, rank=0) == (KeptBlocks(0, "live", 0, 1),)
    assert "gone" not in posts._seq and posts._seq == {"live": 1}


def test_posts_are_bounded(posts, monkeypatch, caplog):
    monkeypatch.setattr(reports, "MAX_POSTED", 3)
    with caplog.at_level(logging.ERROR, logger="vllm.adakv"):
        for i in range(5):
            posts.post("a", i + 1)
    assert len(posts._posted) == 3 and caplog.text.count("dropping") == 1
    assert [e.seq for e in posts.take({"a"}, 0)] == [0, 1, 2]
    posts.post("a", 1)  # a dropped post still counts in the sequence
    assert posts.take({"a"}, 0)[0].seq == 5


def test_attach_to_outputs(posts):
    out = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0})
    assert reports.attach(out, posts, {"a"}, 0) is out and not hasattr(out, protocol.ATTR)
    posts.post("a", 2)
    assert reports.attach(out, posts, {"a"}, 0) is out
    assert protocol.entries_of(out) == (KeptBlocks(0, "a", 0, 2),)
    assert not hasattr(out, protocol.ATTR)

    posts.post("a", 1)
    empty = reports.attach(EMPTY_MODEL_RUNNER_OUTPUT, posts, {"a"}, 0)
    assert empty is not EMPTY_MODEL_RUNNER_OUTPUT and not hasattr(
        EMPTY_MODEL_RUNNER_OUTPUT, protocol.ATTR)
    assert protocol.entries_of(empty) == (KeptBlocks(0, "a", 1, 1),)

    class Async(AsyncModelRunnerOutput):
        def get_output(self):
            return EMPTY_MODEL_RUNNER_OUTPUT

    posts.post("a", 3)
    pending = reports.attach(Async(), posts, {"a"}, 0)
    assert not posts.pending()
    resolved = pending.get_output()
    assert protocol.entries_of(resolved) == (KeptBlocks(0, "a", 2, 3),)
    assert not hasattr(EMPTY_MODEL_RUNNER_OUTPUT, protocol.ATTR)

    posts.post("a", 3)
    assert reports.attach(None, posts, {"a"}, 0) is None and posts.pending()  # kept for later


def test_minimal_output_of_other_ranks(posts):
    full = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0}, sampled_token_ids=[[7]])
    minimal = reports.minimal_output(full, posts, {"a"}, 1)
    assert minimal.req_ids == [] and minimal.sampled_token_ids == []
    assert not hasattr(minimal, protocol.ATTR)
    posts.post("a", 2)
    minimal = reports.minimal_output(full, posts, {"a"}, 1)
    assert protocol.entries_of(minimal) == (KeptBlocks(1, "a", 0, 2),)


@pytest.mark.parametrize("with_connector", [False, True])
def test_aggregator_gathers_every_rank(posts, with_connector):
    outs = [ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0}, sampled_token_ids=[[5]],
                              kv_connector_output=KVConnectorOutput(finished_sending={"x"}))]
    outs += [ModelRunnerOutput(req_ids=[], req_id_to_index={},
                               kv_connector_output=KVConnectorOutput(finished_sending={"x"}))
             for _ in range(2)]
    protocol.add_entries(outs[0], (KeptBlocks(0, "a", 0, 2),))
    protocol.add_entries(outs[2], (KeptBlocks(2, "a", 0, 4), KeptBlocks(2, "b", 0, 1)))
    inner = KVOutputAggregator(expected_finished_count=3) if with_connector else None
    result = protocol.KeptBlocksAggregator(inner).aggregate(outs, output_rank=0)
    assert result is outs[0] and result.sampled_token_ids == [[5]]
    assert sorted(protocol.entries_of(result)) == sorted(
        [KeptBlocks(0, "a", 0, 2), KeptBlocks(2, "a", 0, 4), KeptBlocks(2, "b", 0, 1)])
    if with_connector:  # vLLM's aggregation still happens: all 3 ranks finished sending x
        assert result.kv_connector_output.finished_sending == {"x"}
    assert protocol.KeptBlocksAggregator(inner).aggregate([None, None], 0) is None


# ------------------------------------------------------------------ when it is active


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from adakv_devtools.tiny_model import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


def _vllm_config(model, compression: dict | None, **engine):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_adakv.plugin import register

    register()
    extra = {"kv_compression": compression} if compression is not None else {}
    return EngineArgs(model=str(model), dtype="float32", block_size=BS, max_model_len=1024,
                      additional_config=extra, **engine).create_engine_config()


@pytest.mark.parametrize("compression", [None, {"method": "none"}])
def test_nothing_is_active_without_compression(tiny_model, compression):
    from types import SimpleNamespace

    from vllm_adakv import patches
    from vllm_adakv.scheduler.kept_reports import book_of
    from vllm_adakv.worker.context import attach_context

    cfg = _vllm_config(tiny_model, compression, tensor_parallel_size=2)
    assert not patches.reports_need_every_rank(cfg)
    assert not patches._every_rank_reports(SimpleNamespace(vllm_config=cfg))  # no aggregator
    runner = type("Runner", (), {"vllm_config": cfg})()
    attach_context(runner)
    assert patches._report_role(runner) is None  # worker hook off
    assert book_of(SimpleNamespace(vllm_config=cfg)) is None  # scheduler hooks off


def test_every_rank_reports_for_gvote_with_tensor_parallelism_only(tiny_model):
    from vllm_adakv.patches import reports_need_every_rank

    gvote = {"method": "gvote", "max_budget": 128}
    assert reports_need_every_rank(_vllm_config(tiny_model, gvote, tensor_parallel_size=2))
    assert not reports_need_every_rank(_vllm_config(tiny_model, gvote))
    assert not reports_need_every_rank(
        _vllm_config(tiny_model, {"method": "adakv", "budget": 64}, tensor_parallel_size=2))


def test_pipeline_parallelism_is_refused(tiny_model):
    from vllm_adakv.config import KVCompressionConfigError

    with pytest.raises(KVCompressionConfigError, match="pipeline parallelism"):
        _vllm_config(tiny_model, {"method": "gvote"}, pipeline_parallel_size=2)

"""The kvpress reference feeds the harness's own agnostic prompts (checked without kvpress)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.quality.engine import REPO
from benchmarks.quality.kvpress_reference import press_inputs, removed_fraction
from benchmarks.quality.run import build_samples, cell_requests
from benchmarks.quality.tasks import make_sample
from tests.e2e.real_model import smollm2_dir

TASKS = ["niah_multikey", "vt"]


def _model_dir(name: str):
    from adakv_devtools import prepare_model as pm

    if name == "smollm2":
        return smollm2_dir()
    folder = pm.default_out_dir(name)  # the quality model: used where it was prepared
    if not pm.is_complete(folder):
        pytest.skip(f"{folder} not prepared")
    return folder


@pytest.fixture(scope="module", params=["smollm2", "qwen2.5-coder-0.5b"])
def tok(request):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(_model_dir(request.param))


def test_reference_feeds_the_agnostic_split_of_each_sample(tok):
    samples = build_samples(tok, TASKS, [1024], 2, seed=0)
    agnostic = cell_requests([(1024, 2)], TASKS, samples, ["agnostic"])
    aware = cell_requests([(1024, 2)], TASKS, samples, ["aware"])
    assert len(agnostic) == 4
    for req, whole in zip(agnostic, aware, strict=True):
        task, context, index, mode = req["id"].split("/")
        assert mode == "agnostic"
        s = make_sample(tok, task, int(context), int(index), 0)  # built anew, no cache shared
        ctx, question = press_inputs(req)
        # what vLLM's agnostic run gets: prompt = the context, forced = the question
        assert (ctx, question) == (req["prompt"], req["forced"])
        assert (ctx, question) == (s.prefix_ids, s.question_ids)
        assert ctx + question == whole["prompt"]  # the aware prompt, split at the question
        assert req["max_tokens"] == s.max_tokens


def test_the_reference_imports_neither_vllm_nor_kvpress_up_front():
    code = ("import sys, benchmarks.quality.kvpress_reference\n"
            "bad = {m.split('.')[0] for m in sys.modules} & "
            "{'vllm', 'vllm_adakv', 'kvpress', 'torch', 'transformers'}\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_removed_fraction_keeps_the_budget_under_kvpress_rounding():
    for length in range(100, 4200, 37):
        for budget in (length // 2, length // 4, 33):
            ratio = removed_fraction(budget, length)
            assert 0.0 <= ratio < 1.0
            assert int(length * (1 - ratio)) == budget  # kvpress keeps int(k * (1 - ratio))
    assert removed_fraction(2048, 2000) == 0.0

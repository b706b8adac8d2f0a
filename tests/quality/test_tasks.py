"""Task generators, scoring and engine grouping of the quality harness (no vLLM run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.quality.run import Cell, plan_cells, requests_for
from benchmarks.quality.tasks import TASKS, Builder, is_correct, make_sample
from tests.e2e.real_model import smollm2_dir


@pytest.fixture(scope="module")
def tok():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir())


def test_is_correct_is_exact_on_the_answer_set():
    assert is_correct("niah_single", ["1234567"], " 1234567.")
    assert not is_correct("niah_single", ["1234567"], " 123456.")
    assert not is_correct("niah_single", ["1234567"], " 12345678")  # not a prefix match
    assert is_correct("cwe", ["dog", "cat"], "Cat, DOG")
    assert not is_correct("cwe", ["dog", "cat"], "dogs, cat")
    assert not is_correct("niah_multivalue", ["1111111", "2222222"], "1111111")


@pytest.mark.parametrize("task", TASKS)
def test_samples_fit_are_seeded_and_hold_their_answers(tok, task):
    b = Builder(tok)
    a = make_sample(tok, task, 2048, 3, builder=b)
    assert 2048 - 80 <= a.prompt_len <= 2048
    assert make_sample(tok, task, 2048, 3, builder=b) == a
    other = make_sample(tok, task, 2048, 4, builder=b)
    assert other.answers != a.answers
    context = tok.decode(a.prefix_ids)
    question = tok.decode(a.question_ids)
    for ans in a.answers:
        assert ans in context  # every expected value is in the compressed part
    if task.startswith("niah"):
        assert "special magic number" in question
    # the two halves tokenize the whole chat prompt (no token merges across the split)
    full = tok(tok.decode(a.prefix_ids + a.question_ids), add_special_tokens=False)
    assert len(full["input_ids"]) == a.prompt_len


def test_keys_do_not_depend_on_string_hashing():
    code = ("import random; from benchmarks.quality.tasks import _keys; "
            "print(_keys(random.Random('niah_multikey/2048/0/0'), 4))")
    repo = Path(__file__).resolve().parents[2]
    seen = {subprocess.run([sys.executable, "-c", code], cwd=repo, check=True, text=True,
                           capture_output=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2", "3", "4")}
    assert len(seen) == 1, seen


def test_plan_cells_builds_one_engine_per_method_and_budget():
    cells = plan_cells(["none", "adakv"], [2048, 4096], [2, 4, 8], window=32)
    assert list(cells)[0] == Cell("none", None)
    assert cells[Cell("adakv", 1024)] == [(2048, 2), (4096, 4)]
    assert sorted(c.budget for c in cells if c.method == "adakv") == [256, 512, 1024, 2048]
    assert [c.budget for c in cells][1:] == sorted([c.budget for c in cells][1:], reverse=True)
    assert Cell("adakv", 16) not in plan_cells(["adakv"], [256], [16], window=32)


def test_agnostic_requests_force_the_question(tok):
    s = make_sample(tok, "niah_single", 1024, 0)
    aware, agnostic = requests_for([s], ["aware", "agnostic"])
    assert aware["prompt"] == agnostic["prompt"] + agnostic["forced"]
    assert aware["forced"] == [] and agnostic["forced"] == s.question_ids


def test_method_labels_carry_gvote_p_and_the_scorer():
    from benchmarks.quality.run import method_settings

    window = {"scorer": "window"}
    assert method_settings("adakv") == ("adakv", window, {"kv_scorer": "window"})
    assert method_settings("none") == ("none", {}, {})
    assert method_settings("gvote@0.9") == ("gvote", {"gvote_p": 0.9}, {"kv_gvote_p": 0.9})
    assert method_settings("pyramidkv+expected") == (
        "pyramidkv", {"scorer": "expected"}, {"kv_scorer": "expected"})
    with pytest.raises(ValueError, match="only gvote"):
        method_settings("snapkv@0.9")
    with pytest.raises(ValueError, match="only the scored methods"):
        method_settings("streamingllm+expected")


def test_run_scores_engine_outputs_into_rows(tok, tmp_path, monkeypatch):
    from benchmarks.quality import run

    calls = []

    def fake_engine(job, workdir, **kw):  # answers every request with its expected values
        calls.append(job)
        outputs, kept = {}, {}
        for r in job["requests"]:
            task, context, index, _mode = r["id"].split("/")
            s = make_sample(tok, task, int(context), int(index))
            outputs[r["id"]] = tok(" " + ", ".join(s.answers) + ".", add_special_tokens=False
                                   )["input_ids"] + [tok.eos_token_id, 11]
            if job["compression"]:
                kept[r["id"]] = job["compression"]["budget"]
        return {"outputs": outputs, "kept_per_head": kept, "wall_s": 0.0, "load_s": 0.0}

    monkeypatch.setattr(run, "run_in_subprocess", fake_engine)
    out = tmp_path / "q.json"
    run.main(["--model", str(smollm2_dir()), "--contexts", "1024", "--tasks", "niah_single",
              "--samples", "2", "--methods", "none,adakv", "--ratios", "2",
              "--modes", "agnostic", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [c["compression"] for c in calls] == [None, {"method": "adakv", "budget": 512,
                                                        "window": 32, "scorer": "window"}]
    assert [(r["method"], r["budget"], r["compression"], r["n"], r["accuracy"])
            for r in result["rows"]] == [("none", None, 1, 2, 1.0), ("adakv", 512, 2, 2, 1.0)]
    assert list(result["rows"][0]) == ["task", "context", "mode", "method", "budget",
                                       "compression", "n", "accuracy", "kept_fraction"]
    assert result["rows"][0]["kept_fraction"] == 1.0
    assert 0.5 < result["rows"][1]["kept_fraction"] < 0.6  # 512 of a ~980-token context
    assert all(d["correct"] and "," not in d["output"] for d in result["details"])

"""``--kv-*`` flags: plain argparse, folding into additional_config, and through vLLM."""

from __future__ import annotations

import argparse
import copy
import json

import pytest

from vllm_adakv.cli import FLAG_DESTS, add_kv_compression_args, fold_into_additional_config
from vllm_adakv.config import (
    ADDITIONAL_CONFIG_KEY,
    FLAG_OF_FIELD,
    SETTINGS,
    KVCompressionConfig,
    KVCompressionConfigError,
)

ALL_FLAGS = sorted(FLAG_OF_FIELD.values())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test")
    assert add_kv_compression_args(parser) is parser
    return parser


def _kv_options(parser) -> list[str]:
    """Our option strings on ``parser`` (vLLM has --kv-cache-* flags of its own)."""
    return [o for a in parser._actions for o in a.option_strings if o in FLAG_OF_FIELD.values()]


def _fold(argv, additional=None):
    return fold_into_additional_config(_parser().parse_args(argv), additional)


# ------------------------------------------------------------------ argparse


def test_flags_added_once_even_when_called_twice():
    parser = _parser()
    first = _kv_options(parser)
    assert sorted(first) == ALL_FLAGS
    assert add_kv_compression_args(parser) is parser
    assert _kv_options(parser) == first
    # Help still renders (no duplicate-option conflicts).
    assert "--kv-compression" in parser.format_help()


def test_flag_dests_match_config_fields():
    assert set(FLAG_DESTS.values()) == set(FLAG_OF_FIELD)
    for dest, field in FLAG_DESTS.items():
        assert "--" + dest.replace("_", "-") == FLAG_OF_FIELD[field]


def test_help_of_each_flag_shows_its_default():
    actions = {a.option_strings[0]: a for a in _parser()._actions if a.option_strings}
    for s in SETTINGS:
        assert actions[s.flag].help == s.help.format(default=s.default)
        assert f"(default: {s.default}" in actions[s.flag].help
        assert actions[s.flag].choices == (s.choices or None)


def test_unset_flags_are_absent_from_namespace():
    args = _parser().parse_args([])
    for dest in FLAG_DESTS:
        assert getattr(args, dest, None) is None


def test_all_flags_parse_with_types():
    args = _parser().parse_args([
        "--kv-compression", "pyramidkv", "--kv-budget", "300", "--kv-window", "20",
        "--kv-pooling", "avg", "--kv-pool-kernel", "5", "--kv-alpha", "0.5",
        "--kv-gqa-reduce", "max", "--kv-sink-tokens", "2", "--kv-pyramid-beta", "8",
    ])
    assert args.kv_compression == "pyramidkv"
    assert args.kv_budget == 300 and isinstance(args.kv_budget, int)
    assert args.kv_window == 20
    assert args.kv_pooling == "avg"
    assert args.kv_pool_kernel == 5
    assert args.kv_alpha == 0.5 and isinstance(args.kv_alpha, float)
    assert args.kv_gqa_reduce == "max"
    assert args.kv_sink_tokens == 2
    assert args.kv_pyramid_beta == 8.0 and isinstance(args.kv_pyramid_beta, float)


def test_gvote_flags_parse_with_types():
    args = _parser().parse_args([
        "--kv-compression", "gvote", "--kv-gvote-samples", "16", "--kv-gvote-p", "0.9",
        "--kv-gvote-seed", "7", "--kv-max-budget", "512", "--kv-min-compression", "4",
    ])
    assert args.kv_compression == "gvote"
    assert args.kv_gvote_samples == 16 and isinstance(args.kv_gvote_samples, int)
    assert args.kv_gvote_p == 0.9 and isinstance(args.kv_gvote_p, float)
    assert args.kv_gvote_seed == 7 and isinstance(args.kv_gvote_seed, int)
    assert args.kv_max_budget == 512 and isinstance(args.kv_max_budget, int)
    assert args.kv_min_compression == 4.0 and isinstance(args.kv_min_compression, float)
    cfg = fold_into_additional_config(args, None)[ADDITIONAL_CONFIG_KEY]
    assert cfg == KVCompressionConfig(method="gvote", gvote_samples=16, gvote_p=0.9,
                                      gvote_seed=7, max_budget=512,
                                      min_compression=4.0).to_dict()


@pytest.mark.parametrize("argv", [
    ["--kv-compression", "h2o"],
    ["--kv-pooling", "min"],
    ["--kv-gqa-reduce", "sum"],
    ["--kv-budget", "12.5"],
    ["--kv-budget", "lots"],
    ["--kv-alpha", "half"],
])
def test_argparse_rejects_bad_tokens(argv, capsys):
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(argv)
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err


# ------------------------------------------------------------------ folding


def test_no_flags_no_section_leaves_additional_config_unchanged():
    for additional in ({}, {"foo": 1, "bar": {"x": [1, 2]}}):
        snapshot = copy.deepcopy(additional)
        out = _fold([], additional)
        assert out == snapshot
        assert ADDITIONAL_CONFIG_KEY not in out
        assert additional == snapshot  # input not mutated


def test_no_flags_none_additional_config_gives_empty_dict():
    assert _fold([], None) == {}


def test_flags_alone_create_normalised_section():
    out = _fold(["--kv-compression", "adakv", "--kv-budget", "256"], {"foo": 1})
    expected = KVCompressionConfig(method="adakv", budget=256).to_dict()
    assert out == {"foo": 1, ADDITIONAL_CONFIG_KEY: expected}
    assert set(out[ADDITIONAL_CONFIG_KEY]) == set(FLAG_OF_FIELD)


def test_flags_win_over_section_and_unset_flags_keep_section_values():
    section = {"method": "snapkv", "budget": 512, "window": 16, "alpha": 0.7, "pooling": "avg"}
    additional = {"foo": 1, ADDITIONAL_CONFIG_KEY: dict(section)}
    snapshot = copy.deepcopy(additional)
    out = _fold(["--kv-compression", "adakv", "--kv-budget", "200"], additional)
    got = out[ADDITIONAL_CONFIG_KEY]
    assert got["method"] == "adakv" and got["budget"] == 200  # flags win
    assert got["window"] == 16 and got["alpha"] == 0.7 and got["pooling"] == "avg"  # kept
    assert got == KVCompressionConfig(method="adakv", budget=200, window=16, alpha=0.7,
                                      pooling="avg").to_dict()
    assert out["foo"] == 1
    assert additional == snapshot  # input not mutated


def test_section_without_flags_is_validated_and_normalised():
    out = _fold([], {ADDITIONAL_CONFIG_KEY: {"method": "streamingllm", "alpha": 1}})
    assert out[ADDITIONAL_CONFIG_KEY] == KVCompressionConfig(method="streamingllm",
                                                             alpha=1.0).to_dict()


@pytest.mark.parametrize("flag,value,field,expected", [
    ("--kv-compression", "streamingllm", "method", "streamingllm"),
    ("--kv-budget", "77", "budget", 77),
    ("--kv-window", "5", "window", 5),
    ("--kv-scorer", "expected", "scorer", "expected"),
    ("--kv-pooling", "avg", "pooling", "avg"),
    ("--kv-pool-kernel", "9", "pool_kernel", 9),
    ("--kv-alpha", "0.9", "alpha", 0.9),
    ("--kv-gqa-reduce", "max", "gqa_reduce", "max"),
    ("--kv-sink-tokens", "0", "sink_tokens", 0),
    ("--kv-pyramid-beta", "3.5", "pyramid_beta", 3.5),
    ("--kv-gvote-samples", "3", "gvote_samples", 3),
    ("--kv-gvote-p", "0.5", "gvote_p", 0.5),
    ("--kv-gvote-seed", "11", "gvote_seed", 11),
    ("--kv-reserve-output", "500", "reserve_output", 500),
    ("--kv-decode-interval", "8", "decode_interval", 8),
    ("--kv-decode-budget", "40", "decode_budget", 40),
])
def test_each_flag_overrides_its_field(flag, value, field, expected):
    base = {"method": "snapkv", "budget": 64, "window": 8, "scorer": "window",
            "pooling": "max", "pool_kernel": 3,
            "alpha": 0.1, "gqa_reduce": "mean", "sink_tokens": 4, "pyramid_beta": 10.0,
            "gvote_samples": 2, "gvote_p": 0.8, "gvote_seed": 5, "max_budget": 0,
            "min_compression": 1.0, "reserve_output": 0, "decode_budget": 0,
            "decode_interval": 32}
    out = _fold([flag, value], {ADDITIONAL_CONFIG_KEY: dict(base)})[ADDITIONAL_CONFIG_KEY]
    assert out == {**base, field: expected}


@pytest.mark.parametrize("argv,additional,flag", [
    (["--kv-budget", "16"], None, "--kv-budget"),  # default window 32
    (["--kv-window", "2000"], None, "--kv-budget"),
    (["--kv-pool-kernel", "4"], None, "--kv-pool-kernel"),
    (["--kv-pool-kernel", "0"], None, "--kv-pool-kernel"),
    (["--kv-alpha", "1.5"], None, "--kv-alpha"),
    (["--kv-sink-tokens", "-1"], None, "--kv-sink-tokens"),
    (["--kv-reserve-output", "-5"], None, "--kv-reserve-output"),
    (["--kv-pyramid-beta", "0.5"], None, "--kv-pyramid-beta"),
    (["--kv-compression", "gvote", "--kv-gvote-p", "0"], None, "--kv-gvote-p"),
    (["--kv-compression", "gvote", "--kv-gvote-samples", "-1"], None, "--kv-gvote-samples"),
    (["--kv-compression", "gvote", "--kv-max-budget", "32"], None, "--kv-max-budget"),
    (["--kv-compression", "gvote", "--kv-min-compression", "0.5"], None,
     "--kv-min-compression"),
    (["--kv-compression", "adakv", "--kv-max-budget", "512"], None, "--kv-max-budget"),
    (["--kv-min-compression", "2"], {ADDITIONAL_CONFIG_KEY: {"method": "snapkv"}},
     "--kv-min-compression"),
    (["--kv-compression", "streamingllm", "--kv-budget", "40", "--kv-window", "32",
      "--kv-sink-tokens", "9"], None, "--kv-sink-tokens"),
    # Valid flag, but the merged combination with the section is not.
    (["--kv-window", "64"], {ADDITIONAL_CONFIG_KEY: {"budget": 64}}, "--kv-budget"),
    (["--kv-compression", "streamingllm"],
     {ADDITIONAL_CONFIG_KEY: {"budget": 40, "window": 32, "sink_tokens": 16}},
     "--kv-sink-tokens"),
    # A bad section is reported even with no flag set.
    ([], {ADDITIONAL_CONFIG_KEY: {"budgit": 3}}, "unknown key"),
    ([], {ADDITIONAL_CONFIG_KEY: {"budget": "3"}}, "--kv-budget"),
])
def test_invalid_combination_raises(argv, additional, flag):
    with pytest.raises(KVCompressionConfigError, match=flag):
        _fold(argv, additional)


@pytest.mark.parametrize("section", ["adakv", 5, [["method", "adakv"]], False])
def test_non_dict_section_raises_config_error(section):
    with pytest.raises(KVCompressionConfigError, match="must be a dict"):
        _fold([], {ADDITIONAL_CONFIG_KEY: section})


# ------------------------------------------------------------------ through vLLM

vllm_arg_utils = pytest.importorskip("vllm.engine.arg_utils")


@pytest.fixture(scope="module")
def vllm_parsers():
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    import vllm_adakv.plugin

    vllm_adakv.plugin.register()
    vllm_adakv.plugin.register()  # idempotent
    return {
        cls: cls.add_cli_args(FlexibleArgumentParser())
        for cls in (vllm_arg_utils.EngineArgs, vllm_arg_utils.AsyncEngineArgs)
    }


ENGINE_CLASSES = ["EngineArgs", "AsyncEngineArgs"]


def _engine(vllm_parsers, cls_name, argv):
    cls = getattr(vllm_arg_utils, cls_name)
    args = vllm_parsers[cls].parse_args(["--model", "x", *argv])
    return cls.from_cli_args(args)


@pytest.mark.parametrize("cls_name", ENGINE_CLASSES)
def test_vllm_parser_has_flags_once(vllm_parsers, cls_name):
    parser = vllm_parsers[getattr(vllm_arg_utils, cls_name)]
    assert sorted(_kv_options(parser)) == ALL_FLAGS
    add_kv_compression_args(parser)
    assert sorted(_kv_options(parser)) == ALL_FLAGS


@pytest.mark.parametrize("cls_name", ENGINE_CLASSES)
def test_vllm_flags_fold_into_additional_config(vllm_parsers, cls_name):
    engine = _engine(vllm_parsers, cls_name, [
        "--kv-compression", "adakv", "--kv-budget", "256",
        "--additional-config", json.dumps({"foo": 1}),
    ])
    assert type(engine).__name__ == cls_name
    assert engine.additional_config == {
        "foo": 1,
        ADDITIONAL_CONFIG_KEY: {
            "method": "adakv", "budget": 256, "window": 32, "scorer": "window",
            "pooling": "max", "pool_kernel": 7, "alpha": 0.2, "gqa_reduce": "mean",
            "sink_tokens": 4, "pyramid_beta": 20.0, "gvote_samples": 8, "gvote_p": 0.95,
            "gvote_seed": 0, "max_budget": 0, "min_compression": 1.0, "reserve_output": 0,
            "decode_budget": 0, "decode_interval": 32,
        },
    }


@pytest.mark.parametrize("cls_name", ENGINE_CLASSES)
def test_vllm_flags_win_over_additional_config_section(vllm_parsers, cls_name):
    section = {"method": "snapkv", "budget": 512, "window": 16}
    engine = _engine(vllm_parsers, cls_name, [
        "--additional-config", json.dumps({ADDITIONAL_CONFIG_KEY: section}),
        "--kv-budget", "128", "--kv-alpha", "0.5",
    ])
    assert engine.additional_config == {
        ADDITIONAL_CONFIG_KEY: KVCompressionConfig(
            method="snapkv", budget=128, window=16, alpha=0.5
        ).to_dict()
    }


@pytest.mark.parametrize("cls_name", ENGINE_CLASSES)
def test_vllm_no_flags_leaves_additional_config_alone(vllm_parsers, cls_name):
    assert ADDITIONAL_CONFIG_KEY not in (
        _engine(vllm_parsers, cls_name, []).additional_config or {}
    )
    engine = _engine(vllm_parsers, cls_name, ["--additional-config", '{"foo": 1}'])
    assert engine.additional_config == {"foo": 1}


@pytest.mark.parametrize("cls_name", ENGINE_CLASSES)
def test_vllm_underscore_and_equals_spellings(vllm_parsers, cls_name):
    engine = _engine(vllm_parsers, cls_name, ["--kv_compression", "snapkv", "--kv-window=8"])
    got = engine.additional_config[ADDITIONAL_CONFIG_KEY]
    assert got["method"] == "snapkv" and got["window"] == 8


@pytest.mark.parametrize("cls_name", ENGINE_CLASSES)
@pytest.mark.parametrize("argv,flag", [
    (["--kv-compression", "adakv", "--kv-budget", "16"], "--kv-budget"),
    (["--kv-pool-kernel", "8"], "--kv-pool-kernel"),
    (["--kv-compression", "streamingllm", "--kv-budget", "40", "--kv-sink-tokens", "20"],
     "--kv-sink-tokens"),
    (["--additional-config", json.dumps({ADDITIONAL_CONFIG_KEY: {"window": 64}}),
      "--kv-budget", "64"], "--kv-budget"),
    (["--additional-config", json.dumps({ADDITIONAL_CONFIG_KEY: {"methd": "adakv"}})],
     "unknown key"),
    (["--kv-compression", "gvote", "--kv-max-budget", "8"], "--kv-max-budget"),
])
def test_vllm_bad_combination_exits_2(vllm_parsers, cls_name, argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        _engine(vllm_parsers, cls_name, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err


@pytest.mark.parametrize("cls_name", ENGINE_CLASSES)
def test_vllm_bad_choice_rejected_by_argparse(vllm_parsers, cls_name, capsys):
    with pytest.raises(SystemExit) as info:
        _engine(vllm_parsers, cls_name, ["--kv-compression", "bogus"])
    assert info.value.code == 2
    assert "--kv-compression" in capsys.readouterr().err


def test_vllm_string_section_exits_2(vllm_parsers, capsys):
    with pytest.raises(SystemExit) as info:
        _engine(vllm_parsers, "EngineArgs",
                ["--additional-config", json.dumps({ADDITIONAL_CONFIG_KEY: "adakv"})])
    assert info.value.code == 2


@pytest.mark.parametrize("cls_name", ENGINE_CLASSES)
@pytest.mark.parametrize("dtype", ["fp8", "fp8_e5m2"])
def test_vllm_fp8_cache_with_compression_is_refused_on_cpu(vllm_parsers, cls_name, dtype):
    """Before vLLM's own checks (its CPU fp8 error names no flag), nothing started."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("CUDA compresses fp8 caches (tests/e2e/test_fp8.py)")
    engine = _engine(vllm_parsers, cls_name,
                     ["--kv-compression", "adakv", "--kv-cache-dtype", dtype])
    with pytest.raises(KVCompressionConfigError, match=f"--kv-cache-dtype {dtype} .*CPU"):
        engine.create_engine_config()

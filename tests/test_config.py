"""KVCompressionConfig: defaults, validation (each error names its flag), from_dict typing."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import re

import pytest

from vllm_adakv.config import (
    ADDITIONAL_CONFIG_KEY,
    FLAG_OF_FIELD,
    GQA_REDUCES,
    METHODS,
    POOLINGS,
    SETTINGS,
    KVCompressionConfig,
    KVCompressionConfigError,
    check_type,
)


def _raises_naming(flag: str, **kwargs):
    with pytest.raises(KVCompressionConfigError, match=re.escape(flag)) as info:
        KVCompressionConfig(**kwargs)
    return info.value


def test_defaults_are_valid_and_disabled():
    cfg = KVCompressionConfig()
    assert cfg.method == "none"
    assert not cfg.enabled
    assert cfg.budget > cfg.window >= 1
    assert cfg.selectable == cfg.budget - cfg.window
    assert cfg.pooling in POOLINGS and cfg.gqa_reduce in GQA_REDUCES
    assert cfg.pool_kernel % 2 == 1 and cfg.pool_kernel > 0
    assert 0.0 <= cfg.alpha <= 1.0
    assert cfg.sink_tokens >= 0 and cfg.pyramid_beta >= 1.0


def test_error_is_a_value_error():
    assert issubclass(KVCompressionConfigError, ValueError)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_valid_with_defaults(method):
    cfg = KVCompressionConfig(method=method)
    assert cfg.enabled == (method != "none")


@pytest.mark.parametrize("flag,kwargs", [
    ("--kv-compression", {"method": "h2o"}),
    ("--kv-compression", {"method": "AdaKV"}),
    ("--kv-compression", {"method": ""}),
    ("--kv-pooling", {"pooling": "min"}),
    ("--kv-gqa-reduce", {"gqa_reduce": "sum"}),
    ("--kv-window", {"window": 0}),
    ("--kv-window", {"window": -3}),
    ("--kv-budget", {"budget": 32, "window": 32}),
    ("--kv-budget", {"budget": 10, "window": 32}),
    ("--kv-budget", {"budget": 0}),
    ("--kv-budget", {"budget": -5}),
    ("--kv-alpha", {"alpha": -0.01}),
    ("--kv-alpha", {"alpha": 1.0001}),
    ("--kv-alpha", {"alpha": float("nan")}),
    ("--kv-pool-kernel", {"pool_kernel": 4}),
    ("--kv-pool-kernel", {"pool_kernel": 2}),
    ("--kv-pool-kernel", {"pool_kernel": 0}),
    ("--kv-pool-kernel", {"pool_kernel": -1}),
    ("--kv-pool-kernel", {"pool_kernel": -7}),
    ("--kv-sink-tokens", {"sink_tokens": -1}),
    ("--kv-reserve-output", {"reserve_output": -1}),
    ("--kv-sink-tokens", {"method": "streamingllm", "budget": 64, "window": 32,
                          "sink_tokens": 33}),
    ("--kv-pyramid-beta", {"pyramid_beta": 0.5}),
    ("--kv-pyramid-beta", {"pyramid_beta": 0.0}),
    ("--kv-pyramid-beta", {"pyramid_beta": -2.0}),
    ("--kv-gvote-samples", {"method": "gvote", "gvote_samples": -1}),
    ("--kv-gvote-p", {"method": "gvote", "gvote_p": 0.0}),
    ("--kv-gvote-p", {"method": "gvote", "gvote_p": 1.01}),
    ("--kv-gvote-p", {"method": "gvote", "gvote_p": float("nan")}),
    ("--kv-gvote-seed", {"gvote_seed": -1}),
    ("--kv-gvote-seed", {"gvote_seed": 2**63}),
    ("--kv-max-budget", {"method": "gvote", "max_budget": -1}),
    ("--kv-max-budget", {"method": "gvote", "max_budget": 32, "window": 32}),
    ("--kv-min-compression", {"method": "gvote", "min_compression": 0.99}),
    ("--kv-min-compression", {"method": "gvote", "min_compression": float("inf")}),
])
def test_bad_value_names_its_flag(flag, kwargs):
    _raises_naming(flag, **kwargs)


def test_streamingllm_sink_limit_is_budget_minus_window():
    # sink_tokens == budget - window is the largest allowed value ...
    cfg = KVCompressionConfig(method="streamingllm", budget=64, window=32, sink_tokens=32)
    assert cfg.sink_tokens == cfg.selectable == 32
    # ... and the limit only applies to streamingllm.
    for method in ("none", "snapkv", "adakv", "pyramidkv"):
        assert KVCompressionConfig(method=method, budget=64, window=32, sink_tokens=1000)
    err = _raises_naming("--kv-sink-tokens", method="streamingllm", budget=64, window=32,
                         sink_tokens=33)
    assert "--kv-budget" in str(err) and "--kv-window" in str(err)


@pytest.mark.parametrize("kwargs", [
    {"alpha": 0.0}, {"alpha": 1.0}, {"pool_kernel": 1}, {"pool_kernel": 3},
    {"sink_tokens": 0}, {"pyramid_beta": 1.0}, {"budget": 2, "window": 1},
    {"pooling": "avg"}, {"gqa_reduce": "max"},
    {"gvote_samples": 0}, {"gvote_p": 1.0}, {"gvote_seed": 2**63 - 1},
    {"method": "gvote", "max_budget": 33, "window": 32},
    {"method": "gvote", "min_compression": 1.0}, {"method": "gvote", "min_compression": 1e6},
])
def test_boundary_values_accepted(kwargs):
    cfg = KVCompressionConfig(**kwargs)
    for key, value in kwargs.items():
        assert getattr(cfg, key) == value


def test_error_message_lists_allowed_choices():
    err = _raises_naming("--kv-compression", method="bogus")
    for m in METHODS:
        assert m in str(err)
    assert "'bogus'" in str(err)


def test_flag_of_field_covers_every_field():
    assert set(FLAG_OF_FIELD) == set(KVCompressionConfig().to_dict())
    assert all(flag.startswith("--kv-") for flag in FLAG_OF_FIELD.values())


def test_fields_and_defaults_come_from_the_settings_table():
    fields = dataclasses.fields(KVCompressionConfig)
    assert [f.name for f in fields] == [s.field for s in SETTINGS]
    assert [f.default for f in fields] == [s.default for s in SETTINGS]
    for s in SETTINGS:
        assert type(s.default) is s.type and s.type in (int, float, str)
        assert s.key == s.flag[2:].replace("-", "_")
        assert bool(s.choices) == (s.type is str) and (s.ok is None) == (s.rule == "")
        assert "{default}" in s.help


@pytest.mark.parametrize("kind,value,message", [
    (int, 1.0, "must be an integer, got 1.0"), (int, True, "must be an integer, got True"),
    (float, "1", "must be a number, got '1'"), (float, False, "must be a number, got False"),
    (str, 3, "must be a string, got 3"),
])
def test_one_type_check(kind, value, message):
    with pytest.raises(KVCompressionConfigError, match=f"^x {re.escape(message)}$"):
        check_type(kind, value, lambda m: KVCompressionConfigError(f"x {m}"))


def test_type_check_makes_numbers_floats():
    assert type(check_type(float, 2, ValueError)) is float
    assert check_type(int, 2, ValueError) == 2 and check_type(str, "a", ValueError) == "a"


# ---------------------------------------------------------------- from_dict

def test_from_dict_none_gives_defaults():
    assert KVCompressionConfig.from_dict(None) == KVCompressionConfig()


def test_from_dict_empty_gives_defaults():
    assert KVCompressionConfig.from_dict({}) == KVCompressionConfig()


def test_from_dict_passes_config_through():
    cfg = KVCompressionConfig(method="adakv", budget=128)
    assert KVCompressionConfig.from_dict(cfg) is cfg


def test_from_dict_does_not_mutate_input():
    raw = {"method": "snapkv", "alpha": 1}
    snapshot = copy.deepcopy(raw)
    cfg = KVCompressionConfig.from_dict(raw)
    assert raw == snapshot
    assert cfg.alpha == 1.0 and isinstance(cfg.alpha, float)


@pytest.mark.parametrize("raw", [
    {"methd": "adakv"},
    {"method": "adakv", "budgett": 3},
    {"kv_budget": 100},
    {"enabled": True},
    {"selectable": 10},
])
def test_from_dict_rejects_unknown_keys(raw):
    with pytest.raises(KVCompressionConfigError, match="unknown key") as info:
        KVCompressionConfig.from_dict(raw)
    bad = sorted(set(raw) - set(FLAG_OF_FIELD))
    assert str(bad) in str(info.value)
    assert ADDITIONAL_CONFIG_KEY in str(info.value)


@pytest.mark.parametrize("raw", ["adakv", ["method", "adakv"], 3, 1.5, True, ("a", 1)])
def test_from_dict_rejects_non_dict(raw):
    with pytest.raises(KVCompressionConfigError, match="must be a dict") as info:
        KVCompressionConfig.from_dict(raw)
    assert type(raw).__name__ in str(info.value)


@pytest.mark.parametrize("key,value", [
    ("budget", True),
    ("budget", False),
    ("budget", "256"),
    ("budget", 256.0),
    ("budget", None),
    ("window", True),
    ("window", 32.5),
    ("pool_kernel", True),
    ("pool_kernel", "7"),
    ("sink_tokens", False),
    ("sink_tokens", 4.0),
    ("alpha", True),
    ("alpha", "0.2"),
    ("alpha", None),
    ("pyramid_beta", False),
    ("pyramid_beta", "20"),
    ("method", 1),
    ("method", None),
    ("method", True),
    ("pooling", ["max"]),
    ("gqa_reduce", 0),
    ("gvote_samples", 8.0),
    ("gvote_seed", True),
    ("max_budget", "512"),
    ("gvote_p", "0.9"),
    ("min_compression", None),
])
def test_from_dict_rejects_wrong_types(key, value):
    with pytest.raises(KVCompressionConfigError, match=re.escape(FLAG_OF_FIELD[key])):
        KVCompressionConfig.from_dict({key: value})


@pytest.mark.parametrize("key,value,expected", [
    ("alpha", 1, 1.0), ("alpha", 0, 0.0), ("pyramid_beta", 5, 5.0), ("pyramid_beta", 2.5, 2.5),
    ("gvote_p", 1, 1.0), ("min_compression", 1, 1.0),
])
def test_from_dict_numbers_become_floats(key, value, expected):
    cfg = KVCompressionConfig.from_dict({key: value})
    got = getattr(cfg, key)
    assert got == expected and type(got) is float


def test_from_dict_still_validates_values():
    with pytest.raises(KVCompressionConfigError, match="--kv-pool-kernel"):
        KVCompressionConfig.from_dict({"pool_kernel": 8})
    with pytest.raises(KVCompressionConfigError, match="--kv-budget"):
        KVCompressionConfig.from_dict({"budget": 16, "window": 32})


@pytest.mark.parametrize("additional", [None, {}, {"other_plugin": {"x": 1}}])
def test_from_additional_config_without_section_is_none(additional):
    cfg = KVCompressionConfig.from_additional_config(additional)
    assert cfg.method == "none" and not cfg.enabled
    assert cfg == KVCompressionConfig()


def test_from_additional_config_with_null_section_is_none():
    assert KVCompressionConfig.from_additional_config({ADDITIONAL_CONFIG_KEY: None}) == (
        KVCompressionConfig()
    )


def test_from_additional_config_reads_section():
    cfg = KVCompressionConfig.from_additional_config(
        {"foo": 1, ADDITIONAL_CONFIG_KEY: {"method": "pyramidkv", "budget": 512}}
    )
    assert cfg == KVCompressionConfig(method="pyramidkv", budget=512)


def test_from_additional_config_rejects_bad_section():
    with pytest.raises(KVCompressionConfigError, match="must be a dict"):
        KVCompressionConfig.from_additional_config({ADDITIONAL_CONFIG_KEY: "adakv"})
    with pytest.raises(KVCompressionConfigError, match="--kv-alpha"):
        KVCompressionConfig.from_additional_config({ADDITIONAL_CONFIG_KEY: {"alpha": 2.0}})


# ------------------------------------------------- round trip, hashing, pickling

_SAMPLES = [
    KVCompressionConfig(),
    KVCompressionConfig(method="adakv", budget=256, window=16, alpha=0.5, pooling="avg"),
    KVCompressionConfig(method="pyramidkv", budget=64, window=8, pyramid_beta=4.0,
                        gqa_reduce="max", pool_kernel=1),
    KVCompressionConfig(method="streamingllm", budget=40, window=8, sink_tokens=32),
    KVCompressionConfig(method="snapkv", budget=2, window=1, pool_kernel=15),
    KVCompressionConfig(method="gvote", gvote_samples=4, gvote_p=0.9, gvote_seed=3,
                        max_budget=300, min_compression=2.5),
]


@pytest.mark.parametrize("cfg", _SAMPLES)
def test_round_trip_to_dict_from_dict(cfg):
    raw = cfg.to_dict()
    assert set(raw) == set(FLAG_OF_FIELD)
    back = KVCompressionConfig.from_dict(raw)
    assert back == cfg
    assert back.to_dict() == raw


@pytest.mark.parametrize("cfg", _SAMPLES)
def test_to_dict_is_json_round_trippable(cfg):
    import json

    assert KVCompressionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("cfg", _SAMPLES)
def test_hashable_and_picklable(cfg):
    twin = KVCompressionConfig(**cfg.to_dict())
    assert hash(twin) == hash(cfg)
    assert len({cfg, twin}) == 1
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(cfg, protocol=proto))
        assert back == cfg and hash(back) == hash(cfg)
    assert copy.deepcopy(cfg) == cfg


def test_distinct_configs_differ():
    assert len(set(_SAMPLES)) == len(_SAMPLES)


def test_frozen():
    cfg = KVCompressionConfig()
    with pytest.raises(AttributeError):
        cfg.budget = 3  # type: ignore[misc]


@pytest.mark.parametrize("beta", [float("nan"), float("inf")])
def test_non_finite_pyramid_beta_rejected(beta):
    _raises_naming("--kv-pyramid-beta", method="pyramidkv", pyramid_beta=beta)


def test_gvote_cap_errors_name_both_sides():
    err = _raises_naming("--kv-max-budget", method="gvote", max_budget=16, window=32)
    assert "--kv-window" in str(err) and "0" in str(err)


@pytest.mark.parametrize("raw,flag", [
    ({"method": "adakv", "max_budget": 512}, "--kv-max-budget"),
    ({"method": "snapkv", "min_compression": 2.0}, "--kv-min-compression"),
    ({"min_compression": 2.0}, "--kv-min-compression"),
])
def test_gvote_caps_rejected_for_other_methods_in_user_settings(raw, flag):
    with pytest.raises(KVCompressionConfigError, match=re.escape(flag)) as info:
        KVCompressionConfig.from_dict(raw)
    assert "gvote" in str(info.value) and repr(raw.get("method", "none")) in str(info.value)
    # a per-request switch (dataclasses.replace) of a capped gvote config is allowed:
    # other methods ignore the cap
    import dataclasses

    capped = KVCompressionConfig(method="gvote", max_budget=512, min_compression=2.0)
    assert dataclasses.replace(capped, method=raw.get("method", "none")).max_budget == 512


@pytest.mark.parametrize("method", ["streamingllm", "gvote"])
def test_expected_scorer_applies_to_scored_methods_only(method):
    for scored in ("snapkv", "adakv", "pyramidkv"):
        assert KVCompressionConfig.from_dict({"method": scored, "scorer": "expected"}).scorer \
            == "expected"
    with pytest.raises(KVCompressionConfigError,
                       match=f"--kv-scorer expected applies to the scored methods.*{method}"):
        KVCompressionConfig.from_dict({"method": method, "scorer": "expected"})
    with pytest.raises(KVCompressionConfigError, match="--kv-scorer: invalid choice"):
        KVCompressionConfig(method="adakv", scorer="question")


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "adakv", "decode_budget": 32, "window": 32}, "--kv-decode-budget must be 0"),
    ({"method": "snapkv", "decode_budget": 8, "window": 16}, "--kv-decode-budget must be 0"),
    ({"method": "adakv", "decode_budget": -1}, "--kv-decode-budget must be >= 0"),
    ({"method": "adakv", "decode_budget": 256, "decode_interval": 0},
     "--kv-decode-interval must be >= 1"),
    ({"method": "gvote", "decode_budget": 256}, "not supported with --kv-compression gvote"),
    ({"method": "none", "decode_budget": 256}, "not supported with --kv-compression none"),
])
def test_decode_settings_are_checked(kwargs, message):
    """Values are checked on every config; the method only on a server's settings (a
    request may opt out with ``none``: ``overrides.check_overrides``)."""
    with pytest.raises(KVCompressionConfigError, match=re.escape(message)):
        KVCompressionConfig.from_dict(kwargs)
    if "not supported" in message:
        KVCompressionConfig(**kwargs)
    else:
        with pytest.raises(KVCompressionConfigError, match=re.escape(message)):
            KVCompressionConfig(**kwargs)


@pytest.mark.parametrize("method", ["snapkv", "adakv", "streamingllm"])
def test_decode_settings_accepted(method):
    cfg = KVCompressionConfig(method=method, decode_budget=64, decode_interval=8, window=16,
                              budget=128)
    assert (cfg.decode_budget, cfg.decode_interval) == (64, 8)
    assert KVCompressionConfig(method=method).decode_budget == 0

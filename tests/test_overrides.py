"""Per-request settings from vllm_xargs: parsing, validation, effective config."""

from __future__ import annotations

import pytest

from vllm_adakv.config import KVCompressionConfig
from vllm_adakv.memory import plan_compression
from vllm_adakv.overrides import (
    XARG_KEYS,
    RequestOverrideError,
    check_keys,
    check_overrides,
    overrides_of,
    resolve,
)

SERVER = KVCompressionConfig(method="adakv", budget=128, window=16)


def test_only_compression_keys_are_read():
    assert overrides_of(None) == () and overrides_of({"session_id": "x"}) == ()
    assert overrides_of({"kv_budget": 64, "other": 1, "kv_compression": "snapkv"}) == (
        ("kv_compression", "snapkv"), ("kv_budget", 64))


def test_no_override_is_the_server_config():
    assert resolve(SERVER, (), 1000) is SERVER


@pytest.mark.parametrize("xargs,field,value", [
    ({"kv_budget": 256}, "budget", 256),
    ({"kv_window": 8}, "window", 8),
    ({"kv_compression": "none"}, "method", "none"),
    ({"kv_compression_ratio": 4}, "budget", 250),
    ({"kv_compression_ratio": 1000}, "budget", 17),  # clamped above the window
    ({"kv_gvote_p": 0.5}, "gvote_p", 0.5),
    ({"kv_gvote_p": 1}, "gvote_p", 1.0),
])
def test_override_changes_one_field(xargs, field, value):
    overrides = overrides_of(xargs)
    check_overrides(SERVER, overrides, max_model_len=2048)
    cfg = resolve(SERVER, overrides, 1000)
    assert getattr(cfg, field) == value
    assert {k: v for k, v in cfg.to_dict().items() if k != field} == {
        k: v for k, v in SERVER.to_dict().items() if k != field}


def test_opt_out_plans_nothing():
    cfg = resolve(SERVER, overrides_of({"kv_compression": "none"}), 1000)
    assert plan_compression(SERVER, 1000, 2, 32, 2) is not None
    assert plan_compression(cfg, 1000, 2, 32, 2) is None


@pytest.mark.parametrize("xargs,field", [
    ({"kv_compression": "h2o"}, "kv_compression"),
    ({"kv_compression": 3}, "kv_compression"),
    ({"kv_budget": -1}, "kv_budget"),
    ({"kv_budget": 4096}, "kv_budget"),  # over max_model_len
    ({"kv_budget": "64"}, "kv_budget"),
    ({"kv_budget": True}, "kv_budget"),
    ({"kv_budget": 64.0}, "kv_budget"),
    ({"kv_window": 0}, "kv_window"),
    ({"kv_window": 128}, "kv_window"),
    ({"kv_compression_ratio": 0.9}, "kv_compression_ratio"),
    ({"kv_compression_ratio": float("inf")}, "kv_compression_ratio"),
    ({"kv_compression_ratio": "2"}, "kv_compression_ratio"),
    ({"kv_compression_ratio": 2, "kv_budget": 64}, "kv_compression_ratio"),
    ({"kv_gvote_p": 0}, "kv_gvote_p"),
    ({"kv_gvote_p": 1.5}, "kv_gvote_p"),
    ({"kv_gvote_p": "0.9"}, "kv_gvote_p"),
    ({"kv_gvote_p": True}, "kv_gvote_p"),
    ({"kv_scorer": "question"}, "kv_scorer"),
    ({"kv_scorer": "expected", "kv_compression": "streamingllm"}, "kv_scorer"),
    ({"kv_scorer": "expected", "kv_compression": "gvote"}, "kv_scorer"),
])
def test_bad_values_name_their_key(xargs, field):
    with pytest.raises(RequestOverrideError) as info:
        check_overrides(SERVER, overrides_of(xargs), max_model_len=2048)
    assert info.value.field == field
    assert str(info.value).startswith(f"vllm_xargs.{field}: ")
    assert "--kv-" not in str(info.value)


def test_plain_server_accepts_only_opt_out():
    plain = KVCompressionConfig()
    check_overrides(plain, overrides_of({"kv_compression": "none"}))
    for xargs in ({"kv_compression": "adakv"}, {"kv_budget": 256}):
        with pytest.raises(RequestOverrideError, match="--kv-compression none"):
            check_overrides(plain, overrides_of(xargs))


def test_keys_are_the_per_request_settings_and_the_ratio():
    assert XARG_KEYS == ("kv_compression", "kv_budget", "kv_window", "kv_scorer",
                         "kv_gvote_p", "kv_decode_budget", "kv_compression_ratio")


@pytest.mark.parametrize("extra_args", [
    None, {}, {"kv_budget": 64, "kv_compression_ratio": 2},
    {"session_id": "x", "budget": 3, "KV_BUDGET": 1, 7: "non-string key"},  # not ours
    {"kv_transfer_params": {"do_remote_prefill": True}, "kv_cache_report_mode": "full"},
])
def test_keys_of_others_pass(extra_args):
    check_keys(extra_args)


@pytest.mark.parametrize("extra_args,named", [
    ({"kv_bugdet": 256}, "kv_bugdet"),
    ({"kv_budget": 256, "kv_ratio": 4}, "kv_ratio"),
    ({"kv_window_size": 8, "kv_": 1, "other": 2}, "kv_"),
])
def test_misspelt_kv_key_is_named_with_the_valid_keys(extra_args, named):
    with pytest.raises(RequestOverrideError) as info:
        check_keys(extra_args)
    assert info.value.field == named
    message = str(info.value)
    assert message.startswith(f"vllm_xargs.{named}: ")
    for key in XARG_KEYS:
        assert key in message
    for key in extra_args:
        assert (key in message) == key.startswith("kv_")


def test_scorer_per_request_and_ignored_by_methods_without_one():
    """A request names its scorer; a server's expected scorer does not stop a request from
    switching to a method that selects without one (it ignores the scorer)."""
    assert resolve(SERVER, overrides_of({"kv_scorer": "expected"}), 1000).scorer == "expected"
    server = KVCompressionConfig.from_dict({"method": "adakv", "scorer": "expected"})
    check_overrides(server, overrides_of({"kv_compression": "streamingllm"}))
    check_overrides(server, overrides_of({"kv_compression": "gvote", "kv_scorer": "window"}))


def test_decode_server_refuses_a_larger_window_or_a_method_without_events():
    """With --kv-decode-budget a request keeps the server's window or less (the query ring
    holds that many) and a method with an engine-side re-selection."""
    server = KVCompressionConfig(method="adakv", budget=256, window=32, decode_budget=128)
    check_overrides(server, overrides_of({"kv_window": 16}))
    check_overrides(server, overrides_of({"kv_compression": "none"}))
    with pytest.raises(RequestOverrideError, match="kv_window") as exc:
        check_overrides(server, overrides_of({"kv_window": 64}))
    assert exc.value.field == "kv_window"
    check_overrides(server, overrides_of({"kv_compression": "pyramidkv"}))
    with pytest.raises(RequestOverrideError, match="gvote") as exc:
        check_overrides(server, overrides_of({"kv_compression": "gvote"}))
    assert exc.value.field == "kv_compression"
    # Without decode compression both are fine.
    plain = KVCompressionConfig(method="adakv", budget=256, window=32)
    check_overrides(plain, overrides_of({"kv_window": 64, "kv_compression": "gvote"}))


def test_request_decode_budget_on_a_decode_server_only():
    """``kv_decode_budget``: a request's own decode budget (0: off for it) where the server
    runs with one (its workers keep the queries events need); bad values name the key."""
    server = KVCompressionConfig(method="adakv", budget=256, window=32, decode_budget=128)
    for value in (0, 64, 512):
        check_overrides(server, overrides_of({"kv_decode_budget": value}))
        assert resolve(server, overrides_of({"kv_decode_budget": value}),
                       1000).decode_budget == value
    for value, message in ((32, "greater than kv_window"), (-1, ">= 0"), (1.5, "int")):
        with pytest.raises(RequestOverrideError, match=message) as exc:
            check_overrides(server, overrides_of({"kv_decode_budget": value}))
        assert exc.value.field == "kv_decode_budget"
    plain = KVCompressionConfig(method="adakv", budget=256, window=32)
    with pytest.raises(RequestOverrideError, match="without --kv-decode-budget") as exc:
        check_overrides(plain, overrides_of({"kv_decode_budget": 128}))
    assert exc.value.field == "kv_decode_budget"

"""Fast tests of the tiny test-model factory and the model-preparation helpers.

Nothing here starts vLLM or converts a real model; the whole file runs in a few seconds.
"""

from __future__ import annotations

import json
import time

import pytest

from adakv_devtools import prepare_model as pm
from adakv_devtools.tiny_model import (
    BOS_TOKEN,
    EOS_TOKEN,
    NUM_SPECIAL_TOKENS,
    SPECIAL_TOKENS,
    make_tiny_llama,
    tiny_prompt_token_ids,
)

CPU_HEAD_SIZES = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}
TEXT = "Hello world! The capital of France is Paris. Ünïcödé, 数字 123, tabs\tand\nnewlines."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def test_folder_has_config_and_tokenizer(tiny_dir):
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (tiny_dir / name).is_file(), name
    assert not (tiny_dir / "model.safetensors").exists()
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    assert cfg["num_attention_heads"] > cfg["num_key_value_heads"]  # GQA
    assert cfg["head_dim"] in CPU_HEAD_SIZES
    assert cfg["bos_token_id"] == SPECIAL_TOKENS.index(BOS_TOKEN)
    assert cfg["eos_token_id"] == SPECIAL_TOKENS.index(EOS_TOKEN)


def test_config_loads_with_transformers(tiny_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_dir)
    assert cfg.model_type == "llama"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (2, 128, 4)
    assert (cfg.num_key_value_heads, cfg.head_dim) == (2, 32)


def test_tokenizer_roundtrip_and_vocab(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert len(tok) == cfg["vocab_size"]  # every id the model can emit decodes
    assert tok.bos_token == BOS_TOKEN and tok.eos_token == EOS_TOKEN
    assert tok.bos_token_id == cfg["bos_token_id"] and tok.eos_token_id == cfg["eos_token_id"]
    ids = tok(TEXT).input_ids
    assert ids[0] == tok.bos_token_id
    assert max(ids) < cfg["vocab_size"]
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    assert len(ids) < len(TEXT.encode())  # BPE merges actually compress


def test_chat_template(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi!</s>\n<|assistant|>\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.eos_token_id) == 2


def test_idempotent_and_fast(tmp_path):
    t0 = time.perf_counter()
    d = make_tiny_llama(tmp_path / "m")
    first = time.perf_counter() - t0
    snap = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in d.iterdir()}
    d2 = make_tiny_llama(tmp_path / "m")
    assert d2 == d
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in d.iterdir()} == snap
    assert first < 5.0
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_deterministic_across_folders(tmp_path, tiny_dir):
    d = make_tiny_llama(tmp_path / "other")
    for name in ("tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (d / name).read_bytes() == (tiny_dir / name).read_bytes(), name


@pytest.mark.parametrize("vocab_size", [263, 1024, 2048])
def test_vocab_sizes(tmp_path, vocab_size):
    from tokenizers import Tokenizer

    d = make_tiny_llama(
        tmp_path / "m", vocab_size=vocab_size, head_dim=64, num_heads=8, num_kv_heads=2
    )
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert tok.get_vocab_size() == vocab_size
    assert json.loads((d / "config.json").read_text())["vocab_size"] == vocab_size
    assert tok.decode(tok.encode(TEXT).ids) == TEXT


def test_bad_args(tmp_path):
    with pytest.raises(ValueError):
        make_tiny_llama(tmp_path / "a", num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError):
        make_tiny_llama(tmp_path / "b", vocab_size=100)
    with pytest.raises(ValueError):
        tiny_prompt_token_ids(-1)


def test_prompt_token_ids(tiny_dir):
    from transformers import AutoTokenizer

    a = tiny_prompt_token_ids(3000, seed=7)
    assert a == tiny_prompt_token_ids(3000, seed=7)
    assert a != tiny_prompt_token_ids(3000, seed=8)
    assert tiny_prompt_token_ids(10, seed=7) == a[:10]  # a prefix of the longer prompt
    assert len(a) == 3000 and tiny_prompt_token_ids(0) == []
    assert all(NUM_SPECIAL_TOKENS <= t < NUM_SPECIAL_TOKENS + 256 for t in a)
    # Pinned: the same ids in every process and on every machine.
    assert tiny_prompt_token_ids(5, seed=0) == [134, 176, 71, 27, 108]

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    b = tiny_prompt_token_ids(2000, seed=1, vocab_size=len(tok))
    assert all(NUM_SPECIAL_TOKENS <= t < len(tok) for t in b)
    assert max(b) >= NUM_SPECIAL_TOKENS + 256  # uses merged tokens too
    assert not set(a + b) & set(tok.all_special_ids)


def test_random_weights(tmp_path):
    from safetensors.torch import load_file

    d = make_tiny_llama(tmp_path / "w", random_weights=True, seed=3)
    w = load_file(d / "model.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    assert w["model.embed_tokens.weight"].shape == (cfg["vocab_size"], cfg["hidden_size"])
    assert w["model.layers.1.self_attn.k_proj.weight"].shape == (
        cfg["num_key_value_heads"] * cfg["head_dim"],
        cfg["hidden_size"],
    )
    assert w["lm_head.weight"].shape == (cfg["vocab_size"], cfg["hidden_size"])
    assert len(w) == 2 + 9 * cfg["num_hidden_layers"] + 1
    blob = (d / "model.safetensors").read_bytes()
    assert make_tiny_llama(tmp_path / "w2", random_weights=True, seed=3) is not None
    assert (tmp_path / "w2" / "model.safetensors").read_bytes() == blob
    make_tiny_llama(tmp_path / "w3", random_weights=True, seed=4)
    assert (tmp_path / "w3" / "model.safetensors").read_bytes() != blob
    make_tiny_llama(tmp_path / "w", random_weights=False)  # back to a dummy-load folder
    assert not (d / "model.safetensors").exists()


# --- prepare_model: the parts that need no GGUF conversion ---------------------------


def _fake_complete(folder):
    folder.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (folder / name).write_text("{}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_ADAKV_CACHE", str(tmp_path / "cache"))
    assert pm.default_out_dir() == tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("VLLM_ADAKV_CACHE")
    assert pm.cache_root().name == "vllm-adakv"


def test_is_complete(tmp_path):
    assert not pm.is_complete(tmp_path / "missing")
    d = tmp_path / "m"
    _fake_complete(d)
    assert pm.is_complete(d)
    (d / "tokenizer_config.json").write_text("{}")  # no chat template
    assert not pm.is_complete(d)
    (d / "chat_template.jinja").write_text("{{ x }}")
    assert pm.is_complete(d)
    (d / "model.safetensors").unlink()
    assert not pm.is_complete(d)


def test_main_reuses_complete_folder(tmp_path, capsys):
    d = tmp_path / "m"
    _fake_complete(d)
    assert pm.main(["--out", str(d), "--no-download"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(d.absolute())


def test_main_refuses_foreign_folder(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "precious.txt").write_text("x")
    assert pm.main(["--out", str(d), "--no-download"]) != 0
    assert (d / "precious.txt").read_text() == "x"


def test_find_gguf_no_download(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_ADAKV_CACHE", str(tmp_path))
    monkeypatch.setattr(pm, "_installed_gguf", lambda spec: None)
    spec = pm.MODELS["smollm2"]
    with pytest.raises(pm.PrepareError) as e:
        pm.find_gguf(spec, allow_download=False)
    assert e.value.code == 3
    # A cached copy with the wrong hash is ignored, not used.
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / spec.gguf).write_bytes(b"not a gguf")
    with pytest.raises(pm.PrepareError):
        pm.find_gguf(spec, allow_download=False)


def test_pinned_sha256_format():
    for spec in pm.MODELS.values():
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0

"""Tiny Llama model folder for tests: a config and an offline-built tokenizer, no weights.

vLLM loads the folder with ``load_format="dummy"`` (it makes seeded random weights
itself), so tests can start a real engine in seconds on a CPU without any model hub::

    from adakv_devtools.tiny_model import make_tiny_llama, tiny_prompt_token_ids

    model_dir = make_tiny_llama(tmp_path / "tiny")
    llm = LLM(model=str(model_dir), load_format="dummy", dtype="float32",
              block_size=32, max_model_len=2048, enforce_eager=True)
    llm.generate({"prompt_token_ids": tiny_prompt_token_ids(1000, seed=1)}, params)

The tokenizer is a byte-level BPE trained (deterministically, in a few ms) on a short
built-in text, so any text round-trips. Its vocabulary has exactly ``vocab_size``
entries (padded with ``<|reserved_N|>`` special tokens if the text yields too few
merges), the same as the model config, so every id the model can sample decodes.

Special tokens have the lowest ids (see :data:`SPECIAL_TOKENS`); ids from
:data:`NUM_SPECIAL_TOKENS` up to ``NUM_SPECIAL_TOKENS + 256`` are always the 256
byte tokens, whatever the vocabulary size.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path

__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "NUM_SPECIAL_TOKENS",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "UNK_TOKEN",
    "make_tiny_llama",
    "tiny_prompt_token_ids",
]

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
#: Special tokens, in id order: ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3, then roles.
SPECIAL_TOKENS: tuple[str, ...] = (
    UNK_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
)
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)
_NUM_BYTE_TOKENS = 256

#: Zephyr-like chat template; works with the OpenAI chat endpoint.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A large language model reads a prompt,
stores the keys and values of every attention head in a cache, and then writes one
token at a time. When the prompt is long, the cache grows large and the memory of
the accelerator fills up. Ada-KV, SnapKV, PyramidKV and StreamingLLM keep only the
most important entries of the cache: each head keeps a different number of tokens,
chosen from the attention scores of an observation window at the end of the prompt.
The freed blocks go back to the pool, so the server can run more requests at once.
What is the capital of France? The capital of France is Paris. Hello, how are you
today? I am fine, thank you. Please write a short story about a cat and a mouse who
live in a small house near the river, where the weather is warm in summer and cold
in winter. Numbers, dates and code also appear in text: 2024-05-17, 3.14159, x = y + 1,
def main(): return 0; for i in range(10): print(i). JSON looks like {"key": "value"}.
"""

_WORDS = (
    "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega red green blue "
    "yellow black white orange purple one two three four five six seven eight nine ten "
    "north south east west river mountain forest ocean desert island city village road "
    "bridge market garden school library kitchen window door table chair paper pencil "
    "music river light shadow morning evening night winter spring summer autumn"
).split()


def _training_text() -> list[str]:
    """Deterministic training text: the corpus, numbers, words and seeded pseudo-words."""
    rng = random.Random(1234)
    lines = _CORPUS.splitlines()
    lines += [" ".join(str(i) for i in range(start, start + 20)) for start in range(0, 1000, 20)]
    for _ in range(200):
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(12)))
    # Pseudo-words made of syllables give enough distinct merges for ~4k tokens.
    onsets = "b c d f g h j k l m n p r s t v w z br ch cl dr fr gr pl pr sh st th tr".split()
    vowels = "a e i o u ai ea ie oo ou".split()
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st"]
    lexicon = [
        "".join(
            rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
            for _ in range(rng.randint(1, 3))
        )
        for _ in range(1500)
    ]
    for _ in range(600):
        words = [rng.choice(lexicon) for _ in range(14)]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", ",", "!", "?", ";", ":"]))
    return lines


def _build_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    min_size = NUM_SPECIAL_TOKENS + _NUM_BYTE_TOKENS
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size}, got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=2,
    )
    tok.train_from_iterator(_training_text(), trainer)
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    # Llama-style: prepend <s> to every encoded text (chat template adds it itself and
    # vLLM's chat path encodes with add_special_tokens=False).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, SPECIAL_TOKENS.index(BOS_TOKEN))],
    )
    return tok.to_str(pretty=True)


def _tokenizer_config(max_position_embeddings: int) -> dict:
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }


def _model_config(
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    vocab_size: int,
    max_position_embeddings: int,
    intermediate_size: int,
) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
        "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def _random_weights(config: dict, seed: int) -> bytes:
    """Seeded Llama weights as safetensors bytes (HF parameter names)."""
    import torch
    from safetensors.torch import save

    gen = torch.Generator(device="cpu").manual_seed(seed)
    h, v, f = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    nh, nkv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]

    def randn(rows: int, cols: int, std: float) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen, dtype=torch.float32) * std

    # After RMSNorm the inputs have unit scale. q/k std 2/sqrt(h) makes q and k entries of
    # std ~2, so q.k/sqrt(hd) has std ~4: peaked, content-dependent attention. v/o/MLP keep
    # unit scale; lm_head std 3/sqrt(h) gives logits of std ~3.
    qk_std = 2.0 / h**0.5
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": randn(v, h, 1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = randn(nh * hd, h, qk_std)
        w[p + "self_attn.k_proj.weight"] = randn(nkv * hd, h, qk_std)
        w[p + "self_attn.v_proj.weight"] = randn(nkv * hd, h, 1.0 / h**0.5)
        w[p + "self_attn.o_proj.weight"] = randn(h, nh * hd, 1.0 / (nh * hd) ** 0.5)
        w[p + "mlp.gate_proj.weight"] = randn(f, h, 1.0 / h**0.5)
        w[p + "mlp.up_proj.weight"] = randn(f, h, 1.0 / h**0.5)
        w[p + "mlp.down_proj.weight"] = randn(h, f, 1.0 / f**0.5)
        w[p + "input_layernorm.weight"] = torch.ones(h)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h)
    w["model.norm.weight"] = torch.ones(h)
    w["lm_head.weight"] = randn(v, h, 3.0 / h**0.5)
    return save(w, metadata={"format": "pt"})


def _write_if_changed(path: Path, text: str | bytes) -> None:
    """Atomically write ``text`` to ``path`` unless it already holds exactly that."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    try:
        if path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_tiny_llama(
    out_dir: str | Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    vocab_size: int = 512,
    max_position_embeddings: int = 4096,
    intermediate_size: int | None = None,
    seed: int = 0,
    random_weights: bool = False,
) -> Path:
    """Write a tiny Llama model folder (config + tokenizer, no weights) and return its path.

    Load it with ``load_format="dummy"``. ``head_dim`` must be a size the attention
    backend supports (CPU: 32, 64, 80, 96, 112, 128, ...). ``num_heads`` must be a
    multiple of ``num_kv_heads`` (GQA). ``vocab_size`` is both the model's and the
    tokenizer's vocabulary size (>= 263).

    By default no weights are written and the folder needs ``load_format="dummy"``.
    vLLM's dummy weights are uniform in +-1e-3, so the logits hardly depend on the
    context: greedy output is a short loop that does not change when the KV cache
    does. With ``random_weights=True`` a ``model.safetensors`` (float32, ~1.7 MB at the
    defaults) of seeded Gaussian weights, scaled so that attention is sharp and the
    next token depends on the context, is written too; load it with the default
    ``load_format`` to get outputs that react to KV-cache changes. ``seed`` seeds those
    weights (torch CPU generator: same bytes on every machine).

    Idempotent: files already holding the right content are not rewritten, so calling
    it again (also from several processes) is cheap and safe.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if intermediate_size is None:
        intermediate_size = 2 * hidden_size
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)

    config = _model_config(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        intermediate_size=intermediate_size,
    )
    tokenizer_json = _build_tokenizer_json(vocab_size)
    gen_config = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }
    meta = {
        "generator": "adakv_devtools.tiny_model.make_tiny_llama",
        "seed": seed,
        "load_format": "auto" if random_weights else "dummy",
        "tokenizer_sha256": hashlib.sha256(tokenizer_json.encode()).hexdigest(),
    }

    def dump(obj: dict) -> str:
        return json.dumps(obj, indent=2, sort_keys=True) + "\n"

    _write_if_changed(out / "tokenizer.json", tokenizer_json)
    _write_if_changed(
        out / "tokenizer_config.json", dump(_tokenizer_config(max_position_embeddings))
    )
    _write_if_changed(
        out / "special_tokens_map.json",
        dump(
            {
                "bos_token": BOS_TOKEN,
                "eos_token": EOS_TOKEN,
                "unk_token": UNK_TOKEN,
                "pad_token": PAD_TOKEN,
            }
        ),
    )
    _write_if_changed(out / "generation_config.json", dump(gen_config))
    _write_if_changed(out / "tiny_model.json", dump(meta))
    if random_weights:
        _write_if_changed(out / "model.safetensors", _random_weights(config, seed))
    else:
        (out / "model.safetensors").unlink(missing_ok=True)
    # config.json last: its presence marks a complete folder.
    _write_if_changed(out / "config.json", dump(config))
    return out


def tiny_prompt_token_ids(
    n: int,
    seed: int = 0,
    *,
    vocab_size: int | None = None,
) -> list[int]:
    """Return ``n`` deterministic pseudo-random token ids with no special tokens.

    Ids lie in ``[NUM_SPECIAL_TOKENS, vocab_size)``. With ``vocab_size=None`` they are
    drawn from the 256 byte tokens only (``[NUM_SPECIAL_TOKENS, NUM_SPECIAL_TOKENS+256)``),
    which every tiny tokenizer has whatever its size; pass the folder's vocab size to
    use all regular tokens (reserved padding tokens, if any, may then be included).
    The same ``(n, seed, vocab_size)`` always gives the same list, in any process.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    high = NUM_SPECIAL_TOKENS + _NUM_BYTE_TOKENS if vocab_size is None else vocab_size
    if high <= NUM_SPECIAL_TOKENS:
        raise ValueError(f"vocab_size must be > {NUM_SPECIAL_TOKENS}, got {vocab_size}")
    rng = random.Random(f"tiny-prompt-{seed}")
    return [rng.randrange(NUM_SPECIAL_TOKENS, high) for _ in range(n)]

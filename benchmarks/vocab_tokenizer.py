"""A tokenizer that covers a dummy-weight model's whole vocabulary, for serving benchmarks.

A model folder of ``benchmarks/models`` holds a config only. Dummy weights sample any id
of the model's vocabulary (128,256 for the Llama-3.1-8B shape), so a tokenizer with fewer
ids makes the server's incremental detokenizer meet ids it does not know; with
``tokenizers``' DecodeStream primed with a 6,000-token prompt 500 such steps cost
0.22 s of API-server time per request, 4.2 ms with this tokenizer (dev CPU,
``python -m benchmarks.detokenize_cost``,
benchmarks/results/detokenize-cpu-2026-12-02.json). On an H200 at 2 req/s of
6,000-token prompts the API server held requests while the engine had room, for vanilla
vLLM and the plugin alike (benchmarks/results/serving-h200-2026-12-02-rate2*.json); that
work was part of its load.

This tokenizer has exactly ``vocab_size`` ids: id ``i`` is the word of ``i`` in base 62,
as many digits as the largest id needs (three up to 238,328 ids), after a space (``▁`` in
the vocabulary, SentencePiece style; ids ``bos``/``eos`` are the special ``<s>``/``</s>``),
no special tokens added to a prompt.
Every id decodes to one word and ``encode(decode(ids)) == ids``, so vLLM's random dataset
builds prompts of exactly the asked length and every generated id is detokenized at the
cost of a known one. Every token has the same width with its space: vLLM rejects a text
prompt longer than ``max_input_tokens x`` the longest token (``renderers/params.py``), which
words of varying width with a separate space would exceed. Nothing here imports vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS_TOKEN, EOS_TOKEN = "<s>", "</s>"
SPACE = "\u2581"  # SentencePiece's word-start mark
DIGITS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def width_for(vocab_size: int) -> int:
    """Base-62 digits that spell every id below ``vocab_size``."""
    width = 1
    while len(DIGITS) ** width < vocab_size:
        width += 1
    return width


def word_of(token_id: int, bos_id: int | None, eos_id: int | None, width: int) -> str:
    """The vocabulary entry of ``token_id``."""
    if token_id == bos_id:
        return BOS_TOKEN
    if token_id == eos_id:
        return EOS_TOKEN
    if not 0 <= token_id < len(DIGITS) ** width:
        raise ValueError(f"token id {token_id} outside [0, {len(DIGITS) ** width})")
    digits = []
    for _ in range(width):
        token_id, d = divmod(token_id, len(DIGITS))
        digits.append(DIGITS[d])
    return SPACE + "".join(reversed(digits))


def _first_id(value: int | list[int] | None) -> int | None:
    return value[0] if isinstance(value, list) and value else value  # type: ignore[return-value]


def make_vocab_tokenizer(out: Path, model: Path) -> Path:
    """Write the word-level tokenizer of ``model``'s vocabulary into ``out`` (reused if
    it is there for the same vocabulary) and return ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    config = json.loads((model / "config.json").read_text())
    vocab_size = int(config["vocab_size"])
    bos, eos = _first_id(config.get("bos_token_id")), _first_id(config.get("eos_token_id"))
    stamp = {"vocab_size": vocab_size, "bos_token_id": bos, "eos_token_id": eos,
             "format": 2}
    marker = out / "vocab_tokenizer.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)
    width = width_for(vocab_size)
    vocab = {word_of(i, bos, eos, width): i for i in range(vocab_size)}
    unk = EOS_TOKEN if eos is not None else word_of(0, bos, eos, width)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always")
    specials = [t for t in (BOS_TOKEN, EOS_TOKEN) if t in vocab]
    tok.add_special_tokens(specials)
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": unk,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(config.get("max_position_embeddings", 1 << 20)),
        **({"bos_token": BOS_TOKEN} if BOS_TOKEN in vocab else {}),
        **({"eos_token": EOS_TOKEN} if EOS_TOKEN in vocab else {}),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    marker.write_text(json.dumps(stamp))
    return out

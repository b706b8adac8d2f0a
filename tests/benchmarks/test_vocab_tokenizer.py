"""The word-level tokenizer that covers a dummy-weight model's vocabulary."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from benchmarks.vocab_tokenizer import make_vocab_tokenizer, width_for, word_of

pytest.importorskip("transformers")


def _model(tmp_path: Path, vocab_size: int, bos: int, eos: int | list[int]) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(
        {"vocab_size": vocab_size, "bos_token_id": bos, "eos_token_id": eos,
         "max_position_embeddings": 8192}))
    return model


def test_every_id_round_trips_at_four_characters(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    vocab_size, bos, eos = 128256, 128000, [128001, 128009]
    path = make_vocab_tokenizer(tmp_path / "tok", _model(tmp_path, vocab_size, bos, eos))
    tok = AutoTokenizer.from_pretrained(str(path))
    assert len(tok) == vocab_size and tok.num_special_tokens_to_add() == 0
    assert sorted(tok.all_special_ids) == [bos, eos[0]]
    rng = random.Random()  # fresh ids every run
    ids = [i for i in (rng.randrange(vocab_size) for _ in range(3000))
           if i not in (bos, eos[0])] + [0, vocab_size - 1]
    text = tok.decode(ids)
    assert tok.encode(text, add_special_tokens=False) == ids
    # one word of 3 digits + its space per id: vLLM's text-length bound holds
    assert len(text) == 4 * len(ids) - 1
    assert {len(tok.convert_ids_to_tokens(i)) for i in ids} == {4}


def test_reused_only_for_the_same_vocabulary(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "tok"
    make_vocab_tokenizer(out, _model(tmp_path, 1000, 1, 2))
    (tmp_path / "model" / "config.json").write_text(json.dumps(
        {"vocab_size": 2000, "bos_token_id": 1, "eos_token_id": 2}))
    make_vocab_tokenizer(out, tmp_path / "model")
    assert len(AutoTokenizer.from_pretrained(str(out))) == 2000


def test_width_grows_with_the_vocabulary() -> None:
    assert [width_for(n) for n in (62, 63, 62 ** 3, 62 ** 3 + 1, 262144)] == [1, 2, 3, 4, 4]
    assert word_of(61, None, None, 3) == "\u2581" + "00Z"
    with pytest.raises(ValueError, match="outside"):
        word_of(62 ** 3, None, None, 3)

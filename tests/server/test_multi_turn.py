"""A multi-turn conversation through the compressed server, prefix caching on (vLLM's
default): each turn re-sends the history (previous prompt + its answer + a new user
message), is compressed, and hits the prompt blocks the previous turn released still
hashed; its answer equals the same prompt sent with no cache to hit (a fresh
``cache_salt``: as to a fresh server)."""

from __future__ import annotations

import pytest

from adakv_devtools.tiny_model import tiny_prompt_token_ids
from tests.server.conftest import BLOCK_SIZE, BUDGET, WINDOW

pytestmark = pytest.mark.e2e

TURNS = 4
FIRST = 200  # tokens of the first user message (> BUDGET: every turn is compressed)
NEW = 120  # tokens of each later user message
ANSWER = 16


def _complete(server, prompt: list[int], salt: str | None = None) -> list[int]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": ANSWER, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    if salt is not None:
        body["cache_salt"] = salt
    status, out = server.post("/v1/completions", body)
    assert status == 200, out
    return list(out["choices"][0]["token_ids"])


def test_each_turn_hits_the_previous_turns_blocks(pressure_server):
    server = pressure_server
    prompt = tiny_prompt_token_ids(FIRST, seed=101, vocab_size=512)
    previous = 0  # length of the previous turn's prompt
    for turn in range(TURNS):
        hits = server.metric("vllm:prefix_cache_hits_total", missing_ok=True)
        released = server.metric("vllm_adakv:blocks_released_total", missing_ok=True)
        answer = _complete(server, prompt)
        hit = server.metric("vllm:prefix_cache_hits_total", missing_ok=True) - hits
        assert server.metric("vllm_adakv:blocks_released_total") > released  # compressed
        if turn == 0:
            assert hit == 0
        else:
            # Every full block of the previous prompt, within the hit cap of this one.
            cap = (len(prompt) - WINDOW) // BLOCK_SIZE * BLOCK_SIZE
            assert hit == min(previous // BLOCK_SIZE * BLOCK_SIZE, cap), (turn, hit)
        alone = _complete(server, prompt, salt=f"alone-{turn}")
        assert answer == alone, turn
        assert len(prompt) > BUDGET
        previous = len(prompt)
        prompt = prompt + answer + tiny_prompt_token_ids(NEW, seed=200 + turn, vocab_size=512)

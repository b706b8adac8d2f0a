"""vLLM with compression vs an independent HF-transformers run with an attention mask.

StreamingLLM keeps the same positions in every head (sinks + the last B - s prompt
tokens), so its effect can be written as one attention mask: prompt tokens attend
causally (the prefill is dense), generated tokens see only the kept prompt tokens
and the generated ones. If compaction or the head-wise decode read a wrong page,
the greedy tokens of vLLM would drift from this reference.
"""

from __future__ import annotations

import pytest
import torch

from adakv_devtools.tiny_model import tiny_prompt_token_ids
from tests.e2e.conftest import run_scenario

pytestmark = pytest.mark.e2e
transformers = pytest.importorskip("transformers")


def masked_greedy(model_dir, prompt: list[int], keep: torch.Tensor, steps: int) -> list[int]:
    """Greedy tokens of an HF model whose generated tokens see only the prompt tokens of
    ``keep`` (``[L]``), or, given ``[L + steps, L + steps]``, the full attention mask."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    ids = list(prompt)
    length = len(prompt)
    out: list[int] = []
    for _ in range(steps):
        n = len(ids)
        if keep.dim() == 2:
            allowed = keep[:n, :n]
        else:
            allowed = torch.ones(n, n, dtype=torch.bool).tril()
            allowed[length:, :length] &= keep[None, :]
        mask = torch.zeros(1, 1, n, n)
        mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
        with torch.no_grad():
            logits = model(torch.tensor([ids]), attention_mask=mask).logits
        nxt = int(logits[0, -1].argmax())
        ids.append(nxt)
        out.append(nxt)
    return out


@pytest.mark.parametrize("length,budget,sinks", [(300, 64, 4), (517, 96, 8)])
def test_streamingllm_equals_masked_reference(small_model, length, budget, sinks):
    steps = 12
    window = 16
    cfg = {"method": "streamingllm", "budget": budget, "window": window, "sink_tokens": sinks}
    res = run_scenario({"model_dir": str(small_model), "compression": cfg,
                        "requests": [{"len": length, "seed": 7, "max_tokens": steps}]})
    assert res["released_blocks"] > 0
    keep = torch.zeros(length, dtype=torch.bool)
    keep[:sinks] = True
    keep[length - (budget - sinks):] = True
    prompt = tiny_prompt_token_ids(length, seed=7, vocab_size=512)
    want = masked_greedy(str(small_model), prompt, keep, steps)
    assert res["outputs"]["0"] == want
    dense = masked_greedy(str(small_model), prompt, torch.ones(length, dtype=torch.bool), steps)
    assert dense != want, "reference insensitive to compression: test cannot fail"

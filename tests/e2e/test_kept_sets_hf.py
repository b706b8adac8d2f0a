"""Kept sets inside vLLM vs an independent HF-transformers reference of SnapKV / Ada-KV.

The reference is written from ``shared/design/ALGORITHMS.md`` in plain torch (nothing
from ``vllm_adakv.methods`` or ``vllm_adakv.kernels``): SmolLM2 runs in transformers,
fp32, eager attention with ``output_attentions``; the last ``w`` rows of each layer's
attention are the window's softmax, summed over the window, averaged over each GQA
group, max-pooled (kernel 7), then selected. vLLM runs the same token ids with
``VLLM_ADAKV_RECORD_KEPT`` set, which saves each layer's keep mask ``[H, L]``.

Equality is asserted up to ties: a position may differ only if its reference score is
within ``TOL`` of the score at the head's selection boundary (fp32 arithmetic differs
between the two runs). Ada-KV's per-head counts come from rounding a quota; the layer
total must match exactly and each head within one token of the reference's
largest-remainder rounding (ALGORITHMS.md leaves the rounding fix open).

Then the tokens vLLM generates from its compressed cache must equal an HF greedy decode in
which every decode query of layer ``l``, KV head ``h`` sees only the prompt positions of
vLLM's recorded mask ``[l][h]`` (plus the generated tokens): the compacted pages and the
head-wise decode kernel read exactly the kept tokens, on a real model.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.e2e.real_model import smollm2_dir

pytestmark = pytest.mark.e2e
transformers = pytest.importorskip("transformers")

WINDOW, BUDGET, KERNEL, ALPHA = 32, 160, 7, 0.2
TOL = 1e-3  # scores are sums of 32 softmax rows: values in [0, 32]
STEPS = 8
BLOCK = 32


def reference_scores(model_dir: Path, ids: list[int]) -> list[torch.Tensor]:
    """Pooled SnapKV scores ``[H, L - w]`` per layer, from HF attention probabilities."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    cfg = model.config
    heads, group = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    length = len(ids)
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True)
    scores = []
    for attn in out.attentions:  # [1, Hq, L, L], causal softmax rows
        s = attn[0, :, length - WINDOW:, : length - WINDOW].sum(1)  # [Hq, L - w]
        s = s.view(heads, group, -1).mean(1)
        s = F.max_pool1d(s[:, None], KERNEL, stride=1, padding=KERNEL // 2)[:, 0]
        scores.append(s)
    return scores


def adakv_caps(s: torch.Tensor, selectable: int, alpha: float) -> list[int]:
    """Ada-KV counts: hits of the layer-wide top-(H*B'), mixed with B' by alpha,
    rounded by largest remainder to sum to H*B'."""
    heads, cand = s.shape
    total = heads * selectable
    top = torch.topk(s.reshape(-1), total).indices
    hits = torch.bincount(top // cand, minlength=heads).double()
    quota = alpha * selectable + (1 - alpha) * hits
    caps = quota.floor().long()
    order = sorted(range(heads), key=lambda h: -(quota[h] - caps[h]).item())
    for h in order[: total - int(caps.sum())]:
        caps[h] += 1
    return caps.tolist()


def check_layer(s: torch.Tensor, kept: torch.Tensor, caps: list[int], layer: int,
                tol: float = TOL) -> int:
    """Assert one layer's vLLM mask equals the reference top-k sets up to ties (scores
    within ``tol`` of the boundary); return how many positions were tie-broken
    differently."""
    heads, cand = s.shape
    assert kept.shape == (heads, cand + WINDOW), kept.shape
    assert kept[:, cand:].all(), f"layer {layer}: window not kept"
    diffs = 0
    for h in range(heads):
        got = kept[h, :cand]
        n = int(got.sum())
        assert abs(n - caps[h]) <= 1, f"layer {layer} head {h}: {n} kept, reference {caps[h]}"
        order = torch.argsort(s[h], descending=True, stable=True)
        want = torch.zeros(cand, dtype=torch.bool)
        want[order[:n]] = True
        boundary = s[h, order[n - 1]] if n else s[h].max()
        bad = (got != want) & ((s[h] - boundary).abs() > tol)
        assert not bad.any(), (
            f"layer {layer} head {h}: positions {bad.nonzero().flatten().tolist()[:10]} "
            f"differ beyond ties (boundary {float(boundary):.6f}, "
            f"scores {s[h][bad][:10].tolist()})")
        diffs += int((got != want).sum())
    return diffs


def _kept_attention(keep: list[torch.Tensor], prompt_len: int):
    """An eager attention where decode queries see only kept prompt keys (per KV head)."""

    def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        group = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        s = (query @ k.transpose(-1, -2)) * scaling
        q_len, k_len = query.shape[2], k.shape[2]
        q_pos = torch.arange(k_len - q_len, k_len)[:, None]
        allowed = torch.arange(k_len)[None, :] <= q_pos  # causal, [q, k]
        allowed = allowed[None].repeat(query.shape[1], 1, 1)  # [Hq, q, k]
        if q_len == 1:  # decode: only the kept prompt keys of this layer and KV head
            kept = keep[module.layer_idx].repeat_interleave(group, 0)  # [Hq, L]
            allowed[:, :, :prompt_len] &= kept[:, None, :]
        s = s.masked_fill(~allowed[None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        return (p @ v).transpose(1, 2).contiguous(), p

    return attn


def masked_greedy(model_dir: Path, ids: list[int], keep: list[torch.Tensor],
                  steps: int) -> list[int]:
    transformers.AttentionInterface.register("adakv_kept", _kept_attention(keep, len(ids)))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="adakv_kept")
    model.eval()
    out: list[int] = []
    with torch.no_grad():
        res = model(torch.tensor([ids]), use_cache=True)
        for _ in range(steps):
            out.append(int(res.logits[0, -1].argmax()))
            res = model(torch.tensor([[out[-1]]]), past_key_values=res.past_key_values,
                        use_cache=True)
    return out


def vllm_masks(model_dir: Path, ids: list[int], method: str, folder: Path,
               engine: dict | None = None, **settings) -> tuple[list[torch.Tensor], list[int]]:
    from benchmarks.quality.engine import run_in_subprocess

    comp = {"method": method, "budget": BUDGET, "window": WINDOW, "pool_kernel": KERNEL,
            "alpha": ALPHA, "pooling": "max", "gqa_reduce": "mean", **settings}
    job = {"model": str(model_dir), "max_model_len": 2048, "compression": comp,
           "requests": [{"id": "r", "prompt": ids, "max_tokens": STEPS}],
           "engine": {"block_size": BLOCK, **(engine or {})}}
    res = run_in_subprocess(job, folder / "work",
                            env={"VLLM_ADAKV_RECORD_KEPT": str(folder)}, timeout=600)
    files = sorted(folder.glob("*.L*.pt"))
    assert files, "vLLM recorded no keep mask: was the prompt compressed?"
    return [torch.load(f) for f in files], res["outputs"]["r"]


def test_kept_sets_match_hf_reference(tmp_path):
    from transformers import AutoTokenizer

    from benchmarks.quality.tasks import make_sample

    model_dir = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    sample = make_sample(tok, "niah_multikey", 640, 0)
    ids = sample.prefix_ids + sample.question_ids
    t0 = time.perf_counter()
    scores = reference_scores(model_dir, ids)
    selectable = BUDGET - WINDOW
    for method in ("snapkv", "adakv"):
        masks, generated = vllm_masks(model_dir, ids, method, tmp_path / method)
        assert len(masks) == len(scores)
        ties = 0
        for layer, (s, kept) in enumerate(zip(scores, masks, strict=True)):
            if method == "snapkv":
                caps = [selectable] * s.shape[0]
            else:
                caps = adakv_caps(s, selectable, ALPHA)
                assert int(kept[:, : s.shape[1]].sum()) == s.shape[0] * selectable
            ties += check_layer(s, kept, caps, layer)
        counts = torch.stack([m[:, : -WINDOW].sum(1) for m in masks])
        if method == "adakv":  # the adaptive split is actually uneven somewhere
            assert (counts != selectable).any()
            assert masked_greedy(model_dir, ids, masks, STEPS) == generated
            dense = masked_greedy(model_dir, ids, [torch.ones_like(m) for m in masks], STEPS)
            assert dense != generated, "compression changed nothing: the check cannot fail"
        print(f"{method}: {len(masks)} layers, {ties} tie-broken positions")
    print(f"runtime {time.perf_counter() - t0:.1f}s")


@pytest.mark.parametrize("method,settings", [
    ("pyramidkv", {}),
    ("gvote", {"max_budget": 320, "gvote_p": 0.9}),
])
def test_pooled_pages_serve_exactly_the_kept_tokens(tmp_path, method, settings):
    """Per-layer budgets (PyramidKV) and GVote's data-dependent counts pool head-pages
    across layers (compacted at the last layer, layers' pages in other layers' tensors):
    the generated tokens must equal HF greedy decoding over exactly the recorded masks."""
    from transformers import AutoTokenizer

    from benchmarks.quality.tasks import make_sample
    from vllm_adakv.config import KVCompressionConfig
    from vllm_adakv.memory import plan_compression

    model_dir = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    sample = make_sample(tok, "niah_single", 640, 1)
    ids = sample.prefix_ids + sample.question_ids
    masks, generated = vllm_masks(model_dir, ids, method, tmp_path / method, **settings)
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    plan = plan_compression(
        KVCompressionConfig(method=method, budget=BUDGET, window=WINDOW, **settings),
        len(ids), cfg.num_key_value_heads, BLOCK, cfg.num_hidden_layers)
    assert plan is not None and plan.pooled
    pages = [int(((m.sum(1) + BLOCK - 1) // BLOCK).sum()) for m in masks]
    assert max(pages) > plan.kept_blocks * cfg.num_key_value_heads or plan.measured, \
        "no layer outgrew its own tensor: pooling not exercised"
    assert masked_greedy(model_dir, ids, masks, STEPS) == generated
    dense = masked_greedy(model_dir, ids, [torch.ones_like(m) for m in masks], STEPS)
    assert dense != generated, "compression changed nothing: the check cannot fail"


FUTURE, SKIPPED = 512, 4  # methods.scorers: FUTURE_POSITIONS, FIRST_POSITIONS_SKIPPED


def expected_reference_scores(model_dir: Path, ids: list[int]) -> list[torch.Tensor]:
    """Pooled scores ``[H, L - w]`` per layer of the expected scorer, from HF: the mean and
    covariance of the prompt's queries before RoPE (``q_proj`` outputs at positions >= 4)
    moved by the average of HF's RoPE over the 512 positions after the prompt (``A``:
    ``A mu``, ``A S A^T``), logits ``s mu.k + s^2 k^T S k / 2`` over the prompt's keys
    (``k_proj`` outputs rotated at their positions); softmax over the prompt, averaged
    over each GQA group, max-pooled."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    cfg = model.config
    hq, heads = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = cfg.hidden_size // hq
    length = len(ids)
    captured: dict[str, list[torch.Tensor]] = {"q": [], "k": []}
    hooks = []
    for layer in model.model.layers:
        for name in ("q", "k"):
            proj = getattr(layer.self_attn, f"{name}_proj")
            hooks.append(proj.register_forward_hook(
                lambda mod, args, out, n=name: captured[n].append(out[0].detach())))
    with torch.no_grad():
        model(torch.tensor([ids]))
        x = torch.zeros(1, dtype=torch.float32)
        cos_p, sin_p = model.model.rotary_emb(x, torch.arange(length)[None])
        cos_f, sin_f = model.model.rotary_emb(x, torch.arange(length, length + FUTURE)[None])
    for hook in hooks:
        hook.remove()
    scores = []
    for q, k in zip(captured["q"], captured["k"], strict=True):
        pre = q.view(length, hq, dim)[SKIPPED:].double()  # before RoPE
        mean = pre.mean(0)  # [Hq, D]
        cov = torch.einsum("nhd,nhe->hde", pre - mean, pre - mean) / len(pre)
        # Row j: the mean over t of R_t e_j, HF's RoPE of a basis vector (so rows of A^T).
        basis = torch.eye(dim)[None, :, None].expand(1, dim, FUTURE, dim)
        avg_t = apply_rotary_pos_emb(basis, basis, cos_f, sin_f)[0][0].mean(1).double()
        mu = mean @ avg_t  # A mu
        sigma = avg_t.T @ cov @ avg_t  # A S A^T
        keys = k.view(length, heads, dim).transpose(0, 1)[None]  # [1, H, L, D]
        keys = apply_rotary_pos_emb(keys, keys, cos_p, sin_p)[0][0].double()  # [H, L, D]
        group, scale = hq // heads, dim**-0.5
        logits = torch.einsum("hgd,hld->hgl", mu.view(heads, group, dim), keys) * scale
        logits += torch.einsum("hld,hgde,hle->hgl", keys, sigma.view(heads, group, dim, dim),
                               keys) * (scale**2 / 2)
        s = torch.softmax(logits, -1).mean(1)[:, : length - WINDOW].float()
        scores.append(F.max_pool1d(s[:, None], KERNEL, stride=1, padding=KERNEL // 2)[:, 0])
    return scores


def test_expected_scorer_kept_sets_match_hf_reference(tmp_path):
    """``--kv-scorer expected`` inside vLLM (queries rotated back from vLLM's RoPE table,
    summed over prefill chunks) selects what an HF computation from the model's own
    pre-RoPE projections selects, for SnapKV and Ada-KV, and differs from the window
    scorer's selection. The prompt is prefilled in chunks (max_num_batched_tokens 256)."""
    from transformers import AutoTokenizer

    from benchmarks.quality.tasks import make_sample

    model_dir = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    sample = make_sample(tok, "niah_single", 640, 2)
    ids = sample.prefix_ids  # the context alone: the question comes later
    scores = expected_reference_scores(model_dir, ids)
    selectable = BUDGET - WINDOW
    window_masks, _ = vllm_masks(model_dir, ids, "adakv", tmp_path / "window")
    for method in ("snapkv", "adakv"):
        masks, _ = vllm_masks(model_dir, ids, method, tmp_path / method, scorer="expected",
                              engine={"max_num_batched_tokens": 256})
        assert len(masks) == len(scores)
        ties = 0
        for layer, (s, kept) in enumerate(zip(scores, masks, strict=True)):
            caps = [selectable] * s.shape[0] if method == "snapkv" else \
                adakv_caps(s, selectable, ALPHA)
            # single softmax rows (values ~1/L): ties are within 1e-6
            ties += check_layer(s, kept, caps, layer, tol=1e-6)
        if method == "adakv":
            assert any(not torch.equal(a, b) for a, b in zip(masks, window_masks, strict=True))
        print(f"expected scorer, {method}: {len(masks)} layers, {ties} tie-broken positions")

"""Heads ablated while the model generates (probes.patching.ablated_generate, the ablate stage):
a planted head changes what a tiny model writes, ablating it shows that, and a sweep of single-head
ablations ranks it first; on the quick run, ablation.parquet holds every score, k and head set."""

import numpy as np
import pandas as pd
import pytest
import torch

from probes.capture import pad_batch
from probes.models import load_hf_model, load_tokenizer
from probes.patching import ablated_generate, head_output_means

PLANTED = (1, 2)  # layer, head


def _changed(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of generated positions (over the longer of each pair) where two generations differ."""
    diffs = [sum(x != y for x, y in zip(p, q)) + abs(len(p) - len(q)) for p, q in zip(a, b)]
    return sum(diffs) / sum(max(len(p), len(q), 1) for p, q in zip(a, b))


@pytest.fixture(scope="module")
def planted(family_models):
    folder = family_models("llama")
    hf = load_hf_model(folder, attn_implementation="sdpa")
    tok = load_tokenizer(folder)
    n_heads = hf.config.num_attention_heads
    d_head = hf.config.hidden_size // n_heads
    with torch.no_grad():
        for layer, block in enumerate(hf.model.layers):
            w = block.self_attn.o_proj.weight  # [d_model, heads * d_head]
            for h in range(n_heads):
                w[:, h * d_head : (h + 1) * d_head] *= 40.0 if (layer, h) == PLANTED else 0.02
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, tok.vocab_size - 1, size=int(n)).tolist() for n in (9, 14, 11, 17)]
    ids, mask, _, _ = pad_batch(prompts, tok.pad_token_id, "left")
    means = head_output_means(hf, prompts, [range(len(p)) for p in prompts], tok.pad_token_id)
    return hf, tok, ids, mask, means, n_heads


def _generate(planted, heads):
    hf, tok, ids, mask, means, n_heads = planted
    masks = {}
    for layer, head in heads:
        masks.setdefault(layer, torch.zeros(n_heads, dtype=torch.bool))[head] = True
    return ablated_generate(hf, ids, mask, means, masks, 12, tok.pad_token_id, [tok.eos_token_id])


def test_the_planted_head_ablated_changes_what_is_generated_and_ranks_first(planted):
    hf, _, _, _, means, n_heads = planted
    clean = _generate(planted, [])
    assert clean == _generate(planted, [])  # greedy and deterministic
    effect = {(l, h): _changed(clean, _generate(planted, [(l, h)])) for l in range(len(means)) for h in range(n_heads)}
    assert effect[PLANTED] > 0.3
    assert max(effect, key=effect.get) == PLANTED
    # the planted head's layer-mates write almost nothing: ablating them changes nothing (heads of
    # the layer below change the planted head's input, and so what it writes)
    assert all(effect[(PLANTED[0], h)] < 0.05 for h in range(n_heads) if h != PLANTED[1])


def test_mean_ablation_writes_the_mean_at_every_position(planted):
    """The hook replaces exactly the chosen head's slice, at prompt and generated positions alike."""
    hf, tok, ids, mask, means, n_heads = planted
    seen = []
    proj = hf.model.layers[PLANTED[0]].self_attn.o_proj
    handle = proj.register_forward_hook(lambda m, a, o: seen.append(a[0].detach().clone()))  # its input after the ablation
    try:
        _generate(planted, [PLANTED])
    finally:
        handle.remove()
    d_head = means[PLANTED[0]].shape[1]
    cols = slice(PLANTED[1] * d_head, (PLANTED[1] + 1) * d_head)
    assert len(seen) > 2  # the prompt, then each decoding step
    for x in seen:
        torch.testing.assert_close(x[..., cols], means[PLANTED[0]][PLANTED[1]].expand_as(x[..., cols]))
        assert not torch.allclose(x[..., : cols.start], means[PLANTED[0]][: PLANTED[1]].reshape(-1).expand_as(x[..., : cols.start]))


def test_the_quick_run_writes_ablation_for_every_score_k_and_head_set(quick_run):
    frame = pd.read_parquet(quick_run / "ablation.parquet")
    assert set(frame.columns) >= {"score", "k", "head_set", "metric", "value", "ci_low", "ci_high"}
    assert set(frame["score"]) == {"coarse", "refine"}
    assert set(frame["head_set"]) == {"ranked", "random", "lowest"}
    assert set(frame["metric"]) == {"shortlist_recall", "near_miss_kept", "answer_micro_f1", "boundary_share"}
    cells = frame.groupby(["score", "k", "head_set"]).size()
    assert (cells == 4).all() and len(cells) == 2 * len(set(frame["k"])) * 3
    ok = frame.dropna(subset=["value"])
    assert (ok["ci_low"] <= ok["value"] + 1e-9).all() and (ok["value"] <= ok["ci_high"] + 1e-9).all()

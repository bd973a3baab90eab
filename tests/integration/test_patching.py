"""The patching instrument recovers a planted causal head, and its invariants hold."""

import contextlib

import numpy as np
import pytest
import torch

from probes.fused import fused_attention
from probes.models import load_model
from probes.patching import (
    PatchInputs,
    TokenReadout,
    attribution_patching,
    control_head_sets,
    head_activations,
    head_masks,
    head_set_effects,
    head_sweep,
    ks_for_heads,
    normalised_effect,
    patch_hooks,
)

PLANTED = (1, 2)  # layer 1, head 2 carries the answer


def _planted_model(folder, tokenizer, marker: int, target: int, seed: int = 0):
    """A tiny Qwen3 whose head L1H2 attends to a marker token and writes the target's unembedding.

    Residual dimension 0 is a marker channel (only the marker's embedding has it), dimension 1 a
    constant channel. The planted head's query reads the constant channel, its key the marker
    channel, both in the slowest-rotating RoPE pair, with large q/k norm weights: it attends to the
    marker from every later position. Its value reads the marker channel and its output writes the
    target's unembedding column. Every other weight is small and random.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    d_model, n_heads, head_dim = 64, 4, 16
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=64, num_hidden_layers=2, num_attention_heads=n_heads,
        num_key_value_heads=n_heads, head_dim=head_dim, max_position_embeddings=256, tie_word_embeddings=False, rope_theta=1e6,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
        emb = model.model.embed_tokens.weight
        emb.normal_(0, 1.0)
        emb[:, 0] = 0.0
        emb[marker, 0] = 12.0
        emb[:, 1] = 6.0
        layer, head = PLANTED
        attn = model.model.layers[layer].self_attn
        rows = slice(head * head_dim, (head + 1) * head_dim)
        slow = head_dim // 2 - 1  # rotate_half pairs (i, i + d/2): i = d/2 - 1 turns slowest
        attn.q_proj.weight[rows] = 0.0
        attn.q_proj.weight[head * head_dim + slow, 1] = 1.0
        attn.k_proj.weight[rows] = 0.0
        attn.k_proj.weight[head * head_dim + slow, 0] = 1.0
        attn.k_proj.weight[head * head_dim + slow + head_dim // 2, 1] = 0.05
        attn.q_norm.weight[:] = 1.0
        attn.k_norm.weight[:] = 1.0
        attn.q_norm.weight[slow] = 6.0
        attn.k_norm.weight[slow] = 6.0
        attn.v_proj.weight[rows] = 0.0
        attn.v_proj.weight[head * head_dim, 0] = 1.0
        attn.o_proj.weight[:, rows] = 0.0
        unembed = model.lm_head.weight[target]
        attn.o_proj.weight[:, head * head_dim] = 3.0 * unembed / unembed.norm()
        model.lm_head.weight[target] *= 4.0
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_tokenizer):
    rng = np.random.default_rng(0)
    vocab = len(tiny_tokenizer)
    marker, target = 101, 202
    folder = _planted_model(tmp_path_factory.mktemp("planted") / "model", tiny_tokenizer, marker, target)
    bridge = load_model(folder)
    clean, corrupt, readout_items = [], [], []
    for length in (18, 23, 27, 21, 30):  # different lengths: left padding in the batch
        seq = rng.integers(300, vocab - 50, size=length).tolist()
        where = int(rng.integers(2, 8))
        seq[where] = marker
        bad = list(seq)
        bad[where] = int(rng.integers(300, vocab - 50))
        clean.append(seq)
        corrupt.append(bad)
        readout_items.append([((length - 1,), (target,), ())])
    inputs = PatchInputs.from_sequences(clean, corrupt, tiny_tokenizer.pad_token_id)
    readout = TokenReadout("target_logprob", readout_items)
    return bridge, inputs, readout, [seq.index(marker) for seq in clean]


def _ranking(effects: dict, mode: str) -> list[tuple[int, int]]:
    return sorted(effects, key=lambda h: -effects[h][mode])


def test_the_readout_moves(planted):
    bridge, inputs, readout, _ = planted
    runs, _ = head_set_effects(bridge, inputs, [readout], [])
    gap = runs.clean["target_logprob"] - runs.corrupt["target_logprob"]
    assert (gap > 2.0).all(), gap  # several nats: the planted head decides the read-out


def test_sweep_and_attribution_rank_the_planted_head_first(planted):
    bridge, inputs, readout, _ = planted
    runs, sweep = head_sweep(bridge, inputs, [readout])
    clean, corrupt = runs.clean["target_logprob"], runs.corrupt["target_logprob"]
    effects = {}
    for (layer, head, mode), values in sweep.items():
        effects.setdefault((layer, head), {})[mode] = float(np.mean(normalised_effect(mode, clean, corrupt, values["target_logprob"])))
    for mode in ("denoise", "noise"):
        ranking = _ranking(effects, mode)
        assert ranking[0] == PLANTED, (mode, ranking[:3])
        assert effects[PLANTED][mode] > 0.8
        assert max(abs(effects[h][mode]) for h in ranking[1:]) < 0.2
    estimates = attribution_patching(bridge, inputs, [readout])
    for mode in ("denoise", "noise"):
        per_head = estimates[(mode, "target_logprob")].mean(0)  # [layer, head]
        sign = 1 if mode == "denoise" else -1  # noise estimates the (negative) change in the clean run
        flat = (sign * per_head).flatten()
        assert int(flat.argmax()) == PLANTED[0] * bridge.cfg.n_heads + PLANTED[1], (mode, per_head)


def test_patching_every_head_everywhere_recovers_the_whole_gap(planted, tiny_models, tiny_tokenizer):
    bridge, inputs, readout, _ = planted
    heads = [(l, h) for l in range(bridge.cfg.n_layers) for h in range(bridge.cfg.n_heads)]
    runs, (per_mode,) = head_set_effects(bridge, inputs, [readout], [heads])
    clean, corrupt = runs.clean["target_logprob"], runs.corrupt["target_logprob"]
    np.testing.assert_allclose(normalised_effect("denoise", clean, corrupt, per_mode["denoise"]["target_logprob"]), 1.0, atol=1e-4)
    np.testing.assert_allclose(normalised_effect("noise", clean, corrupt, per_mode["noise"]["target_logprob"]), 1.0, atol=1e-4)
    # and on a random model, read at every position after the corruption
    random_bridge = load_model(tiny_models["qwen3"])
    rng = np.random.default_rng(1)
    seqs = [rng.integers(5, len(tiny_tokenizer), size=n).tolist() for n in (15, 19)]
    bad = [list(s) for s in seqs]
    for s in bad:
        s[3] = (s[3] + 11) % len(tiny_tokenizer)
    items = [[((p,), (s[p + 1],), ()) for p in range(4, len(s) - 1)] for s in seqs]
    inputs2 = PatchInputs.from_sequences(seqs, bad, tiny_tokenizer.pad_token_id)
    every = [(l, h) for l in range(random_bridge.cfg.n_layers) for h in range(random_bridge.cfg.n_heads)]
    runs, (per_mode,) = head_set_effects(random_bridge, inputs2, [TokenReadout("next", items)], [every])
    np.testing.assert_allclose(per_mode["denoise"]["next"], runs.clean["next"], atol=1e-4)
    np.testing.assert_allclose(per_mode["noise"]["next"], runs.corrupt["next"], atol=1e-4)


def _window_after_markers(inputs, markers, gap=3):
    """Per trace, a window of positions strictly after the corrupted token that stops ``gap``
    positions before the end: patches go inside it, and read-outs sit both inside and after it."""
    return [list(range(m + 1, int(n) - gap)) for m, n in zip(markers, inputs.lengths)]


def test_pattern_patching_acts_only_at_the_patched_query_rows(planted):
    """Patterns move where a head looks, not what it reads: the planted head's clean pattern in
    the corrupted run attends to a token that carries no marker (no recovery), while its corrupted
    pattern in the clean run looks away from the marker (full damage), at the query rows patched
    and nowhere else. The read-outs sit inside the patched window and after it (between the
    corruption and the end), so a patch that ignored its positions would damage both."""
    bridge, inputs, _, markers = planted
    window = _window_after_markers(inputs, markers)
    after = [list(range(w[-1] + 1, int(n) - 1)) for w, n in zip(window, inputs.lengths)]
    target = 202
    readouts = [TokenReadout("inside", [[((p,), (target,), ()) for p in w] for w in window]), TokenReadout("after", [[((p,), (target,), ()) for p in a] for a in after])]
    assert all(len(a) >= 2 for a in after)
    runs, sweep = head_sweep(bridge, inputs, readouts, positions=inputs.position_mask(window), what="pattern")
    for name in ("inside", "after"):  # both read-outs move several nats with the marker: each could show a patch
        assert (runs.clean[name] - runs.corrupt[name] > 2.0).all(), name

    def effect(name, mode, head):
        return float(np.mean(normalised_effect(mode, runs.clean[name], runs.corrupt[name], sweep[(*head, mode)][name])))

    damage = {(l, h): effect("inside", "noise", (l, h)) for (l, h, mode) in sweep if mode == "noise"}
    assert max(damage, key=damage.get) == PLANTED and damage[PLANTED] > 0.8
    assert abs(effect("inside", "denoise", PLANTED)) < 0.2
    # the rows after the window were not patched: the planted head there still reads its own run
    assert abs(effect("after", "noise", PLANTED)) < 0.02
    assert abs(effect("after", "denoise", PLANTED)) < 0.02
    # the patched rows really changed: the clean pattern of the planted head sits on the marker
    acts = head_activations(bridge, inputs.clean, inputs, [PLANTED[0]], what="pattern")[PLANTED[0]]
    last = inputs.attention_mask.shape[1] - 1
    for b, m in enumerate(markers):
        assert acts[b, PLANTED[1], last, inputs.offsets[b] + m] > 0.9


@pytest.mark.parametrize("what", ["z", "pattern"])
def test_patch_positions_outside_the_mask_and_other_heads_are_untouched(planted, what):
    """Noise-patch the planted head from the corrupted run into the clean run inside a window after
    the corruption, where every head of the layer differs between the two runs: inside the window
    the planted head takes the corrupted value, and nothing else changes (other heads, positions
    outside the window, including those after it)."""
    bridge, inputs, _, markers = planted
    layer, head = PLANTED
    window = inputs.position_mask(_window_after_markers(inputs, markers))
    corrupt = head_activations(bridge, inputs.corrupt, inputs, range(bridge.cfg.n_layers), what)
    clean = head_activations(bridge, inputs.clean, inputs, [layer], what)[layer]
    masks = head_masks([PLANTED], bridge.cfg.n_layers, bridge.cfg.n_heads)
    seen = {}

    def grab(tensor, hook):
        seen["x"] = tensor.detach().clone()

    hook = f"blocks.{layer}.attn.hook_{'z' if what == 'z' else 'pattern'}"
    attention = fused_attention(bridge) if what == "z" else contextlib.nullcontext()  # the path head_activations took
    with torch.no_grad(), attention:
        bridge.run_with_hooks(inputs.clean, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids, fwd_hooks=patch_hooks(corrupt, masks, window, what) + [(hook, grab)])
    if what == "z":  # [batch, pos, head, d_head] -> per (batch, pos, head)
        differs = lambda a, b: (a != b).any(-1)  # noqa: E731
        patched, src, base = seen["x"], corrupt[layer], clean
    else:  # [batch, head, q, k] -> per (batch, q, head)
        differs = lambda a, b: (a != b).any(-1).permute(0, 2, 1)  # noqa: E731
        patched, src, base = seen["x"], corrupt[layer], clean
    real = inputs.attention_mask.bool()
    after_marker = torch.zeros_like(real)
    for b, m in enumerate(markers):
        after_marker[b, inputs.offsets[b] + m + 1 :] = True
    gap = differs(src, base)  # where the two runs differ at all
    others = [h for h in range(bridge.cfg.n_heads) if h != head]
    # preconditions: each assertion below could fail
    assert gap[window][:, others].all() and gap[window][:, head].all()  # every head differs inside the window
    assert gap[after_marker & ~window][:, head].all()  # and the planted head after it
    changed = differs(patched, base)
    assert changed[window][:, head].all()  # the patch took inside the window ...
    assert not differs(patched, src)[window][:, head].any()  # ... with the corrupted run's values
    assert not changed[~window & real].any()  # nothing outside the chosen positions
    assert not changed[..., others].any()  # nor other heads


def test_k_grid_and_random_sets():
    assert ks_for_heads(32) == [1, 2, 3, 4]
    big = ks_for_heads(28 * 12 * 4)
    assert big[0] >= 1 and big[-1] == round(0.02 * 28 * 12 * 4)
    ranking = [(l, h) for l in range(4) for h in range(8)]
    for k in (1, 2, 3, 4):
        sets = control_head_sets(ranking, k, n_random=5, seed=0)
        top = set(sets[0].heads)
        for s in sets[1:-1]:
            assert len(s.heads) == k and not top & set(s.heads)  # random sets never hold a ranked head
        assert set(sets[-1].heads) == set(ranking[-k:])
    with pytest.raises(Exception):
        control_head_sets(ranking, 20)

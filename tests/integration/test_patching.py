import pytest
import torch

from probes.models import load_model
from probes.patching import collect_head_activations, control_head_sets, ks_for, patched_generate, patched_logits


@pytest.fixture(scope="module")
def bridge(tiny_models):
    return load_model(tiny_models["llama"])


def _pair(bridge):
    tok = bridge.tokenizer
    clean = tok.encode("<note> Presents with chronic systolic heart failure. </note>\n<think>\nCandidates:", add_special_tokens=False)
    corrupt = list(clean)
    anchor = list(range(4, 8))  # swap four document tokens for other tokens, same count
    for i in anchor:
        corrupt[i] = (corrupt[i] + 17) % len(tok)
    return torch.tensor([clean]), torch.tensor([corrupt]), anchor


def test_patching_a_head_with_its_own_activation_changes_nothing(bridge):
    clean, _, _ = _pair(bridge)
    layers = range(bridge.cfg.n_layers)
    own = collect_head_activations(bridge, clean, layers)
    with torch.no_grad():
        reference = bridge(clean)[0]
    heads = [(l, h) for l in layers for h in range(bridge.cfg.n_heads)]
    out = patched_logits(bridge, clean, heads, own, range(clean.shape[1]))
    torch.testing.assert_close(out, reference, atol=0, rtol=0)


@pytest.mark.parametrize("what", ["z", "pattern"])
def test_patching_every_head_from_clean_into_corrupted_reproduces_clean_logits(bridge, what):
    clean, corrupt, anchor = _pair(bridge)
    layers = range(bridge.cfg.n_layers)
    heads = [(l, h) for l in layers for h in range(bridge.cfg.n_heads)]
    with torch.no_grad():
        clean_logits = bridge(clean)[0]
        corrupt_logits = bridge(corrupt)[0]
    positions = range(clean.shape[1])
    if what == "z":
        source = collect_head_activations(bridge, clean, layers, "z")
        out = patched_logits(bridge, corrupt, heads, source, positions, "z")
        # Outside the swapped tokens, the residual stream only hears the anchors through attention.
        keep = [i for i in positions if i not in anchor]
        torch.testing.assert_close(out[keep], clean_logits[keep], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(corrupt_logits[keep], clean_logits[keep], atol=1e-3)
    else:
        # Patching the pattern alone leaves the corrupted values: only the positions before the
        # first swapped token are fully clean; the rest must move toward clean.
        source = collect_head_activations(bridge, clean, layers, "pattern")
        out = patched_logits(bridge, corrupt, heads, source, positions, "pattern")
        torch.testing.assert_close(out[: anchor[0]], clean_logits[: anchor[0]], atol=1e-4, rtol=1e-4)


def test_control_draws_are_seeded_and_without_replacement():
    ranking = [(l, h) for l in range(4) for h in range(8)]
    a = control_head_sets(ranking, 8, n_random=3, seed=5)
    b = control_head_sets(ranking, 8, n_random=3, seed=5)
    assert a == b
    assert [s.name for s in a] == ["ranked", "random-0", "random-1", "random-2", "lowest"]
    for s in a:
        assert len(set(s.heads)) == len(s.heads) == 8
    assert a[1].heads != a[2].heads
    assert a[0].heads == tuple(ranking[:8]) and a[-1].heads == tuple(ranking[-8:])
    assert control_head_sets(ranking, 8, seed=6)[1].heads != a[1].heads
    assert ks_for(32) == [3, 8, 16, 32] and ks_for(500) == [3, 8, 16, 40, 100]


def test_patched_generation_only_patches_the_prefix(bridge):
    clean, corrupt, _ = _pair(bridge)
    layers = range(bridge.cfg.n_layers)
    heads = [(l, h) for l in layers for h in range(bridge.cfg.n_heads)]
    own = collect_head_activations(bridge, corrupt, layers)
    plain = patched_generate(bridge, corrupt, [], own, [], max_new_tokens=6)
    same = patched_generate(bridge, corrupt, heads, own, range(corrupt.shape[1]), max_new_tokens=6)
    assert plain == same and len(plain) == 6

import numpy as np
import pytest
import torch

from analyses.methods.boundary import ESTIMATORS, change_point
from probes.attention import doc_kurtosis
from probes.heads import anchor_direction, coarse_terms, distinguishing_tokens, label_margin, margin_gradient, refine_terms


@pytest.mark.parametrize("seed", range(8))
def test_change_point_recovers_a_planted_break(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(60, 200)), int(rng.integers(1, 6))
    tau = int(rng.integers(10, n - 10))
    shift = rng.choice([-1.0, 1.0], size=k) * rng.uniform(1.5, 3.0, size=k)  # a clear break: 3-6 noise SDs
    signal = rng.normal(size=(n, k)) * 0.5
    signal[tau:] += shift
    signal[:, 0] *= 100  # channels on very different scales are standardised first
    assert abs(change_point(signal) - tau) <= 2


@pytest.mark.parametrize("seed", range(6))
def test_change_point_equals_ruptures_exact_search(seed):
    """The closed-form single break is ruptures' exact dynamic programme (l2 cost, one break)."""
    import ruptures

    rng = np.random.default_rng(100 + seed)
    n, k = int(rng.integers(20, 120)), int(rng.integers(1, 5))
    signal = rng.normal(size=(n, k)).cumsum(0)  # random walks: breaks anywhere, no planted one
    x = (signal - signal.mean(0)) / signal.std(0)
    expected = ruptures.Dynp(model="l2", min_size=3, jump=1).fit(x).predict(n_bkps=1)[0]
    assert change_point(signal, min_size=3) == expected


def test_change_point_degenerate_inputs():
    assert change_point(np.zeros((30, 2))) == 15  # no signal at all: the midpoint
    assert change_point(np.arange(4.0)) == 2  # too short to split
    assert set(ESTIMATORS) >= {"fixed", "constant", "behavioural", "internal"}


def test_kurtosis_of_sharp_and_flat_attention():
    flat = torch.full((1, 20), 1 / 20)
    sharp = torch.full((1, 20), 0.1 / 19)
    sharp[0, 3] = 0.9
    mask = torch.ones(1, 20, dtype=torch.bool)
    assert doc_kurtosis(flat, mask).item() == 0.0
    assert doc_kurtosis(sharp, mask).item() > 15  # one spike among 20 keys


def test_distinguishing_tokens_and_margin():
    assert distinguishing_tokens([7, 50, 9, 22], [7, 50, 9, 21]) == (22, 21)
    assert distinguishing_tokens([7, 50], [7, 50, 3]) is None
    lp = torch.log_softmax(torch.tensor([[0.0, 2.0, 1.0, 3.0]]), -1)
    # gold token 1 vs near-misses 2 and 3: the strongest near-miss (3) sets the margin
    assert label_margin(lp, [[(1, 2), (1, 3)]]).item() == pytest.approx((lp[0, 1] - lp[0, 3]).item())


def _one_layer_model(seed=0):
    """A hand-built one-layer, four-head attention model over a 12-token document and 12 CoT tokens.

    Head 0 attends sharply to the anchor token and copies it along the anchor's unembedding
    direction (the shortlisting head). Head 2, at late queries, attends to the gold label's
    mention and writes along the gradient of the gold-vs-near-miss margin (the refining head).
    Heads 1 and 3 attend diffusely and write in random directions.
    """
    g = torch.Generator().manual_seed(seed)
    d, vocab, n_doc, n_cot, heads = 32, 40, 12, 12, 4
    w_u = torch.randn(d, vocab, generator=g)
    norm_weight = torch.ones(d)

    def readout(resid):
        rms = resid.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()
        return (resid * rms * norm_weight) @ w_u

    anchor_pos, anchor_tok, gold_tok, near_tok = 4, 11, 21, 22
    gold_mention, near_mention = n_doc + 2, n_doc + 3
    n = n_doc + n_cot
    queries = torch.arange(n_doc, n)
    pattern = torch.zeros(heads, n_cot, n)
    # head 0: sharp on the anchor; heads 1, 3: flat over the document; head 2: on the gold mention
    pattern[0, :, :n_doc] = 0.02 / (n_doc - 1)
    pattern[0, :, anchor_pos] = 0.98
    pattern[1, :, :n_doc] = 1 / n_doc
    pattern[3, :, :n_doc] = 1 / n_doc
    pattern[2, :, gold_mention] = 0.8
    pattern[2, :, near_mention] = 0.1
    pattern[2, :, 0] = 0.1
    resid_final = torch.randn(n_cot, d, generator=g)
    _, grad = margin_gradient(resid_final, readout, [[(gold_tok, near_tok)]])
    writes = torch.randn(n_cot, heads, d, generator=g)
    writes[:, 0] = w_u[:, anchor_tok] * 3 + 0.1 * torch.randn(n_cot, d, generator=g)
    writes[:, 2] = grad * 5
    doc_mask = torch.zeros(n, dtype=torch.bool)
    doc_mask[:n_doc] = True
    kurt = doc_kurtosis(pattern.permute(1, 0, 2), doc_mask.expand(n_cot, heads, n))  # [q, head]
    regions_gold = torch.zeros(n)
    regions_gold[gold_mention] = 1
    regions_near = torch.zeros(n)
    regions_near[near_mention] = 1
    mass_gold = torch.einsum("hqk,k->qh", pattern, regions_gold)
    mass_near = torch.einsum("hqk,k->qh", pattern, regions_near)
    return dict(w_u=w_u, anchor_tok=anchor_tok, kurt=kurt, writes=writes, grad=grad, mass_gold=mass_gold, mass_near=mass_near, queries=queries)


def test_coarse_and_refine_scores_find_the_right_heads():
    m = _one_layer_model()
    direction = anchor_direction(m["w_u"], [m["anchor_tok"]])
    coarse = coarse_terms(m["kurt"], m["writes"], direction).mean(0)
    refine = refine_terms(m["mass_gold"], m["mass_near"], m["writes"], m["grad"]).mean(0)
    assert int(coarse.argmax()) == 0
    assert int(refine.argmax()) == 2
    assert coarse[0] > 5 * coarse[[1, 2, 3]].abs().max()
    assert refine[2] > 5 * refine[[0, 1, 3]].abs().max()


def test_margin_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(3)
    w_u = torch.randn(8, 10, generator=g, dtype=torch.float64)
    readout = lambda r: r @ w_u.float()  # noqa: E731
    resid = torch.randn(3, 8, generator=g)
    pairs = [[(1, 2), (1, 5)], [(4, 7)]]
    margin, grad = margin_gradient(resid, readout, pairs)
    eps = 1e-3
    for q in range(3):
        for i in range(8):
            bumped = resid.clone()
            bumped[q, i] += eps
            up, _ = margin_gradient(bumped, readout, pairs)
            assert ((up[q] - margin[q]) / eps).item() == pytest.approx(grad[q, i].item(), abs=5e-3)

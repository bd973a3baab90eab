"""attention_reductions against statistics computed directly from each query's attention row, for a
left-padded batch whose documents differ in length, in one block and in many small blocks."""

import numpy as np
import pytest
import scipy.stats
import torch

import probes.attention as attention


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, t, n_regions = 2, 3, 24, 4
    logits = torch.randn(b, h, t, t, generator=g) * 2
    causal = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[1, :5] = True  # the second sequence is left-padded by 5
    logits = logits.masked_fill(causal | pad[:, None, None, :], float("-inf"))
    pattern = logits.softmax(-1).nan_to_num(0.0)
    regions = torch.full((b, t), 3)
    regions[0, :10] = 0
    regions[0, 2:9] = 1  # document of 7 keys
    regions[1, 5:14] = 0
    regions[1, 6:10] = 1  # document of 4 keys
    regions[pad] = -1
    document = regions == 1
    queries = torch.tensor([[12, 15, 20, 23], [16, 18, 22, 23]])
    values = torch.rand(b, h, t, generator=g)
    return pattern, queries, regions, document, n_regions, values


def _reference(pattern, queries, regions, document, n_regions, values):
    b, h = pattern.shape[:2]
    mass = np.zeros((b, queries.shape[1], h, n_regions))
    vmass = np.zeros_like(mass)
    kurt = np.zeros((b, queries.shape[1], h))
    for i in range(b):
        for j, q in enumerate(queries[i].tolist()):
            for head in range(h):
                row = pattern[i, head, q].double().numpy()
                for r in range(n_regions):
                    keys = (regions[i] == r).numpy()
                    mass[i, j, head, r] = row[keys].sum()
                    vmass[i, j, head, r] = (row[keys] * values[i, head].double().numpy()[keys]).sum()
                kurt[i, j, head] = scipy.stats.kurtosis(row[document[i].numpy()], fisher=False)
    return mass, vmass, kurt


# one block; one query row per block; blocks of 3 rows over 4 queries (an uneven last block)
@pytest.mark.parametrize("block_elements", [1 << 22, 3 * 24, 3 * 3 * 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reductions_equal_per_row_statistics(monkeypatch, block_elements, dtype):
    monkeypatch.setattr(attention, "_BLOCK_ELEMENTS", block_elements)
    pattern, queries, regions, document, n_regions, values = _batch()
    pattern = pattern.to(dtype)  # the reference reads the same rounded weights in float64
    for window in (None, 0):
        if window == 0:  # the window path: the queries must be the last positions
            queries = torch.tensor([[20, 21, 22, 23], [20, 21, 22, 23]])
            window = 4
        out = attention.attention_reductions(pattern, queries, regions, document, n_regions, values, query_window=window)
        mass, vmass, kurt = _reference(pattern, queries, regions, document, n_regions, values)
        np.testing.assert_allclose(out["region_mass"].numpy(), mass, atol=1e-6)
        np.testing.assert_allclose(out["value_mass"].numpy(), vmass, atol=1e-6)
        np.testing.assert_allclose(out["doc_kurtosis"].numpy(), kurt, rtol=1e-4)
        assert (kurt > 1).all()  # the reference is not trivially zero


def test_query_window_reads_the_same_rows_as_the_gather(monkeypatch):
    monkeypatch.setattr(attention, "_BLOCK_ELEMENTS", 2 * 3 * 24)
    pattern, _, regions, document, n_regions, values = _batch(1)
    queries = torch.tensor([[19, 20, 21, 22, 23], [19, 20, 21, 22, 23]])
    gathered = attention.attention_reductions(pattern, queries, regions, document, n_regions, values)
    windowed = attention.attention_reductions(pattern, queries, regions, document, n_regions, values, query_window=5)
    for name in gathered:
        torch.testing.assert_close(windowed[name], gathered[name])


def test_no_document_keys_gives_zero_kurtosis():
    pattern, queries, regions, _, n_regions, values = _batch()
    out = attention.attention_reductions(pattern, queries, regions, torch.zeros_like(regions, dtype=torch.bool), n_regions, values)
    assert (out["doc_kurtosis"] == 0).all()


def _capture_batch(lengths, positions, seed=2):
    """A left-padded batch as capture builds it: documents of unequal ``lengths``, each with its own
    query ``positions`` (unpadded), padded to the widest row by repeating the row's last query."""
    g = torch.Generator().manual_seed(seed)
    b, h, n_regions = len(lengths), 2, 3
    t = max(lengths)
    offsets = [t - n for n in lengths]
    pad = torch.arange(t)[None] < torch.tensor(offsets)[:, None]
    causal = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
    logits = (torch.randn(b, h, t, t, generator=g) * 2).masked_fill(causal | pad[:, None, None, :], float("-inf"))
    pattern = logits.softmax(-1).nan_to_num(0.0)
    regions = torch.full((b, t), 2)  # output
    for i, o in enumerate(offsets):
        regions[i, o : o + 3] = 0  # prompt
        regions[i, o + 3 : o + 8] = 1  # document of 5 keys
    regions[pad] = -1
    queries = torch.zeros(b, max(len(p) for p in positions), dtype=torch.long)
    for i, p in enumerate(positions):
        p = torch.tensor(p) + offsets[i]
        queries[i, : len(p)], queries[i, len(p) :] = p, p[-1]
    return pattern, queries, regions, regions == 1, n_regions, torch.rand(b, h, t, generator=g)


# rows of unequal length and unequal numbers of queries: a short row's queries sit at the end of the
# window, not at its first rows, so the window path must map each query to its own row
@pytest.mark.parametrize("path", ["window", "gather"])
def test_unequal_rows_equal_per_row_statistics(monkeypatch, path):
    monkeypatch.setattr(attention, "_BLOCK_ELEMENTS", 2 * 2 * 20)  # blocks of 2 query rows
    lengths = [20, 16, 11]
    if path == "window":  # output tokens: each row's last n positions (capture's window = max n)
        positions = [list(range(n - k, n)) for n, k in zip(lengths, [5, 3, 1])]
        window = 5
    else:
        positions = [[8, 12, 15, 19], [10, 14], [9]]
        window = None
    batch = _capture_batch(lengths, positions)
    out = attention.attention_reductions(*batch, query_window=window)
    mass, vmass, kurt = _reference(*batch)
    np.testing.assert_allclose(out["region_mass"].numpy(), mass, atol=1e-6)
    np.testing.assert_allclose(out["value_mass"].numpy(), vmass, atol=1e-6)
    np.testing.assert_allclose(out["doc_kurtosis"].numpy(), kurt, rtol=1e-4)
    assert (kurt > 1).all()  # the reference is not trivially zero

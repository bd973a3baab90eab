"""Length-bucketed training batches: every example once per epoch, the same batches for every
condition of a seed, and far less padding than random batches."""

import numpy as np

from analyses.methods.distillation.training import length_bucketed_batches


def test_each_epoch_visits_every_example_once_and_a_seed_fixes_the_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 600, size=203).tolist()
    per_epoch = -(-203 // 16)  # ceil
    batches = length_bucketed_batches(lengths, 16, 3 * per_epoch + 5, seed=4)
    assert len(batches) == 3 * per_epoch + 5
    assert all(len(b) <= 16 for b in batches)
    for epoch in range(3):
        seen = sorted(i for b in batches[epoch * per_epoch : (epoch + 1) * per_epoch] for i in b)
        assert seen == list(range(203))
    assert batches == length_bucketed_batches(lengths, 16, 3 * per_epoch + 5, seed=4)
    assert batches != length_bucketed_batches(lengths, 16, 3 * per_epoch + 5, seed=5)


def test_bucketed_batches_pad_less_than_random_ones():
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(5.3, 0.4, size=600), 80, 640).astype(int)
    batches = length_bucketed_batches(lengths.tolist(), 16, 200, seed=0)
    padded = np.mean([lengths[b].max() * len(b) for b in batches])
    random = np.mean([lengths[rng.permutation(600)[:16]].max() * 16 for _ in range(200)])
    used = np.mean([lengths[b].sum() for b in batches])
    assert padded < 0.75 * random
    assert used / padded > 0.9  # under a tenth of a bucketed batch is padding

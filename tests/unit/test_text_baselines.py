"""The text-only boundary baselines: the 16-token text probe sees a marker a few tokens back that
the two-token lookup cannot, and finds nothing where the text marks nothing."""

import numpy as np
import pandas as pd

from analyses.methods.boundary import fit_text_phase_probe, fit_token_phase_table

MARKER = 5


def _traces(n: int, marked: bool, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        prompt = rng.integers(10, 60, size=8).tolist()
        length = int(rng.integers(60, 120))
        out = rng.integers(10, 60, size=length)
        boundary = int(rng.integers(int(0.2 * length), int(0.7 * length)))
        if marked:
            out[boundary - 2] = MARKER  # two tokens before the boundary: out of the lookup's reach
        rows.append({"doc_id": f"d{i}", "prompt_ids": prompt, "output_ids": out.tolist(), "cot_start": len(prompt), "cot_end": len(prompt) + length, "true_boundary": len(prompt) + boundary})
    return pd.DataFrame(rows)


def _median_error(baseline, traces: pd.DataFrame) -> float:
    errors = [abs(baseline.locate(t) - (t.true_boundary - t.cot_start)) / (t.cot_end - t.cot_start) for t in traces.itertuples(index=False)]
    return float(np.median(errors))


def test_the_text_probe_reads_a_marker_three_tokens_back_that_the_lookup_cannot():
    dev, test = _traces(60, True, 0), _traces(40, True, 1)
    probe, table = fit_text_phase_probe(dev), fit_token_phase_table(dev)
    assert _median_error(probe, test) <= 0.02  # about a token
    assert _median_error(table, test) > 0.05


def test_the_text_probe_finds_no_boundary_the_text_does_not_mark():
    dev, test = _traces(60, False, 2), _traces(40, False, 3)
    assert _median_error(fit_text_phase_probe(dev), test) > 0.05


def test_no_dev_truth_no_probe():
    dev = _traces(5, True, 4)
    dev["true_boundary"] = None
    assert fit_text_phase_probe(dev) is None

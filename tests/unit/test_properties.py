"""Property-based tests: random and malformed inputs give a correct result or a CtdInputError."""

import gzip
import json
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analyses.methods.parsing import TraceParser
from analyses.tasks.labels import LabelSpace
from analyses.tasks.metrics import set_metrics, xmc_metrics
from analyses.tasks.sources import load_dataset
from probes.errors import CtdInputError

SPACE = LabelSpace(name="p", codes=["A1", "A2", "B1.0", "C"], texts=["alpha one", "alpha two", "beta one zero", "gamma"])


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda n: st.tuples(
            st.lists(st.lists(st.integers(0, 1), min_size=5, max_size=5), min_size=n, max_size=n),
            st.lists(st.lists(st.floats(-5, 5, allow_nan=False), min_size=5, max_size=5), min_size=n, max_size=n),
        )
    )
)
def test_metrics_bounded_and_match_a_direct_count(pair):
    gold, scores = np.array(pair[0]), np.array(pair[1])
    m = xmc_metrics(gold, scores, ks=(1, 3), train_label_counts=gold.sum(0), n_train=max(1, len(gold)))
    for key, value in m.items():
        assert 0.0 <= value <= 1.0 + 1e-9, key
    order = np.lexsort((np.tile(np.arange(5), (len(gold), 1)), -scores), axis=1)[:, :3]
    direct = np.mean([gold[i, order[i]].sum() / 3 for i in range(len(gold))])
    assert m["P@3"] == pytest.approx(direct)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sets(st.integers(0, 9)), min_size=1, max_size=8), st.lists(st.sets(st.integers(0, 9)), min_size=1, max_size=8))
def test_set_metrics_bounded_or_input_error(gold, pred):
    if len(gold) != len(pred):
        with pytest.raises(CtdInputError):
            set_metrics(gold, pred)
        return
    m = set_metrics(gold, pred)
    assert all(0.0 <= v <= 1.0 for v in m.values())
    if gold == pred:
        assert m["example_f1"] == 1.0


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=string.printable + "αβ→✓", max_size=200))
def test_parser_never_crashes_on_any_text(text):
    parser = TraceParser(SPACE)
    for label, start, end, kind in parser.find_mentions(text):
        assert 0 <= start < end <= len(text) and kind in ("code", "text") and 0 <= label < len(SPACE)
    ids, unknown = parser.answer_labels(text)
    assert len(set(ids)) == len(ids)
    assert all(0 <= i < len(SPACE) for i in ids)


_json_value = st.recursive(st.none() | st.booleans() | st.integers(-3, 10) | st.floats(allow_nan=False) | st.text(max_size=8), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.fixed_dictionaries({"id": st.text(max_size=4), "text": st.text(max_size=12), "labels": st.lists(st.sampled_from(["a", "b", "zz", 3]), max_size=3)}), st.dictionaries(st.sampled_from(["id", "text", "labels"]), _json_value, max_size=3), st.text(max_size=10)), max_size=4))
def test_jsonl_loader_accepts_or_names_the_problem(tmp_path_factory, rows):
    folder = tmp_path_factory.mktemp("j")
    (folder / "labels.jsonl").write_text('{"id": "a", "text": "alpha"}\n{"id": "b", "text": "beta"}\n')
    lines = [json.dumps(r) if not isinstance(r, str) else r for r in rows]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "test.jsonl").write_text("")
    try:
        ds = load_dataset("jsonl", folder)
    except CtdInputError as exc:
        assert "train.jsonl" in str(exc) or "jsonl" in str(exc)
        assert "\n" not in str(exc)
        return
    for gold in ds.docs["gold"]:
        assert all(0 <= g < 2 for g in gold)
    assert all(t.strip() for t in ds.docs["text"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.fixed_dictionaries({"uid": st.text(max_size=3), "title": st.text(max_size=8), "content": st.text(max_size=8), "target_ind": st.lists(st.integers(-2, 4), max_size=3)}), _json_value), max_size=4))
def test_xc_loader_accepts_or_names_the_problem(tmp_path_factory, rows):
    folder = tmp_path_factory.mktemp("xc")
    with gzip.open(folder / "lbl.json.gz", "wt") as fh:
        fh.write("".join(json.dumps({"uid": f"L{i}", "title": f"label {i}"}) + "\n" for i in range(3)))
    with gzip.open(folder / "trn.json.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(folder / "tst.json.gz", "wt") as fh:
        fh.write("")
    try:
        ds = load_dataset("xc-repo", folder)
    except CtdInputError as exc:
        assert "json.gz" in str(exc) and "\n" not in str(exc)
        return
    for gold in ds.docs["gold"]:
        assert all(0 <= g < 3 for g in gold)

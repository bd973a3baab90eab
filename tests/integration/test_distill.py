import numpy as np
import pandas as pd
import pytest
import torch

from analyses.methods.distillation import CONDITIONS, attention_kl, build_examples, choose_training_notes, collate, forward_with_heads, map_heads, mechanistic_loss, next_token_loss, train_student, write_alignment
from analyses.stages.distill import holm
from analyses.methods.distillation.data import capture_teacher_rows, load_teacher_rows
from analyses.methods.distillation.evaluation import paired_trajectory_distance
from analyses.models.organism import build_corpus
from analyses.methods.parsing import TraceParser
from probes.models import build_tiny_model, load_hf_model, load_model


def test_attention_kl_is_zero_for_identical_attention_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(5, 9, generator=g), -1)
    b = torch.softmax(torch.randn(5, 9, generator=g), -1)
    mask = torch.ones(5, 9, dtype=torch.bool)
    mask[:, :2] = False
    assert torch.allclose(attention_kl(a, a, mask), torch.zeros(5), atol=1e-6)
    assert (attention_kl(a, b, mask) > 0).all()
    assert torch.equal(attention_kl(a, b, torch.zeros(5, 9, dtype=torch.bool)), torch.zeros(5))


def test_write_alignment_is_zero_when_aligned():
    d = torch.randn(16)
    assert torch.allclose(write_alignment(torch.stack([2 * d, 0.5 * d]), d), torch.zeros(2), atol=1e-6)
    assert write_alignment(-d[None], d).item() == pytest.approx(2.0)


def test_head_map_is_deterministic_and_injective():
    heads = [(3, 1), (3, 5), (0, 2), (1, 7)]
    sim = np.random.default_rng(4).normal(size=(4, 4))
    a = map_heads(heads, 4, 2, 4, sim)
    assert a == map_heads(heads, 4, 2, 4, sim)
    assert len(set(a.values())) == len(a) == 4
    assert a[(3, 1)][0] == 1 and a[(0, 2)][0] == 0  # relative depth first
    assert a[(3, 1)] == (1, int(np.argmax(sim[0])))


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_training_notes_cover_the_dev_codes_and_never_read_the_scored_notes(heart_notes):
    train, dev, scored = heart_notes.iloc[:80], heart_notes.iloc[80:100], heart_notes.iloc[100:120]
    picked, record = choose_training_notes(train, dev, 30, seed=0, eval_docs=scored)
    assert len(picked) == 30
    wanted = {int(g) for gs in dev["gold"] for g in gs}
    share = lambda frame, codes: len(codes & {int(g) for gs in frame["gold"] for g in gs}) / len(codes)  # noqa: E731
    assert share(picked, wanted) >= share(train.sample(30, random_state=0), wanted)
    assert record["share_of_cover_codes_seen"] == pytest.approx(share(picked, wanted), abs=1e-3)
    # the scored notes' coverage is measured after the choice, and the choice ignores them
    codes = {int(g) for gs in scored["gold"] for g in gs}
    assert record["share_seen_in_training_traces"] == pytest.approx(share(picked, codes), abs=1e-3)
    other = scored.copy()
    other["gold"] = [list(reversed(list(heart_notes.iloc[0]["gold"]))) for _ in range(len(other))]
    again, _ = choose_training_notes(train, dev, 30, seed=0, eval_docs=other)
    assert list(again["doc_id"]) == list(picked["doc_id"])
    # without dev notes: the training split's own codes
    alone, record = choose_training_notes(train, None, 30, seed=0)
    assert "training split" in record["chosen_by"] and len(alone) == 30


def test_teacher_heads_come_from_dev_scores_never_from_test_patching(tmp_path):
    import pandas as pd

    from analyses.methods.distillation.head_map import choose_teacher_heads

    dev = pd.DataFrame({"layer": [0, 1, 2, 3], "head": [1, 2, 3, 0], "score": ["coarse", "coarse", "refine", "refine"], "value": [2.0, 1.0, 2.0, 1.0], "ci_low": 0.0, "ci_high": 3.0, "rank": [1, 2, 1, 2]})
    dev.to_parquet(tmp_path / "dev_head_scores.parquet")
    # a patching table from test traces with phase sweeps that would pick other heads
    sweep = pd.DataFrame({"doc_id": None, "analysis": "sweep", "mode": "denoise", "readout": "answer_logprob", "positions": ["phase1", "phase2"], "layer": [3, 0], "head": [3, 3], "value": [9.0, 9.0]})
    sweep.to_parquet(tmp_path / "patching.parquet")
    phase1, phase2, how = choose_teacher_heads(tmp_path, 1)
    assert (phase1, phase2) == ([(0, 1)], [(2, 3)]) and "dev" in how
    (tmp_path / "dev_head_scores.parquet").unlink()
    with pytest.raises(Exception, match="dev"):
        choose_teacher_heads(tmp_path, 1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models, heart_notes, heart_labels, tiny_tokenizer):
    """Teacher-format traces of 24 notes (the trace teacher's text, as if the tiny teacher wrote
    them), their examples, and the teacher heads' rows captured into a store."""
    corpus = build_corpus(heart_notes.head(24), heart_labels)
    parser = TraceParser(heart_labels)
    rows = []
    for (_, doc), prompt, trace in zip(heart_notes.head(24).iterrows(), corpus["prompt"], corpus["trace"]):
        p_enc = tiny_tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        out = tiny_tokenizer.encode(trace, add_special_tokens=False)
        doc_start = prompt.index(doc["text"])
        parsed = parser.parse(tiny_tokenizer, p_enc["input_ids"], out, document_span=(doc_start, doc_start + len(doc["text"])), prompt_spans=[tuple(s) for s in p_enc["offset_mapping"]],
                              anchors=[(doc_start + a["start"], doc_start + a["end"]) for a in doc["anchors"]], gold=list(doc["gold"]), near_miss=list(doc["near_miss"]))
        rows.append({"doc_id": doc["doc_id"], "prompt_ids": p_enc["input_ids"], "output_ids": out, "regions": parsed.regions.tolist(), "cot_start": parsed.cot_start, "cot_end": parsed.cot_end, "true_boundary": parsed.cot_start + 10})
    traces = pd.DataFrame(rows)
    tau = {r["doc_id"]: r["true_boundary"] for r in rows}
    examples = build_examples(traces, heart_notes, heart_labels, tiny_tokenizer, tau)
    run = tmp_path_factory.mktemp("distill_run")
    heads = [(0, 1), (1, 2), (1, 0)]
    capture_teacher_rows(run, load_model(tiny_models["qwen3"]), traces, heads, progress=False)
    teacher_rows = load_teacher_rows(run, examples, heads)
    base = build_tiny_model("qwen3", tmp_path_factory.mktemp("base") / "student", tiny_tokenizer, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, seed=7)
    return examples, teacher_rows, base, heads


def test_teacher_rows_from_the_store_equal_a_live_teacher_forward(setup, tiny_models, tiny_tokenizer):
    examples, teacher_rows, _, heads = setup
    teacher = load_hf_model(tiny_models["qwen3"], attn_implementation="eager")
    for e in examples[:5]:
        ids = torch.tensor([e.ids[:-1].tolist()])  # the stored trace (without the appended end-of-text)
        with torch.no_grad():
            attentions = teacher(input_ids=ids, output_attentions=True).attentions
        for layer, head in heads:
            live = attentions[layer][0, head, e.cot_start : e.cot_end, :]
            stored = teacher_rows[e.doc_id][(layer, head)][:, : ids.shape[1]]
            torch.testing.assert_close(stored, live.float(), atol=2e-3, rtol=1e-2)  # float16 store
            assert (teacher_rows[e.doc_id][(layer, head)][:, ids.shape[1] :] == 0).all()


def _reachable(student, layer: int, head: int) -> dict[str, torch.Tensor]:
    """Where L_write of student head (layer, head) may move the student (analyses/methods/distillation/losses.py):
    the head's own output columns and query rows, its key/value group's rows and the layer's
    q/k norms and input norm, plus everything upstream of the layer (the stream the head reads).
    Nothing else: not the unembedding or final norm (the directions are detached), not later
    layers or this layer's MLP, not another head's output columns or query rows."""
    attn = student.model.layers[layer].self_attn
    d_head = attn.head_dim
    group = student.config.num_attention_heads // student.config.num_key_value_heads
    kv = head // group
    allowed = {}
    for name, p in student.named_parameters():
        mask = torch.zeros_like(p, dtype=torch.bool)
        parts = name.split(".")
        if name == "model.embed_tokens.weight" or (parts[1] == "layers" and int(parts[2]) < layer):
            mask[:] = True
        elif parts[1] == "layers" and int(parts[2]) == layer:
            rest = ".".join(parts[3:])
            if rest == "self_attn.o_proj.weight":
                mask[:, head * d_head : (head + 1) * d_head] = True
            elif rest.startswith("self_attn.q_proj."):
                mask[head * d_head : (head + 1) * d_head] = True
            elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                mask[kv * d_head : (kv + 1) * d_head] = True
            elif rest in ("self_attn.q_norm.weight", "self_attn.k_norm.weight", "input_layernorm.weight"):
                mask[:] = True
        allowed[name] = mask
    return allowed


@pytest.mark.parametrize("term,student_head", [("write1", (0, 1)), ("write1", (1, 2)), ("write2", (1, 3))])
def test_l_write_reaches_exactly_the_head_and_the_stream_it_reads(setup, tiny_tokenizer, term, student_head):
    """The directions (anchor unembedding, margin gradient) are detached: L_write's gradient is
    non-zero on exactly the parameters :func:`_reachable` names, and on each of them."""
    examples, teacher_rows, base, _ = setup
    from analyses.methods.distillation.training import load_student_base

    student = load_student_base(base)
    batch = examples[:4]
    ids, mask, _ = collate(batch, tiny_tokenizer.pad_token_id)
    out, z = forward_with_heads(student, ids, mask, {0, 1})
    terms = {k: k == term for k in CONDITIONS["mechanistic"]}  # one L_write alone
    pair = {(0, 1) if term == "write1" else (1, 0): student_head}
    loss, parts = mechanistic_loss(student, batch, [teacher_rows[e.doc_id] for e in batch], out, z, pair if term == "write1" else {}, pair if term == "write2" else {}, terms, 1.0, 1.0)
    loss.backward()
    assert parts[term] > 0
    allowed = _reachable(student, *student_head)
    for name, p in student.named_parameters():
        grad = torch.zeros_like(p) if p.grad is None else p.grad
        assert not grad[~allowed[name]].any(), f"{name}: gradient outside the head and the stream it reads"
        if allowed[name].any():
            assert grad[allowed[name]].abs().sum() > 0, f"{name}: no gradient where L_write may act"


def test_every_term_of_the_mechanistic_loss_is_on_and_finite(setup, tiny_tokenizer):
    examples, teacher_rows, base, _ = setup
    from analyses.methods.distillation.training import load_student_base

    student = load_student_base(base)
    batch = examples[:4]
    ids, mask, _ = collate(batch, tiny_tokenizer.pad_token_id)
    out, z = forward_with_heads(student, ids, mask, {0, 1})
    loss, parts = mechanistic_loss(student, batch, [teacher_rows[e.doc_id] for e in batch], out, z, {(0, 1): (0, 0), (1, 2): (1, 1)}, {(1, 0): (1, 2)}, CONDITIONS["mechanistic"], 1.0, 1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert set(parts) == {"attn", "write1", "int1", "loop", "write2", "int2"}
    assert parts["attn"] > 0 and parts["loop"] >= 0 and parts["write2"] > 0


@pytest.mark.parametrize("condition", ["standard", "mechanistic"])
def test_twenty_steps_lower_the_loss_and_record_a_learning_curve(setup, tiny_tokenizer, condition):
    examples, teacher_rows, base, _ = setup
    seen = []
    _, curve, records, seconds = train_student(condition, 0, examples, teacher_rows, tiny_tokenizer.pad_token_id, base, 20, 8, 3e-3, {(0, 1): (0, 0)}, {(1, 0): (1, 2)},
                                               checkpoints=[10, 20], on_checkpoint=lambda step, model: seen.append(step) or {"step_seen": step})
    assert curve["loss"].tail(4).mean() < curve["loss"].head(4).mean()
    assert seen == [0, 10, 20] and [r["step"] for r in records] == [0, 10, 20]
    assert seconds > 0 and curve["seconds"].is_monotonic_increasing


def test_a_diverging_loss_stops_training_with_its_location(setup, tiny_tokenizer):
    from probes.errors import CtdNumericalError

    examples, teacher_rows, base, _ = setup
    with pytest.raises(CtdNumericalError, match=r"distill standard seed 0, step 1: loss is nan"):
        train_student("standard", 0, examples, teacher_rows, tiny_tokenizer.pad_token_id, base, 5, 4, float("inf"), {}, {})


def test_next_token_loss_equals_the_hugging_face_loss(setup, tiny_models, tiny_tokenizer):
    examples, *_ = setup
    teacher = load_hf_model(tiny_models["qwen3"], attn_implementation="eager")
    ids, mask, labels = collate(examples[:4], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        reference = teacher(input_ids=ids, attention_mask=mask, labels=labels).loss
        ours = next_token_loss(teacher, teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state, labels)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


def test_the_trajectory_distance_is_paired_per_note():
    t = np.linspace(0, 1, 5)

    def frame(curves):
        return pd.DataFrame([{"doc_id": d, "t": x, "metric": m, "value": v} for d, (f, c) in curves.items() for m, vals in (("focus", f), ("confusion", c)) for x, v in zip(t, vals)])

    teacher = frame({"a": (t, 1 - t), "b": (2 * t, t)})
    student = frame({"a": (t, 1 - t), "b": (2 * t, t), "c": (t, t)})
    same = paired_trajectory_distance(student, teacher)
    assert set(same["doc_id"]) == {"a", "b"}  # a note without a teacher trace is not compared
    assert np.allclose(same["value"], 0.0)
    swapped = frame({"a": (2 * t, t), "b": (t, 1 - t)})  # the same curves on the wrong notes
    assert paired_trajectory_distance(swapped, teacher)["value"].mean() > 0.2  # an unpaired mean would call this 0

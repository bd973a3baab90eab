import numpy as np
import pytest
import torch

from analyses.distill import CONDITIONS, DistillConfig, _collate, _examples, _forward_with_heads, attention_kl, map_heads, mechanistic_loss, train_student, write_alignment
from analyses.organism import build_corpus
from analyses.parsing import TraceParser
from probes.models import load_hf_model


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


@pytest.fixture(scope="module")
def setup(tiny_models, heart_notes, heart_labels, tiny_tokenizer):
    import pandas as pd

    from analyses.traces import GenerationConfig, generate_traces

    teacher = load_hf_model(tiny_models["qwen3"], attn_implementation="eager")
    # Teacher-format traces (the trace teacher's text) replayed as if the teacher wrote them.
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
    examples = _examples(traces, heart_notes, heart_labels, tiny_tokenizer, tau)
    return teacher, examples


def test_no_gradient_reaches_the_teacher(setup, tiny_tokenizer):
    teacher, examples = setup
    cfg = DistillConfig(steps=1, batch_size=4)
    student, _, maps = train_student("mechanistic", 0, examples, teacher, tiny_tokenizer, cfg, [(0, 1), (1, 2)], [(1, 0)])
    batch = examples[:4]
    ids, mask, labels = _collate(batch, tiny_tokenizer.pad_token_id)
    out, z = _forward_with_heads(student, ids, mask, {0, 1})
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=mask, output_attentions=True)
    teacher_attn = {(l, h): t_out.attentions[l][:, h] for l, h in [(0, 1), (1, 2), (1, 0)]}
    loss, parts = mechanistic_loss(student, teacher_attn, batch, out, z, {(0, 1): (0, 0), (1, 2): (1, 1)}, {(1, 0): (1, 2)}, CONDITIONS["mechanistic"], 1.0, 1.0)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert set(parts) == {"attn", "write1", "int1", "loop", "write2", "int2"}
    assert parts["attn"] > 0 and parts["loop"] >= 0


@pytest.mark.parametrize("condition", ["standard", "mechanistic"])
def test_twenty_steps_lower_the_loss(setup, tiny_tokenizer, condition):
    teacher, examples = setup
    cfg = DistillConfig(steps=20, batch_size=8, lr=3e-3)
    _, curve, maps = train_student(condition, 0, examples, teacher, tiny_tokenizer, cfg, [(0, 1)], [(1, 0)])
    assert curve["loss"].tail(4).mean() < curve["loss"].head(4).mean()
    again = train_student(condition, 0, examples, teacher, tiny_tokenizer, DistillConfig(steps=1, batch_size=8), [(0, 1)], [(1, 0)])[2]
    assert again == maps  # the head map depends on the seed only


def test_a_diverging_loss_stops_training_with_its_location(setup, tiny_tokenizer):
    from probes.errors import CtdNumericalError

    teacher, examples = setup
    cfg = DistillConfig(steps=5, batch_size=4, lr=float("inf"))  # the first update makes the weights non-finite
    with pytest.raises(CtdNumericalError, match=r"distill standard seed 0: loss is nan at step 1"):
        train_student("standard", 0, examples, teacher, tiny_tokenizer, cfg, [(0, 1)], [(1, 0)])


def test_next_token_loss_equals_the_hugging_face_loss(setup, tiny_tokenizer):
    from analyses.distill import next_token_loss

    teacher, examples = setup
    ids, mask, labels = _collate(examples[:4], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        reference = teacher(input_ids=ids, attention_mask=mask, labels=labels).loss
        ours = next_token_loss(teacher, teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state, labels)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)

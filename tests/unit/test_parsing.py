import numpy as np
import pytest

from analyses.models.organism import boundary_char, teacher_trace, train_tokenizer
from analyses.tasks.labels import short_description
from analyses.methods.parsing import GROWTH_GRID, Region, TraceParser, token_char_spans
from analyses.methods.prompts import get_template
from analyses.tasks.labels import LabelSpace


@pytest.fixture(scope="module")
def space():
    return LabelSpace(
        name="toy",
        codes=["I50.21", "I50.22", "I10", "E11.9", "I50.9"],
        texts=[
            "Acute systolic (congestive) heart failure",
            "Chronic systolic (congestive) heart failure",
            "Essential (primary) hypertension",
            "Type 2 diabetes mellitus without complications",
            "Heart failure, unspecified",
        ],
        aliases=[[], [], ["high blood pressure"], [], []],
        parents=["I50.2", "I50.2", None, None, "I50"],
    )


@pytest.fixture(scope="module")
def tok(space):
    texts = ["<note> Presents with chronic systolic heart failure. Denies high blood pressure. </note>\n<think>\n"]
    texts += ["Candidates: I50.21, I50.22, I10.\nCheck I50.22: chronic -> keep.\n</think>\n<answer>I50.22</answer>"] * 5
    return train_tokenizer(texts + space.texts, vocab_size=400)


def _parse(parser, tok, prompt, output, **kw):
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    out_ids = tok.encode(output, add_special_tokens=False)
    return enc["input_ids"], parser.parse(tok, enc["input_ids"], out_ids, prompt_spans=[tuple(s) for s in enc["offset_mapping"]], **kw)


def test_code_and_text_mentions(space):
    parser = TraceParser(space)
    text = "Maybe I50.22 or chronic systolic heart failure; not essential hypertension (I10)."
    found = [(space.codes[l], text[s:e], kind) for l, s, e, kind in parser.find_mentions(text)]
    assert ("I50.22", "I50.22", "code") in found
    assert ("I50.22", "chronic systolic heart failure", "text") in found  # parentheses normalised away
    assert ("I10", "essential hypertension", "text") in found
    assert ("I10", "I10", "code") in found


def test_overlapping_mentions_keep_the_longest(space):
    parser = TraceParser(space)
    # "heart failure, unspecified" (I50.9) contains no other label text; "chronic systolic heart
    # failure" contains "heart failure" which is no label of its own: one mention, the long one.
    text = "chronic systolic heart failure unspecified"
    found = parser.find_mentions(text)
    assert [(space.codes[l], text[s:e]) for l, s, e, _ in found] == [("I50.22", "chronic systolic heart failure")]
    both = LabelSpace(name="nested", codes=["A", "B"], texts=["heart failure", "chronic heart failure"])
    p2 = TraceParser(both)
    t2 = "chronic heart failure and heart failure"
    assert [(both.codes[l], t2[s:e]) for l, s, e, _ in p2.find_mentions(t2)] == [("B", "chronic heart failure"), ("A", "heart failure")]


def test_well_formed_trace_regions_and_growth(space, tok):
    parser = TraceParser(space)
    tmpl = get_template("organism")
    prompt, doc_span = tmpl.render("Presents with chronic systolic heart failure. Denies high blood pressure.")
    anchor = (prompt.index("chronic"), prompt.index("chronic") + len("chronic systolic heart failure"))
    output = "Candidates: I50.21, I50.22, I10.\nCheck I50.21: acute not noted -> drop.\nCheck I50.22: chronic -> keep.\n</think>\n<answer>I50.22</answer>"
    prompt_ids, parsed = _parse(parser, tok, prompt, output, document_span=doc_span, anchors=[anchor], gold=[1], near_miss=[0])
    assert parsed.well_formed and parsed.problems == []
    assert parsed.answer == [1]
    assert parsed.shortlist == [0, 1, 2]
    n = len(prompt_ids)
    assert parsed.cot_start == n and parsed.cot_end > n
    r = parsed.regions
    assert (r[:n] != Region.COT).all() and Region.ANCHOR in r[:n] and Region.DOCUMENT in r[:n]
    assert Region.MENTION_GOLD in r and Region.MENTION_NEAR_MISS in r and Region.MENTION_OTHER in r
    assert Region.ANSWER in r[parsed.cot_end :]
    # every mention's tokens decode back to the code
    for m in parsed.mentions:
        ids = tok.encode(output, add_special_tokens=False)[m.token_start - n : m.token_end - n]
        assert space.codes[m.label_id] in tok.decode(ids)
    assert parsed.shortlist_growth[-1] == 1.0 and np.all(np.diff(parsed.shortlist_growth) >= 0)
    assert len(parsed.shortlist_growth) == len(GROWTH_GRID)


def test_no_answer_no_close_unknown_codes_and_garbage(space, tok):
    parser = TraceParser(space)
    prompt = "<note> x </note>\n<think>\n"
    _, no_close = _parse(parser, tok, prompt, "Candidates: I50.22. Check I50.22: chronic -> keep.")
    assert not no_close.well_formed and "no think close" in no_close.problems and no_close.shortlist == [1]
    _, no_answer = _parse(parser, tok, prompt, "Candidates: I10.\n</think>\nThe answer is I10.")
    assert not no_answer.well_formed and "no answer" in no_answer.problems and no_answer.answer == []
    _, unknown = _parse(parser, tok, prompt, "Candidates: I10.\n</think>\n<answer>I10, Z99.99</answer>")
    assert not unknown.well_formed and unknown.unknown_answer_codes == ["Z99.99"] and unknown.answer == [2]
    _, garbage = _parse(parser, tok, prompt, "@@@ ### \x00 ÿÿ </answer><answer>")
    assert not garbage.well_formed and garbage.shortlist == [] and garbage.answer == []
    _, by_text = _parse(parser, tok, prompt, "</think>\n<answer>essential hypertension; I50.22</answer>")
    assert by_text.well_formed and by_text.answer == [2, 1]


def test_token_char_spans_cover_text(tok):
    text = "Check I50.22: chronic → keep ✓."
    ids = tok.encode(text, add_special_tokens=False)
    decoded, spans = token_char_spans(tok, ids)
    assert decoded == text
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] <= b[1] for a, b in zip(spans, spans[1:]))


def test_teacher_trace_parses_back(heart_labels, heart_notes):
    parser = TraceParser(heart_labels)
    for _, row in heart_notes.head(30).iterrows():
        trace = teacher_trace(row, heart_labels)
        mentions = parser.find_mentions(trace, 0, trace.index("</think>"))
        shortlist = {m[0] for m in mentions}
        assert set(row["gold"]) <= shortlist
        answer = trace[trace.index("<answer>") + 8 : trace.index("</answer>")].split(", ")
        assert sorted(answer) == sorted(heart_labels.codes[g] for g in row["gold"])
        assert boundary_char(trace) > trace.index("Candidates:")
        # every code in the CoT carries its short description, and parses as one mention
        for label, start, end, kind in mentions:
            if kind == "code":
                assert trace[start:].startswith(heart_labels.codes[label] + " " + short_description(heart_labels.texts[label]))


def test_injected_shortlist_round_trips_through_the_parser(heart_labels, tiny_tokenizer):
    from analyses.stages.isolate import shortlist_text

    parser = TraceParser(heart_labels)
    codes = ["I50.22", "I50.21", "I31.4", "I48.0"]
    injected = shortlist_text([heart_labels.id_of(c) for c in codes], heart_labels) + "Check I50.22: chronic -> keep.\n</think>\n<answer>I50.22</answer>"
    prompt = "<note> x </note>\n<think>\n"
    enc = tiny_tokenizer(prompt, add_special_tokens=False)
    parsed = parser.parse(tiny_tokenizer, enc["input_ids"], tiny_tokenizer.encode(injected, add_special_tokens=False))
    assert [heart_labels.codes[i] for i in parsed.shortlist] == codes
    assert parsed.answer == [heart_labels.id_of("I50.22")] and parsed.well_formed


def _phase1_groups(trace: str, labels) -> list[list[int]]:
    """Label ids listed on each phase-1 line, in order."""
    parser = TraceParser(labels, match_texts=False)
    lines = trace[: boundary_char(trace)].strip().split("\n")
    return [[m[0] for m in parser.find_mentions(line)] for line in lines]


def test_teacher_lists_candidates_in_note_order_without_revealing_gold(heart_labels, heart_notes):
    """Phase 1 follows the note (learnable), and a gold code's place beside its sibling is set by
    code order, not by being gold (so the order does not give the answer away)."""
    gold_first = pairs = 0
    for _, row in heart_notes.iterrows():
        trace = teacher_trace(row, heart_labels)
        groups = _phase1_groups(trace, heart_labels)
        start = {int(s["label_id"]): int(s["start"]) for s in list(row["anchors"]) + list(row["distractors"])}
        finding_of = [start[[i for i in group if i in start][0]] for group in groups]
        assert finding_of == sorted(finding_of), (row["text"], trace)
        gold = set(map(int, row["gold"]))
        answer = trace[trace.index("<answer>") + 8 : trace.index("</answer>")].split(", ")
        assert answer == [heart_labels.codes[i] for group in groups for i in group if i in gold]
        for group in groups:
            if len(group) == 2 and len(gold & set(group)) == 1:
                pairs += 1
                gold_first += group[0] in gold
                assert heart_labels.codes[group[0]] < heart_labels.codes[group[1]]
    assert pairs >= 30
    assert 0.25 <= gold_first / pairs <= 0.75, (gold_first, pairs)


def test_phase_lengths_vary_with_the_note(heart_labels, heart_notes):
    """Residual codes ("unspecified") are checked against their siblings, explicit ones kept on
    their evidence; negated findings are ruled out in phase 1: the boundary's share of the CoT
    spreads widely over notes (DESIGN §5)."""
    shares = []
    for _, row in heart_notes.iterrows():
        trace = teacher_trace(row, heart_labels)
        cot = trace[: trace.index("</think>")]
        shares.append(boundary_char(trace) / len(cot))
    shares = np.array(shares)
    assert shares.min() < 0.2 and shares.max() > 0.6
    assert np.subtract(*np.percentile(shares, [75, 25])) >= 0.15


def test_reasoning_traces_in_the_styles_of_several_families(heart_labels, tiny_tokenizer):
    """A fixture of traces written by the project in the styles of R1 distills, Qwen3, Magistral,
    gpt-oss and Phi-4-reasoning: the parser finds their markers, mentions (by code and by
    description), shortlist and answer."""
    import json
    from pathlib import Path

    cases = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "reasoning_traces.json").read_text())
    assert len({c["template"] for c in cases}) >= 5
    for case in cases:
        template = get_template(case["template"])
        parser = TraceParser.for_template(heart_labels, template)
        prompt = tiny_tokenizer.encode("<note> x </note>\n", add_special_tokens=False)
        output = tiny_tokenizer.encode(case["output"], add_special_tokens=False)
        parsed = parser.parse(tiny_tokenizer, prompt, output)
        expected = case["expected"]
        assert [heart_labels.codes[i] for i in parsed.shortlist] == expected["shortlist"], case["name"]
        assert [heart_labels.codes[i] for i in parsed.answer] == expected["answer"], case["name"]
        assert parsed.well_formed == expected["well_formed"], case["name"]
        assert parsed.problems == expected["problems"], (case["name"], parsed.problems)
        cot_text = tiny_tokenizer.decode(output[parsed.cot_start - len(prompt) : parsed.cot_end - len(prompt)])
        assert cot_text.lstrip().startswith(expected["cot_starts_with"]), (case["name"], cot_text[:40])
        assert template.think_open not in cot_text and template.think_close not in cot_text, case["name"]


def test_chat_templates_render_the_document_and_open_thinking(tiny_tokenizer):
    """A model's own chat template (with the thinking switch where it has one) renders the prompt;
    the document is found verbatim, and a template that opens the think block ends the prompt inside it."""
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking %}<think>{% endif %}{% endif %}"
    )
    text, (a, b) = get_template("qwen3-chat").render("Diagnosed with cardiomegaly.", tokenizer=tok)
    assert text[a:b] == "Diagnosed with cardiomegaly."
    assert text.endswith("<think>\n")  # thinking enabled through the template's own switch
    r1 = copy.deepcopy(tiny_tokenizer)
    r1.chat_template = "{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
    text, _ = get_template("qwen2-chat").render("Diagnosed with cardiomegaly.", tokenizer=r1)
    assert text.endswith("<｜Assistant｜>")  # this template leaves the think block to the model
    from analyses.methods.prompts import default_template

    assert default_template("qwen3", tok).name == "qwen3-chat" and default_template("qwen3", tiny_tokenizer).name == "qwen3-plain"
    with pytest.raises(Exception, match="no chat template"):
        get_template("qwen3-chat").render("x", tokenizer=tiny_tokenizer)

"""The read-outs inside the chain of thought (issue 26): phase-1 code mentions and phase-2 verdicts,
located on teacher traces of both formats and consistent with the tokens a teacher-forced pass reads."""

import numpy as np
import pytest

from analyses.methods.parsing import TraceParser, token_char_spans
from analyses.methods.prompts import get_template
from analyses.methods.readouts import cot_readouts
from analyses.models.organism import boundary_char, teacher_trace


@pytest.mark.parametrize("trace_format", ["v2", "v3"])
def test_cot_readouts_sit_on_the_codes_before_the_boundary_and_the_verdicts_after(heart_labels, heart_notes, tiny_tokenizer, trace_format):
    tok, template = tiny_tokenizer, get_template("organism")
    parser = TraceParser(heart_labels)
    checked = 0
    for _, row in heart_notes.head(25).iterrows():
        prompt, _ = template.render(row["text"])
        trace = teacher_trace(row, heart_labels, trace_format=trace_format)
        prompt_ids = tok.encode(prompt, add_special_tokens=False)
        out_ids = tok.encode(trace, add_special_tokens=False)
        parsed = parser.parse(tok, prompt_ids, out_ids)
        _, spans = token_char_spans(tok, out_ids)
        starts = np.array([s for s, _ in spans])
        boundary = len(prompt_ids) + int(np.searchsorted(starts, boundary_char(parsed.text), side="left"))
        ids = prompt_ids + out_ids
        cot_end = len(ids)
        mentions = [{"label_id": m.label_id, "token_start": m.token_start, "token_end": m.token_end} for m in parsed.mentions]
        items = cot_readouts(tok, heart_labels, ids, mentions, boundary, cot_end)
        assert cot_readouts(tok, heart_labels, ids, np.array(mentions, dtype=object), boundary, cot_end) == items  # as parquet returns them
        phase1 = [m for m in mentions if m["token_start"] < boundary]
        assert len(items["cot_phase1_logprob"]) == len(phase1) > 0
        for positions, targets, competitors in items["cot_phase1_logprob"]:
            assert max(positions) + 1 < boundary and not competitors
            assert [ids[p + 1] for p in positions] == list(targets)  # the tokens a teacher-forced pass predicts there
            assert tok.decode(list(targets)).strip() in heart_labels.codes
        verdict_lines = [l for l in trace[boundary_char(trace) :].split("\n") if l.endswith(("-> keep.", "-> drop."))]
        needs = set(tok.encode(" needs", add_special_tokens=False)[:1] + tok.encode("needs", add_special_tokens=False)[:1])
        kept_lines = sum(l.endswith("-> keep.") for l in verdict_lines)
        dropped_lines = sum(l.endswith("-> drop.") and ": needs " in l for l in verdict_lines)
        items2 = items["cot_phase2_margin"]
        assert len(items2) == kept_lines + (dropped_lines if kept_lines else 0) > 0
        for (p,), (target,), competitors in items2:
            assert p + 1 >= boundary and ids[p + 1] == target  # the token a teacher-forced pass predicts there
            if target in needs:  # a dropped line: against what kept lines wrote there
                assert competitors and not any(c[0] in needs for c in competitors)
            else:  # a kept line: against "needs"
                assert {c[0] for c in competitors} <= needs
        assert sum(t not in needs for _, (t,), _ in items2) == kept_lines
        checked += 1
    assert checked == 25


def test_no_boundary_no_cot_items(heart_labels, tiny_tokenizer):
    assert cot_readouts(tiny_tokenizer, heart_labels, [1, 2, 3], [], None, 3) == {"cot_phase1_logprob": [], "cot_phase2_margin": []}

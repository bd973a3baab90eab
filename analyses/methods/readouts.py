"""Teacher-forced read-outs at a trace's answer: what the patch stage measures under each patch and
what distillation scores a student's held-out traces with.

- ``answer_logprob``: log-probability of each gold answer code (all its tokens), mean over codes;
- ``answer_margin``: at each gold code, its log-probability minus the strongest near-miss's (at the
  first token where their tokenisations part), mean over codes.

Inside the chain of thought, where each phase acts (the answer copies the CoT's codes, so an
answer read-out can route around the phase heads):

- ``cot_phase1_logprob``: the teacher-forced log-probability of each code the CoT shortlists, at
  its phase-1 mention (the code's tokens, not its description), mean over mentions;
- ``cot_phase2_margin``: at each phase-2 line's decision token (the first token after the checked
  code and its description: the evidence noted on a kept code's line, ``needs`` on a dropped
  one's), the log-probability of what was written minus the other decision's (``needs`` against
  a kept line's token; the trace's kept-line tokens, the strongest of them, against ``needs``),
  mean over lines: how firmly phase 2 tells gold from its near-misses. The verdict word at the
  line's end is not read: it follows from the line's own text.

:func:`answer_readouts` gives each read-out's items for one trace (positions, target tokens,
competitor tokens), which :class:`probes.patching.TokenReadout` evaluates.
"""

from __future__ import annotations

import numpy as np

from analyses.methods.parsing import Region

__all__ = ["answer_readouts", "cot_readouts", "find_tokens", "READOUTS", "ANSWER_READOUTS", "COT_READOUTS", "VERDICTS"]

ANSWER_READOUTS = ("answer_logprob", "answer_margin")
COT_READOUTS = ("cot_phase1_logprob", "cot_phase2_margin")
READOUTS = ANSWER_READOUTS + COT_READOUTS
# The phase-2 verdict words, each the other's foil.
VERDICTS = ("keep", "drop")


def find_tokens(haystack: list[int], needle: list[int], start: int, end: int) -> int:
    """The first index in ``[start, end)`` where ``needle`` occurs in ``haystack`` whole, or -1."""
    for i in range(start, end - len(needle) + 1):
        if haystack[i : i + len(needle)] == needle:
            return i
    return -1


def _code_variants(tokenizer, code: str) -> list[list[int]]:
    return [v for v in dict.fromkeys(tuple(tokenizer.encode(t, add_special_tokens=False)) for t in (code, " " + code)) if v]


def answer_readouts(tokenizer, labels, ids: list[int], regions: np.ndarray, gold: list[int], near: list[int]) -> dict[str, list]:
    """The items of each teacher-forced read-out of one trace (see the module docstring)."""
    answer = np.flatnonzero(np.asarray(regions) == int(Region.ANSWER))
    logprob_items, margin_items = [], []
    if len(answer) == 0:
        return {"answer_logprob": [], "answer_margin": []}
    a0, a1 = int(answer[0]), int(answer[-1]) + 1
    near_tokens = {n: _code_variants(tokenizer, labels.codes[n]) for n in near}
    for g in gold:
        for variant in _code_variants(tokenizer, labels.codes[g]):
            s = find_tokens(ids, list(variant), a0, a1 + 1)
            if s < 1:
                continue
            positions = tuple(range(s - 1, s - 1 + len(variant)))
            logprob_items.append((positions, tuple(variant), ()))
            groups: dict[int, list[tuple[int, ...]]] = {}
            for n, variants in near_tokens.items():
                other = next((v for v in variants if len(v) and v[0] == variant[0]) if len(variant) > 1 else iter(()), None) or next((v for v in variants if len(v) == len(variant)), None)
                if other is None:
                    continue
                i = next((j for j, (a, b) in enumerate(zip(variant, other)) if a != b), None)
                if i is not None:
                    groups.setdefault(i, []).append((other[i],))
            for i, competitors in sorted(groups.items()):
                margin_items.append(((s - 1 + i,), (variant[i],), tuple(dict.fromkeys(competitors))))
            break
    return {"answer_logprob": logprob_items, "answer_margin": margin_items}


def _word_variants(tokenizer, word: str) -> list[tuple[int, ...]]:
    return [v for v in dict.fromkeys(tuple(tokenizer.encode(t, add_special_tokens=False)) for t in (" " + word, word)) if v]


def cot_readouts(tokenizer, labels, ids: list[int], mentions, boundary: int | None, cot_end: int) -> dict[str, list]:
    """The items of the two CoT read-outs of one trace (see the module docstring); ``mentions``
    are the parsed label mentions (``label_id``, ``token_start``, ``token_end`` in ``ids``),
    ``boundary`` the first phase-2 token (None: no items)."""
    out = {"cot_phase1_logprob": [], "cot_phase2_margin": []}
    if boundary is None:
        return out
    for m in [] if mentions is None else list(mentions):
        start, end = int(m["token_start"]), int(m["token_end"])
        if start >= boundary or start < 1:
            continue
        for variant in _code_variants(tokenizer, labels.codes[int(m["label_id"])]):
            s = find_tokens(ids, list(variant), start, min(end + 1, boundary))
            if s >= 1:
                out["cot_phase1_logprob"].append((tuple(range(s - 1, s - 1 + len(variant))), tuple(variant), ()))
                break
    # Phase 2: each checked code's line decides at its first token after "code description:"
    # (evidence noted -> keep; "needs ..." -> drop). The verdict word at the line's end follows
    # from the line's own text, so it is not where the decision is read.
    keep_ids = {v[0] for v in _word_variants(tokenizer, VERDICTS[0])}
    drop_ids = {v[0] for v in _word_variants(tokenizer, VERDICTS[1])}
    needs_ids = {v[0] for v in _word_variants(tokenizer, "needs")}
    lines = []  # (decision position, verdict), one per line: its first mention is the checked code
    seen_stops = set()
    for m in sorted([] if mentions is None else list(mentions), key=lambda m: int(m["token_start"])):
        start, end = int(m["token_start"]), int(m["token_end"])
        if start < boundary or end >= cot_end:
            continue
        stop = next((j for j in range(start, cot_end) if "\n" in tokenizer.decode([ids[j]])), cot_end)
        if stop in seen_stops:  # a later mention on the same line (a quoted description)
            continue
        seen_stops.add(stop)
        d = end
        while d < stop and tokenizer.decode([ids[d]]).strip() in ("", ":"):
            d += 1
        verdicts = [ids[j] in keep_ids for j in range(d, stop) if ids[j] in keep_ids | drop_ids]
        if d < stop and verdicts:
            lines.append((d, verdicts[-1]))
    kept_first = tuple(dict.fromkeys(ids[d] for d, keep in lines if keep and ids[d] not in needs_ids))
    for d, keep in lines:
        written = ids[d]
        competitors = tuple((t,) for t in sorted(needs_ids)) if keep else tuple((t,) for t in kept_first if t != written)
        if competitors and (keep or written in needs_ids):
            out["cot_phase2_margin"].append(((d - 1,), (written,), competitors))
    out["cot_phase2_margin"].sort()
    return out

"""Teacher-forced read-outs at a trace's answer: what the patch stage measures under each patch and
what distillation scores a student's held-out traces with.

- ``answer_logprob``: log-probability of each gold answer code (all its tokens), mean over codes;
- ``answer_margin``: at each gold code, its log-probability minus the strongest near-miss's (at the
  first token where their tokenisations part), mean over codes.

:func:`answer_readouts` gives each read-out's items for one trace (positions, target tokens,
competitor tokens), which :class:`probes.patching.TokenReadout` evaluates.
"""

from __future__ import annotations

import numpy as np

from analyses.methods.parsing import Region

__all__ = ["answer_readouts", "find_tokens", "READOUTS"]

READOUTS = ("answer_logprob", "answer_margin")


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

"""The embedded organism's trace format: the trace teacher, the true boundary, and the training corpus.

The organism reads a generated clinical note and writes a two-phase chain of thought in which every
code carries its short description:

    <think>
    Candidates: I50.21 acute systolic heart failure; I50.22 chronic systolic heart failure.   <- phase 1
    Ruled out: I10 essential hypertension (denied).
    Check I50.21 acute systolic heart failure: acute noted -> keep.                           <- phase 2
    </think>
    <answer>I50.21</answer>

The true phase boundary is the first token of the first ``Check``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analyses.methods.prompts import get_template
from analyses.tasks.labels import LabelSpace, lower_first, normalize_text, short_description

__all__ = ["teacher_trace", "label_mention", "boundary_char", "dictionary_corpus", "build_corpus", "default_organism_path", "shortlist_line", "trace_format_of", "ORGANISM_LABEL_CHAPTERS", "SPECIAL_TOKENS", "PHASE2_MARKER", "PHASE2_VERDICTS", "TRACE_FORMATS"]

ORGANISM_LABEL_CHAPTERS = ("9",)
_TEMPLATE = get_template("organism")
# Whole tokens: the end of text, the template's reasoning markers, and the note tags of its body.
SPECIAL_TOKENS = ("<|endoftext|>", _TEMPLATE.think_open, _TEMPLATE.think_close, _TEMPLATE.answer_open, _TEMPLATE.answer_close, "<note>", "</note>")
_ASSETS = Path(__file__).resolve().parents[2] / "assets" / "organism"  # analyses/assets
_KIND_EVIDENCE = {"negated": "denied", "history": "history only", "family": "family history"}


def default_organism_path() -> Path:
    """The shipped checkpoint (``analyses/assets/organism``)."""
    return _ASSETS


# ------------------------------------------------------------------------------------------------
# the trace teacher


# Words that name no distinguishing modifier: a gold code decided only by these ("unspecified",
# "other") is a residual code, and every more specific sibling must be checked and ruled out.
_GENERIC_WORDS = frozenset("unspecified other specified elsewhere classified not of the and in to or a an by for as".split())
# How many further siblings a residual code is checked against in phase 2 (beyond the listed one).
MAX_EXTRA_CHECKS = 6
PHASE2_MARKER = "Check "
# v3 lines carry no marker word: a phase-2 line is known by how it ends (its verdict).
PHASE2_VERDICTS = ("-> keep.", "-> drop.")
TRACE_FORMATS = ("v2", "v3")


def label_mention(labels: LabelSpace, label_id: int) -> str:
    """A code as the CoT names it: the code followed by its short description."""
    return f"{labels.codes[label_id]} {short_description(labels.texts[label_id])}"


def _ranked_siblings(row, labels: LabelSpace, gold: int) -> list[int]:
    # The note records each gold code's siblings ranked by text similarity (closest first).
    parent = labels.parents[gold]
    near = [int(j) for j in row["near_miss"]] if "near_miss" in row and row["near_miss"] is not None else []
    ranked = [j for j in near if parent is not None and labels.parents[j] == parent and j != gold]
    contrast = next((int(e["contrast"]) for e in row["evidence"] if int(e["label_id"]) == gold), -1)
    if contrast >= 0 and contrast not in ranked and labels.parents[contrast] == parent:
        ranked.insert(0, contrast)
    return ranked


def teacher_trace(row, labels: LabelSpace, max_extra: int = MAX_EXTRA_CHECKS, trace_format: str = "v2") -> str:
    """The trace (text after the prompt's ``<think>\n``) for one generated note ``row``.

    Phase 1 (shortlisting) walks the note's findings in order. A gold finding lists its code and
    its closest sibling (code order, so position does not reveal gold); a negated or family-history
    finding is ruled out at once; a past-history finding is listed for checking. Phase 2
    (fine-grained) begins at the first ``Check`` and walks the findings again:

    - a gold code whose evidence names a distinguishing modifier ("acute", "left") is kept on it;
    - a residual gold code ("unspecified", "other") is checked against its listed sibling and up to
      ``max_extra`` further siblings, each ruled out by the modifier it needs, and kept on the
      quoted evidence;
    - a past-history finding is dropped.

    So phase-1 length grows with the findings and distractors, phase-2 length with how much
    checking each gold code needs: the boundary's share of the CoT varies from note to note.
    Every code carries its short description, as R1-style traces write it.

    ``trace_format="v3"`` writes the same decisions with no word that marks the switch: every line
    of both phases opens with a code and its description, phase 1 closing a line with
    ``: candidates.``, ``-> candidate.`` or ``-> ruled out.`` and phase 2 with ``-> keep.`` or
    ``-> drop.``. The first phase-2 line begins exactly as a phase-1 line would; only the code
    differs (the first one to check instead of the next finding's), so the switch is set by the
    generator's state (no finding left in the note), and the text tells it only a mention later.
    """
    if trace_format not in TRACE_FORMATS:
        raise ValueError(f"trace_format={trace_format!r}: use one of {TRACE_FORMATS}")
    v3 = trace_format == "v3"
    marker = "" if v3 else PHASE2_MARKER
    gold = [int(g) for g in row["gold"]]
    gold_set = set(gold)
    evidence = {int(e["label_id"]): e for e in row["evidence"]}
    distractors = {int(d["label_id"]): d["kind"] for d in row["distractors"]}
    findings = sorted([(int(a["start"]), int(a["label_id"])) for a in row["anchors"]] + [(int(d["start"]), int(d["label_id"])) for d in row["distractors"]])
    findings += [(10**9, g) for g in gold if g not in {lab for _, lab in findings}]  # a gold without a span (never in generated notes)
    mention = lambda c: label_mention(labels, c)  # noqa: E731
    by_code = lambda ids: sorted(ids, key=lambda c: labels.codes[c])  # noqa: E731
    phase1: list[str] = []
    phase2: list[str] = []
    used: set[int] = set(gold)
    seen: set[int] = set()
    for _, label in findings:
        if label in seen:
            continue
        seen.add(label)
        if label in gold_set:
            ev = evidence[label]
            ranked = [j for j in _ranked_siblings(row, labels, label) if j not in used]
            group = by_code([label] + ranked[:1])
            used.update(group)
            phase1.append("; ".join(mention(c) for c in group) + ": candidates." if v3 else shortlist_line(labels, group))
            explicit = [w for w in ev["decisive"] if w not in _GENERIC_WORDS]
            phrase_words = set(normalize_text(ev["phrase"]).split())
            if explicit or len(group) == 1 and not ranked[1:]:
                why = " ".join(explicit[:3]) if explicit else f'"{ev["phrase"]}"'
                phase2.append(f"{marker}{mention(label)}: {why} noted -> keep.")
                continue
            extra = ranked[1 : 1 + max_extra]
            used.update(extra)
            for c in by_code(group + extra):
                if c == label:
                    phase2.append(f'{marker}{mention(c)}: "{ev["phrase"]}" noted, nothing more specific -> keep.')
                else:
                    needs = [w for w in normalize_text(short_description(labels.texts[c])).split() if w not in phrase_words][:4] or ["more detail"]
                    phase2.append(f"{marker}{mention(c)}: needs {' '.join(needs)}, not noted -> drop.")
        elif label not in used:
            used.add(label)
            kind = distractors[label]
            if kind == "history":
                phase1.append(f"{mention(label)}: history only -> candidate." if v3 else shortlist_line(labels, [label]))
                phase2.append(f"{marker}{mention(label)}: history only, resolved -> drop.")
            else:
                phase1.append(f"{mention(label)}: {_KIND_EVIDENCE[kind]} -> ruled out." if v3 else f"Ruled out: {mention(label)} ({_KIND_EVIDENCE[kind]}).")
    answer = ", ".join(labels.codes[c] for c in dict.fromkeys(label for _, label in findings) if c in gold_set)
    t = get_template("organism")
    return "\n".join(phase1 + phase2) + f"\n{t.think_close}\n{t.answer_open}" + answer + t.answer_close


def shortlist_line(labels: LabelSpace, label_ids, trace_format: str = "v2") -> str:
    """A phase-1 line listing candidates, as the organism writes one in ``trace_format``."""
    if trace_format == "v3":
        return "; ".join(label_mention(labels, c) for c in label_ids) + ": candidates."
    return "Candidates: " + "; ".join(label_mention(labels, c) for c in label_ids) + "."


def trace_format_of(model_dir) -> str:
    """The trace format an organism checkpoint was trained on (``ctd_organism.json``); ``v2`` for
    any other model and for checkpoints older than the setting."""
    import json

    meta = Path(model_dir) / "ctd_organism.json"
    if not meta.exists():
        return "v2"
    return json.loads(meta.read_text()).get("config", {}).get("trace_format", "v2")


def boundary_char(trace_text: str) -> int | None:
    """Character index where checking begins (the true phase boundary), or None: the first line
    that opens with ``Check`` (v2) or, read in hindsight, closes with a phase-2 verdict (v3)."""
    at = trace_text.find(PHASE2_MARKER)
    while at > 0 and trace_text[at - 1] != "\n":
        at = trace_text.find(PHASE2_MARKER, at + 1)
    if at >= 0:
        return at
    start = 0
    for line in trace_text.split("\n"):
        if line.rstrip().endswith(PHASE2_VERDICTS):
            return start
        start += len(line) + 1
    return None


def dictionary_corpus(labels: LabelSpace, repeats: int = 3, trace_format: str = "v2") -> pd.DataFrame:
    """One-finding mini-notes per label text variant, traced by the teacher: a cheap way to learn
    each code, its short description and the siblings it is told apart from."""
    from analyses.tasks.labels import text_variants as _variants
    from analyses.tasks.notes import NoteGenerator

    template = get_template("organism")
    generator = NoteGenerator(labels)
    variants = [_variants(labels.texts[i], labels.aliases[i]) for i in range(len(labels))]
    owners: dict[str, int] = {}
    for vs in variants:
        for v in vs:
            owners[normalize_text(v)] = owners.get(normalize_text(v), 0) + 1
    prompts, traces = [], []
    for i in range(len(labels)):
        near, closest = generator.near_misses([i])
        contrast = closest.get(i)
        for phrase in (v for v in variants[i] if owners[normalize_text(v)] == 1):  # unambiguous only
            phrase = lower_first(phrase)
            prompt, _ = template.render(f"Presents with {phrase}.")
            row = {
                "gold": [i],
                "near_miss": near,
                "evidence": [{"label_id": i, "phrase": phrase, "contrast": -1 if contrast is None else contrast, "decisive": generator.decisive_words(i, contrast, phrase)}],
                "anchors": [{"label_id": i, "start": len("Presents with "), "end": len("Presents with ") + len(phrase)}],
                "distractors": [],
            }
            trace = teacher_trace(row, labels, trace_format=trace_format)
            prompts += [prompt] * repeats
            traces += [trace] * repeats
    return pd.DataFrame({"doc_id": None, "split": "train", "prompt": prompts, "trace": traces})


def build_corpus(docs: pd.DataFrame, labels: LabelSpace, trace_format: str = "v2") -> pd.DataFrame:
    """Prompt text and teacher trace per note."""
    template = get_template("organism")
    prompts, traces = [], []
    for _, row in docs.iterrows():
        prompt, _ = template.render(row["text"])
        prompts.append(prompt)
        traces.append(teacher_trace(row, labels, trace_format=trace_format))
    return pd.DataFrame({"doc_id": docs["doc_id"], "split": docs["split"], "prompt": prompts, "trace": traces})


# ------------------------------------------------------------------------------------------------
# tokenizer



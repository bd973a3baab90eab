"""Focus and Confusion move the way their definitions say, on constructed CoTs with a known answer."""

import numpy as np
import pandas as pd
import pytest

from analyses.methods.dynamics import GRID, compute_dynamics
from analyses.methods.parsing import TraceParser, render_codes


class WordTokenizer:
    """One id per whitespace-separated word: enough to cut a CoT into prefixes."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            if word not in self.vocab:
                self.vocab[word] = len(self.words)
                self.words.append(word)
            ids.append(self.vocab[word])
        return ids

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(self.words[i] for i in ids)


def _dynamics(labels, note: str, gold: list[str], near: list[str], cot: str, tau_char: int):
    tok = WordTokenizer()
    ids = tok.encode(cot)
    tau_token = len(cot[:tau_char].split())
    docs = pd.DataFrame({"doc_id": ["d0"], "text": [note], "gold": [[labels.id_of(c) for c in gold]], "near_miss": [[labels.id_of(c) for c in near]]})
    traces = pd.DataFrame({"doc_id": ["d0"], "output_ids": [ids], "cot_start": [0], "cot_end": [len(ids)]})
    dyn = compute_dynamics(traces, docs, labels, tok, n_boot=50, progress=False)
    dyn = dyn.with_phase_changes({"d0": tau_token / len(ids)}, source="constructed")
    changes = dyn.phase_changes().set_index("metric")["value"]
    curves = dyn.summary[dyn.summary["metric"].isin(["focus", "confusion"])]
    return changes, {m: g.sort_values("t")["value"].to_numpy() for m, g in curves.groupby("metric")}


NOTE = "72-year-old male seen in the ward. Diagnosed with acute systolic heart failure. Denies chest pain."
NEAR = ["I50.22", "I50.23", "I50.20"]


@pytest.fixture(scope="module")
def distant_labels():
    """Gold heart failure among near-misses MiniLM can tell apart from it (hip fractures): sibling
    descriptions are too alike for MiniLM to separate (cos > 0.9), which would test the embedder,
    not the instrument."""
    from analyses.tasks.labels import LabelSpace

    return LabelSpace(
        name="distant",
        codes=["I50.21", "S72.001", "S72.002", "S72.009", "J45.909"],
        texts=[
            "Acute systolic (congestive) heart failure",
            "Fracture of unspecified part of neck of right femur",
            "Fracture of unspecified part of neck of left femur",
            "Fracture of unspecified part of neck of unspecified femur",
            "Unspecified asthma, uncomplicated",
        ],
    )


FRACTURES = ["S72.001", "S72.002", "S72.009"]


def test_focus_climbs_while_the_cot_reads_the_note(heart_labels):
    # Phase 1 restates the note's findings; phase 2 only talks about the answer format.
    phase1 = "First some preliminaries about the task at hand. The note says the patient was diagnosed with acute systolic heart failure in the ward. "
    phase2 = "Now the output format. I will write the result in the required answer block with commas between items and nothing else. " * 3
    changes, curves = _dynamics(heart_labels, NOTE, ["I50.21"], NEAR, phase1 + phase2, len(phase1))
    assert changes["focus_change_phase1"] > 0.15
    assert changes["focus_change_phase2"] < 0  # format talk dilutes the prefix's similarity to the note
    assert curves["focus"].argmax() < len(GRID) - 1


def test_confusion_rises_with_near_misses_and_falls_when_the_cot_turns_to_gold(distant_labels):
    # Phase 1 lists bare near-miss codes (rendered as descriptions before embedding); phase 2
    # argues for the gold finding and names no near-miss.
    phase1 = "Candidates: S72.001, S72.002, S72.009, I50.21. "
    phase2 = "Check I50.21: the note says acute systolic heart failure, short of breath with a low ejection fraction, so keep I50.21. " * 3
    changes, curves = _dynamics(distant_labels, NOTE, ["I50.21"], FRACTURES, phase1 + phase2, len(phase1))
    assert changes["confusion_change_phase1"] > 0.2
    assert changes["confusion_change_phase2"] < -0.2
    assert changes["focus_change_phase2"] > 0.1  # and the CoT comes back to the note


def test_confusion_stays_up_while_the_cot_keeps_weighing_near_misses(distant_labels):
    """The paired control: same phase 1, a phase 2 that keeps naming the near-misses instead."""
    phase1 = "Candidates: S72.001, S72.002, S72.009, I50.21. "
    weighing = "Check S72.001: possible. Check S72.002: possible. Check S72.009: possible. " * 2
    settling = "Check I50.21: the note says acute systolic heart failure, short of breath with a low ejection fraction, so keep I50.21. " * 3
    kept, _ = _dynamics(distant_labels, NOTE, ["I50.21"], FRACTURES, phase1 + weighing, len(phase1))
    dropped, _ = _dynamics(distant_labels, NOTE, ["I50.21"], FRACTURES, phase1 + settling, len(phase1))
    assert kept["confusion_change_phase2"] > dropped["confusion_change_phase2"] + 0.2


def test_a_cot_that_does_not_change_gives_flat_curves(heart_labels):
    cot = "The sky is blue today. " * 12
    changes, curves = _dynamics(heart_labels, NOTE, ["I50.21"], NEAR, cot, len(cot) // 2)
    # MiniLM drifts a little as a repeated sentence grows; far less than the movements above (> 0.2)
    assert np.ptp(curves["focus"][2:]) < 0.1 and np.ptp(curves["confusion"][2:]) < 0.1
    assert abs(changes["focus_change_phase2"]) < 0.1 and abs(changes["confusion_change_phase2"]) < 0.1


def test_long_prefixes_keep_moving_past_the_embedders_window(distant_labels):
    """MiniLM reads 256 word pieces; a prefix beyond that must still change its embedding."""
    from analyses.methods.embed import embed_texts

    head = "Candidates: S72.001 fracture of unspecified part of neck of right femur. " * 25  # > 256 pieces
    tail = "Acute systolic heart failure, short of breath, low ejection fraction. " * 25
    a, b = embed_texts([head, head + tail])
    assert a @ b < 0.95


def test_bare_codes_are_rendered_and_described_codes_left_alone(heart_labels):
    parser = TraceParser(heart_labels, match_texts=False)
    rendered = render_codes("Candidates: I50.22, I50.21.", parser)
    assert "I50.22 chronic systolic" in rendered and "I50.21 acute systolic" in rendered
    written = "Check I50.21 acute systolic (congestive) heart failure: acute noted -> keep."
    assert render_codes(written, parser).count("acute systolic") == 1
    assert render_codes("no codes here", parser) == "no codes here"


def test_rendering_is_what_lets_the_embedder_see_near_misses(heart_labels):
    """Without rendering, bare codes carry no meaning for MiniLM: the same CoT moves Confusion far less."""
    from analyses.methods.embed import embed_texts

    near = embed_texts([heart_labels.texts[heart_labels.id_of(c)] for c in NEAR]).mean(0)
    near /= np.linalg.norm(near)
    bare = "Candidates: I50.22, I50.23, I50.20."
    parser = TraceParser(heart_labels, match_texts=False)
    raw, rendered = embed_texts([bare, render_codes(bare, parser)])
    assert rendered @ near > raw @ near + 0.3

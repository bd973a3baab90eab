"""The embedded note generator (DESIGN §5): short clinical notes with known gold codes and evidence.

Each note is built from 1-4 gold codes. Gold evidence is a phrase taken from the code's description
or one of its inclusion terms, placed in a clinical sentence; distractors name other codes under a
negation, as past history or as family history, so that they are present in the text but not
codable. The generator records, per note, the gold codes, the anchor spans (character offsets of the
gold evidence), the near-miss codes (hierarchy siblings of the gold codes plus lexical neighbours)
and, for each gold code, the words that separate it from its closest near-miss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer

from probes.errors import input_error
from analyses.tasks.labels import LabelSpace, lower_first, normalize_text, text_variants as _variants

__all__ = ["NoteGenerator", "NoteConfig"]


_GOLD_TEMPLATES = (
    "Presents with {p}.",
    "Diagnosed with {p}.",
    "Findings consistent with {p}.",
    "Assessment: {p}.",
    "Known {p}, on treatment.",
    "Workup confirms {p}.",
    "Admitted for {p}.",
)
_DISTRACTOR_TEMPLATES = {
    "negated": ("Denies {p}.", "No evidence of {p}.", "Negative for {p}."),
    "history": ("History of {p}, resolved.", "Past history of {p}, resolved."),
    "family": ("Family history of {p}.", "Mother had {p}."),
}
_SETTINGS = ("clinic", "the emergency department", "the ward", "follow-up", "urgent care")


@dataclass(frozen=True)
class NoteConfig:
    """Knobs of the generator; written into the run's manifest."""

    n_docs: int = 1000
    seed: int = 0
    min_gold: int = 1
    max_gold: int = 4
    gold_count_weights: tuple[float, ...] = (0.35, 0.35, 0.2, 0.1)
    max_distractors: int = 2
    distractor_rate: float = 0.7
    near_miss_siblings: int = 8
    near_miss_neighbours: int = 4
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)


class NoteGenerator:
    """Generates notes over one label space; neighbour indexes are built once per generator."""

    def __init__(self, labels: LabelSpace, config: NoteConfig = NoteConfig()):
        if len(labels) < 2:
            raise input_error(f"label space {labels.name}", "the note generator needs at least 2 labels", "choose a larger label space")
        self.labels = labels
        self.config = config
        norm_texts = [normalize_text(t) for t in labels.texts]
        self._vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
        self._tfidf = self._vectorizer.fit_transform(norm_texts)
        self._words = [set(t.split()) for t in norm_texts]
        # Evidence phrases must name exactly one label of the space, or a note would be ambiguous.
        owners: dict[str, set[int]] = {}
        variants = [_variants(labels.texts[i], labels.aliases[i]) for i in range(len(labels))]
        for i, vs in enumerate(variants):
            for v in vs:
                owners.setdefault(normalize_text(v), set()).add(i)
        self._phrases = [
            [v for v in vs if owners[normalize_text(v)] == {i}] or [labels.texts[i]] for i, vs in enumerate(variants)
        ]

    # -- near-misses ---------------------------------------------------------------------------
    def lexical_neighbours(self, label_id: int, k: int, exclude: set[int] = frozenset()) -> list[int]:
        """The ``k`` labels whose text is most similar (TF-IDF cosine) to ``label_id``'s."""
        sims = (self._tfidf @ self._tfidf[label_id].T).toarray().ravel()
        sims[label_id] = -np.inf
        for j in exclude:
            sims[j] = -np.inf
        top = np.argpartition(-sims, min(k, len(sims) - 1))[: k + 1]
        ordered = top[np.argsort(-sims[top], kind="stable")]
        return [int(j) for j in ordered if np.isfinite(sims[j])][:k]

    def near_misses(self, gold: list[int]) -> tuple[list[int], dict[int, int]]:
        """Near-miss set N(x) and, per gold label, its closest near-miss (the one it is told apart from)."""
        gold_set = set(gold)
        result: list[int] = []
        closest: dict[int, int] = {}
        for g in gold:
            siblings = [s for s in self.labels.siblings(g) if s not in gold_set]
            if siblings:
                sims = (self._tfidf[siblings] @ self._tfidf[g].T).toarray().ravel()
                siblings = [siblings[j] for j in np.argsort(-sims, kind="stable")][: self.config.near_miss_siblings]
            neighbours = self.lexical_neighbours(g, self.config.near_miss_neighbours, exclude=gold_set | set(siblings))
            ranked = siblings + neighbours
            if ranked:
                closest[g] = ranked[0]
            for j in ranked:
                if j not in result:
                    result.append(j)
        return result, closest

    def decisive_words(self, gold: int, contrast: int | None, phrase: str) -> list[str]:
        """Words of the gold evidence that its closest near-miss's description lacks."""
        words = normalize_text(phrase).split()
        if contrast is None:
            return []
        other = self._words[contrast]
        return list(dict.fromkeys(w for w in words if w not in other))

    # -- notes ---------------------------------------------------------------------------------
    def note(self, rng: np.random.Generator) -> dict:
        cfg = self.config
        n_labels = len(self.labels)
        weights = np.asarray(cfg.gold_count_weights[: cfg.max_gold - cfg.min_gold + 1], dtype=float)
        n_gold = int(rng.choice(np.arange(cfg.min_gold, cfg.min_gold + len(weights)), p=weights / weights.sum()))
        gold: list[int] = []
        parents: set[str] = set()
        # Two siblings are never both gold (acute and chronic of the same thing would contradict).
        for _ in range(50 * n_gold):
            if len(gold) == n_gold:
                break
            g = int(rng.integers(n_labels))
            parent = self.labels.parents[g]
            if g in gold or (parent is not None and parent in parents):
                continue
            gold.append(g)
            if parent is not None:
                parents.add(parent)
        near_miss, closest = self.near_misses(gold)

        sex = "male" if rng.random() < 0.5 else "female"
        header = f"{int(rng.integers(18, 95))}-year-old {sex} seen in {_SETTINGS[rng.integers(len(_SETTINGS))]}."
        sentences: list[tuple[str, dict | None]] = []
        evidence = []
        for g in gold:
            options = self._phrases[g]
            phrase = lower_first(options[int(rng.integers(len(options)))])
            template = _GOLD_TEMPLATES[int(rng.integers(len(_GOLD_TEMPLATES)))]
            sentences.append((template, {"kind": "gold", "label_id": g, "phrase": phrase}))
            contrast = closest.get(g)
            evidence.append(
                {
                    "label_id": g,
                    "phrase": phrase,
                    "contrast": -1 if contrast is None else contrast,
                    "decisive": self.decisive_words(g, contrast, phrase),
                }
            )
        n_distract = int(rng.integers(0, cfg.max_distractors + 1)) if rng.random() < cfg.distractor_rate else 0
        pool = [j for j in near_miss if j not in gold]
        for _ in range(n_distract):
            # Half the distractors are near-misses (hard), half random labels (easy).
            if pool and rng.random() < 0.5:
                d = pool.pop(int(rng.integers(len(pool))))
            else:
                d = int(rng.integers(n_labels))
                if d in gold:
                    continue
            kind = ("negated", "history", "family")[int(rng.integers(3))]
            options = self._phrases[d]
            phrase = lower_first(options[int(rng.integers(len(options)))])
            templates = _DISTRACTOR_TEMPLATES[kind]
            sentences.append((templates[int(rng.integers(len(templates)))], {"kind": kind, "label_id": d, "phrase": phrase}))
        order = rng.permutation(len(sentences))
        text = header
        anchors, distractors = [], []
        for idx in order:
            template, info = sentences[idx]
            before, after = template.split("{p}")
            start = len(text) + 1 + len(before)
            text = f"{text} {before}{info['phrase']}{after}"
            span = {"label_id": info["label_id"], "start": start, "end": start + len(info["phrase"])}
            if info["kind"] == "gold":
                anchors.append(span)
            else:
                distractors.append({**span, "kind": info["kind"]})
        return {
            "text": text,
            "gold": gold,
            "anchors": anchors,
            "near_miss": near_miss,
            "evidence": evidence,
            "distractors": distractors,
        }

    def generate(self, n_docs: int | None = None, seed: int | None = None) -> pd.DataFrame:
        """``n_docs`` distinct notes with columns ``doc_id``, ``split``, ``text``, ``gold`` and the records."""
        cfg = self.config
        n_docs = cfg.n_docs if n_docs is None else n_docs
        rng = np.random.default_rng(cfg.seed if seed is None else seed)
        rows, seen = [], set()
        attempts = 0
        while len(rows) < n_docs:
            attempts += 1
            if attempts > 20 * n_docs + 100:
                raise input_error(f"label space {self.labels.name}", f"could only make {len(rows)} distinct notes from {len(self.labels)} labels", "ask for fewer notes or a larger label space")
            note = self.note(rng)
            if note["text"] in seen:  # splits must share no note: keep texts distinct
                continue
            seen.add(note["text"])
            rows.append(note)
        frame = pd.DataFrame(rows)
        frame.insert(0, "doc_id", [f"note-{i:06d}" for i in range(len(frame))])
        fractions = np.asarray(cfg.split_fractions, dtype=float)
        cuts = np.floor(np.cumsum(fractions / fractions.sum()) * len(frame)).astype(int)
        split = np.empty(len(frame), dtype=object)
        order = rng.permutation(len(frame))
        split[order[: cuts[0]]] = "train"
        split[order[cuts[0] : cuts[1]]] = "dev"
        split[order[cuts[1] :]] = "test"
        frame.insert(1, "split", split)
        return frame

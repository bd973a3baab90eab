import pytest

from analyses.tasks.icd10 import icd10cm_labels, icd10cm_listing_count
from analyses.tasks.labels import LabelSpace, normalize_text
from analyses.tasks.notes import NoteConfig, NoteGenerator
from probes.errors import CtdInputError


@pytest.fixture(scope="module")
def full():
    return icd10cm_labels()


@pytest.fixture(scope="module")
def circulatory():
    return icd10cm_labels(chapters=["9"])


def test_icd10cm_counts(full):
    assert icd10cm_listing_count() == 74_724
    # Five codes are listed twice (as a block and as a category): labels are distinct codes.
    assert len(full) == 74_719
    assert len(set(full.codes)) == len(full)


def test_icd10cm_texts_aliases_and_hierarchy(full):
    i = full.id_of("I50.22")
    assert full.texts[i] == "Chronic systolic (congestive) heart failure"
    assert full.parents[i] == "I50.2"
    sib = {full.codes[j] for j in full.siblings(i)}
    assert sib == {"I50.20", "I50.21", "I50.23"}
    assert "Mild intermittent asthma NOS" in full.aliases[full.id_of("J45.20")]  # get_inclusion_term
    assert "acquired immune deficiency syndrome [AIDS]" in full.aliases[full.id_of("B20")]  # get_includes
    assert full.extra["chapter"][i] == "9" and full.extra["block"][i] == "I30-I5A"
    assert full.parents[full.id_of("B20")] is None  # listed as its own parent: no parent


def test_icd10cm_subsets(circulatory):
    assert len(circulatory) == 1427
    assert all(c.startswith("I") for c in circulatory.codes)
    assert len(icd10cm_labels(chapters=["I00-I99"])) == 1427
    block = icd10cm_labels(blocks=["I30-I5A"])
    assert "I50.22" in block and "I10" not in block
    assert set(icd10cm_labels(categories=["I50"]).codes) >= {"I50.22", "I50.9"}
    with pytest.raises(CtdInputError, match="unknown chapter '23'"):
        icd10cm_labels(chapters=["23"])
    with pytest.raises(CtdInputError, match="unknown block"):
        icd10cm_labels(blocks=["I50"])


def test_unknown_code_names_where(circulatory):
    with pytest.raises(CtdInputError, match=r"notes\.csv:7: unknown label code 'Z99\.999'"):
        circulatory.id_of("Z99.999", where="notes.csv", line=7)


def test_labels_parquet_round_trip(circulatory, tmp_path):
    path = circulatory.save(tmp_path / "labels.parquet")
    import pandas as pd

    frame = pd.read_parquet(path)
    assert list(frame.columns[:4]) == ["label_id", "code", "text", "parent"]
    back = LabelSpace.load(path)
    assert back.codes == circulatory.codes and back.texts == circulatory.texts
    assert back.parents == circulatory.parents and back.aliases == circulatory.aliases
    assert back.name == circulatory.name


@pytest.fixture(scope="module")
def notes(circulatory):
    return NoteGenerator(circulatory, NoteConfig(seed=7)).generate(400)


def test_notes_are_seeded(circulatory, notes):
    again = NoteGenerator(circulatory, NoteConfig(seed=7)).generate(400)
    assert again["text"].tolist() == notes["text"].tolist()
    other = NoteGenerator(circulatory, NoteConfig(seed=8)).generate(50)
    assert other["text"].tolist() != notes["text"].head(50).tolist()


def test_notes_records_are_consistent(circulatory, notes):
    for _, row in notes.iterrows():
        gold = list(row["gold"])
        assert 1 <= len(gold) <= 4 and len(set(gold)) == len(gold)
        parents = [circulatory.parents[g] for g in gold]
        assert len(set(parents)) == len(parents), "two siblings are never both gold"
        assert sorted(a["label_id"] for a in row["anchors"]) == sorted(gold)
        for a in row["anchors"]:
            span = row["text"][a["start"] : a["end"]]
            assert normalize_text(span) in {normalize_text(t) for t in _variants_of(circulatory, a["label_id"])}
        near = set(row["near_miss"])
        assert not near & set(gold)
        for g in gold:
            assert set(circulatory.siblings(g)[:1]) <= near | set(gold) or len(circulatory.siblings(g)) > 8
        for ev in row["evidence"]:
            words = set(normalize_text(ev["phrase"]).split())
            assert set(ev["decisive"]) <= words
        for d in row["distractors"]:
            assert d["label_id"] not in gold and d["kind"] in {"negated", "history", "family"}
            assert row["text"][d["start"] : d["end"]]


def _variants_of(space, i):
    from analyses.tasks.labels import text_variants as _variants

    return _variants(space.texts[i], space.aliases[i])


def test_sibling_evidence_is_told_apart(circulatory, notes):
    # I50.22 (chronic systolic) vs its siblings: the decisive words name what differs.
    gen = NoteGenerator(circulatory)
    g = circulatory.id_of("I50.22")
    near, closest = gen.near_misses([g])
    assert {circulatory.codes[j] for j in near} >= {"I50.20", "I50.21", "I50.23"}
    words = gen.decisive_words(g, circulatory.id_of("I50.21"), "chronic systolic heart failure")
    assert words == ["chronic"]


def test_splits_share_no_note(notes):
    assert notes["text"].is_unique
    by_split = {s: set(notes.loc[notes.split == s, "text"]) for s in ("train", "dev", "test")}
    assert not by_split["train"] & by_split["test"] and not by_split["train"] & by_split["dev"]
    counts = notes["split"].value_counts()
    assert counts["train"] == 320 and counts["dev"] == 40 and counts["test"] == 40


def test_notes_carry_distractors_of_each_kind(notes):
    kinds = {d["kind"] for ds in notes["distractors"] for d in ds}
    assert kinds == {"negated", "history", "family"}
    texts = " ".join(notes["text"])
    for cue in ("Denies", "History of", "Family history of"):
        assert cue in texts


def test_the_organism_fixture_shares_no_note_with_the_default_runs_dev_notes():
    """Boundary settings are tuned on the default run's dev notes; the fixture that tests them
    must not contain any of them (nor of the notes the organism was trained on)."""
    from analyses.machinery.settings import RunConfig
    import json

    from analyses.models.organism import OrganismConfig, default_organism_path, organism_notes
    from analyses.models.organism.training import TRAINING_NOTE_SEED_OFFSET
    from analyses.tasks.sources import load_dataset
    from tests.conftest import FIXTURE_DATA_OPTIONS, FIXTURE_NOTE_SEED

    default = RunConfig()
    tuned_on = load_dataset(default.data.source, seed=default.seed, **default.data.options).split("dev").head(100)  # the dev traces of a default run
    fixture = load_dataset("icd10cm", seed=FIXTURE_NOTE_SEED, **FIXTURE_DATA_OPTIONS).docs
    assert len(tuned_on) == 100
    assert not set(fixture["text"]) & set(tuned_on["text"])
    # every note the shipped organism was trained and checked on, from its own record (40,400)
    meta = json.loads((default_organism_path() / "ctd_organism.json").read_text())
    config = OrganismConfig(**meta["config"])
    _, trained_on = organism_notes(config)
    assert meta["note_seed"] == TRAINING_NOTE_SEED_OFFSET + config.seed
    assert len(trained_on) == config.n_train_docs + 2 * config.n_eval_docs
    shared = fixture[fixture["text"].isin(set(trained_on["text"]))]
    assert shared.empty, f"the fixture shares {len(shared)} note(s) with the organism's notes, e.g. {shared['doc_id'].iloc[0]}: pick another FIXTURE_NOTE_SEED"

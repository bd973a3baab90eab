"""Dataset sources, registered by name: ``icd10cm``, ``xc-repo``, ``mimic-iv-icd10``, ``jsonl``.

A source turns a path (or nothing, for the embedded default) into a :class:`Dataset`: a label space
plus a documents table with ``doc_id``, ``split``, ``text`` and ``gold`` (label ids). Every problem
with the input is a one-line ``CtdInputError`` naming the file, the line and the fix.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from analyses.machinery.io import read_parquet, write_json, write_parquet
from analyses.tasks.labels import LabelSpace
from probes.errors import input_error

__all__ = ["Dataset", "SOURCES", "register_source", "load_dataset", "apply_filter"]

SPLITS = ("train", "dev", "test")


@dataclass
class Dataset:
    """A label space and its documents.

    Attributes:
        name: the source name and options, e.g. ``"icd10cm"``.
        labels: the label space; ``docs.gold`` holds its label ids.
        docs: one row per document: ``doc_id``, ``split`` (train/dev/test), ``text``, ``gold``
            (list of label ids), and source-specific columns (anchors, near_miss, ...).
        filters: per split, an int array [pairs, 2] of (row within that split, label id) that must
            be removed from predictions before top-k (the XC repository's reciprocal-pair files).
        info: provenance (paths, options) for the manifest.
    """

    name: str
    labels: LabelSpace
    docs: pd.DataFrame
    filters: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        missing = [c for c in ("doc_id", "split", "text", "gold") if c not in self.docs.columns]
        if missing:
            raise input_error(f"dataset {self.name}", f"documents lack column(s) {missing}", "give every document doc_id, split, text and gold")
        bad = set(self.docs["split"]) - set(SPLITS)
        if bad:
            raise input_error(f"dataset {self.name}", f"unknown split(s) {sorted(bad)}", f"use {SPLITS}")

    def near_misses(self, doc_id: str) -> list[int]:
        """The document's near-miss labels N(x) (empty when the source records none)."""
        rows = self.docs[self.docs["doc_id"] == doc_id]
        if rows.empty:
            raise input_error(f"dataset {self.name}", f"no document {doc_id!r}", "use a doc_id from this dataset's docs")
        return near_misses_of(rows.iloc[0])

    def split(self, name: str) -> pd.DataFrame:
        return self.docs[self.docs["split"] == name].reset_index(drop=True)

    def gold_matrix(self, split: str | None = None) -> sp.csr_matrix:
        """0/1 CSR matrix [docs, labels] of the split's gold labels (all docs when ``split`` is None)."""
        rows = self.docs if split is None else self.split(split)
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(g) for g in rows["gold"]])
        indices = np.concatenate([np.asarray(g, dtype=np.int64) for g in rows["gold"]] or [np.zeros(0, np.int64)])
        data = np.ones(len(indices), dtype=np.float32)
        matrix = sp.csr_matrix((data, indices, indptr), shape=(len(rows), len(self.labels)))
        matrix.sum_duplicates()
        matrix.data[:] = 1.0
        return matrix

    def label_counts(self, split: str = "train") -> np.ndarray:
        """How many documents of ``split`` carry each label (for propensity-scored metrics)."""
        return np.asarray(self.gold_matrix(split).sum(axis=0)).ravel().astype(np.int64)

    def save(self, run_dir: str | Path) -> None:
        """Write ``labels.parquet`` and ``docs.parquet`` (and ``filters.json`` when there are filters)."""
        run_dir = Path(run_dir)
        self.labels.save(run_dir / "labels.parquet")
        docs = self.docs.copy()
        docs["gold"] = [list(map(int, g)) for g in docs["gold"]]
        write_parquet(docs, run_dir / "docs.parquet", metadata={"ctd_dataset": json.dumps({"name": self.name, **self.info}, default=str)})
        if self.filters:
            write_json({k: v.tolist() for k, v in self.filters.items()}, run_dir / "filters.json")

    @classmethod
    def load(cls, run_dir: str | Path) -> "Dataset":
        run_dir = Path(run_dir)
        labels = LabelSpace.load(run_dir / "labels.parquet")
        docs_path = run_dir / "docs.parquet"
        docs, meta = read_parquet(docs_path, required=("doc_id", "split", "text", "gold"), with_metadata=True)
        for col in ("gold", "near_miss"):
            if col in docs:
                docs[col] = [_label_ids(docs_path, col, row, value, len(labels)) for row, value in enumerate(docs[col])]
        if docs["doc_id"].isna().any() or docs["doc_id"].duplicated().any():
            raise input_error(docs_path, "doc_id has missing or repeated values", "rewrite the file with Dataset.save")
        bad_text = [i for i, t in enumerate(docs["text"]) if not isinstance(t, str)]
        if bad_text:
            raise input_error(docs_path, f"row {bad_text[0]}: text is not a string", "rewrite the file with Dataset.save")
        info = json.loads(meta.get("ctd_dataset", "{}"))
        filters = {}
        if (run_dir / "filters.json").exists():
            from analyses.machinery.io import read_json

            filters = {k: np.asarray(v, dtype=np.int64).reshape(-1, 2) for k, v in read_json(run_dir / "filters.json").items()}
        return cls(name=info.pop("name", "unknown"), labels=labels, docs=docs, filters=filters, info=info)


def near_misses_of(doc) -> list[int]:
    """A document row's near-miss label ids (a pandas row or a dict; empty when not recorded)."""
    value = doc["near_miss"] if "near_miss" in doc else None
    return [] if value is None else [int(n) for n in value]


def _label_ids(path: Path, column: str, row: int, value, n_labels: int) -> list[int]:
    """A list of label ids in [0, n_labels) from a parquet cell, or an input error naming the row."""
    try:
        ids = [int(v) for v in value] if isinstance(value, (list, tuple, np.ndarray)) else None
        exact = ids is not None and all(float(a) == float(b) for a, b in zip(ids, value))
    except (TypeError, ValueError, OverflowError):
        ids, exact = None, False
    if not exact:
        raise input_error(path, f"row {row}: {column} is not a list of label ids ({str(value)[:40]!r})", "rewrite the file with Dataset.save")
    out_of_range = [i for i in ids if not 0 <= i < n_labels]
    if out_of_range:
        raise input_error(path, f"row {row}: {column} holds label id {out_of_range[0]}, outside 0..{n_labels - 1} of labels.parquet", "the docs and labels files do not belong together")
    return ids


SourceLoader = Callable[..., Dataset]
SOURCES: dict[str, SourceLoader] = {}


def register_source(name: str) -> Callable[[SourceLoader], SourceLoader]:
    """Register ``fn(path: Path | None, **options) -> Dataset`` under ``name``."""

    def decorate(fn: SourceLoader) -> SourceLoader:
        SOURCES[name] = fn
        return fn

    return decorate


def load_dataset(source: str, path: str | Path | None = None, **options) -> Dataset:
    """Load a dataset by source name (see ``SOURCES``)."""
    if source not in SOURCES:
        raise input_error(None, f"unknown dataset source {source!r}", f"use one of {sorted(SOURCES)}")
    return SOURCES[source](None if path is None else Path(path), **options)


def apply_filter(scores, pairs: np.ndarray):
    """Remove (row, label) ``pairs`` from a score matrix so they can never rank (returns CSR).

    The XC repository's ``filter_labels_*.txt`` files list reciprocal pairs (a document that is
    also a label) that evaluation must drop before taking the top k.
    """
    matrix = sp.csr_matrix(scores, dtype=np.float64, copy=True)
    if len(pairs) == 0:
        return matrix
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    coo = matrix.tocoo()
    drop = set(zip(pairs[:, 0].tolist(), pairs[:, 1].tolist()))
    keep = np.fromiter(((r, c) not in drop for r, c in zip(coo.row.tolist(), coo.col.tolist())), dtype=bool, count=coo.nnz)
    return sp.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=matrix.shape)


# --------------------------------------------------------------------------------------------------
# helpers


def _require_dir(path: Path | None, source: str, expected: str) -> Path:
    if path is None:
        raise input_error(None, f"source {source!r} needs a folder", f"pass the folder holding {expected}")
    if not path.exists():
        raise input_error(path, "folder not found", f"pass the folder holding {expected}")
    if not path.is_dir():
        raise input_error(path, "not a folder", f"pass the folder holding {expected}")
    return path


def _find(folder: Path, stems: tuple[str, ...], suffixes: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for suffix in suffixes:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a malformed line is a CtdInputError."""
    try:
        with _open_text(path) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise input_error(path, f"malformed JSON ({exc.msg})", "fix or remove that line", number) from None
                if not isinstance(obj, dict):
                    raise input_error(path, "line is not a JSON object", "write one {...} object per line", number)
                yield number, obj
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise input_error(path, f"cannot read file ({type(exc).__name__}: {exc})", "check that the file is intact") from None


def _text_field(obj: dict, key: str, path: Path, line: int) -> str:
    value = obj.get(key)
    if value is None:
        raise input_error(path, f"missing field {key!r}", f"add a {key!r} string to that line", line)
    if not isinstance(value, str):
        raise input_error(path, f"field {key!r} is {type(value).__name__}, not a string", "make it a string", line)
    return value


def _nonempty(text: str, path: Path, line: int, on_empty: str) -> bool:
    if text.strip():
        return True
    if on_empty == "drop":
        return False
    raise input_error(path, "empty document text", "remove the row, or load with on_empty='drop' to skip such rows", line)


# --------------------------------------------------------------------------------------------------
# icd10cm: the embedded default


@register_source("icd10cm")
def load_icd10cm(
    path: Path | None = None,
    chapters=None,
    blocks=None,
    categories=None,
    n_docs: int | None = None,
    seed: int = 0,
    **note_options,
) -> Dataset:
    """ICD-10-CM billable codes (optionally a subset) and generated notes over them.

    ``path``, when given, is a folder with ``labels.parquet`` and ``docs.parquet`` written by
    :meth:`Dataset.save` (a frozen copy of generated notes); otherwise notes are generated.
    """
    from analyses.tasks.icd10 import icd10cm_labels
    from analyses.tasks.notes import NoteConfig, NoteGenerator

    if path is not None:
        return Dataset.load(_require_dir(path, "icd10cm", "labels.parquet and docs.parquet"))
    from analyses.machinery.settings import DEFAULT_N_NOTES

    labels = icd10cm_labels(chapters=chapters, blocks=blocks, categories=categories)
    config = NoteConfig(n_docs=DEFAULT_N_NOTES if n_docs is None else n_docs, seed=seed, **note_options)
    docs = NoteGenerator(labels, config).generate()
    from dataclasses import asdict

    return Dataset(name="icd10cm", labels=labels, docs=docs, info={"label_space": labels.name, "notes": asdict(config)})


# --------------------------------------------------------------------------------------------------
# xc-repo: Extreme Classification Repository raw-text files


def _read_filter(path: Path, n_rows: int, n_labels: int) -> np.ndarray:
    pairs = []
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not all(p.lstrip("-").isdigit() for p in parts):
                raise input_error(path, f"expected 'row col' integers, got {line.strip()!r}", "fix that line", number)
            row, col = int(parts[0]), int(parts[1])
            if not (0 <= row < n_rows):
                raise input_error(path, f"row {row} out of range (the split has {n_rows} documents)", "fix that line or use the filter file of this split", number)
            if not (0 <= col < n_labels):
                raise input_error(path, f"label index {col} out of range (there are {n_labels} labels)", "fix that line or use the matching lbl file", number)
            pairs.append((row, col))
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


@register_source("xc-repo")
def load_xc_repo(path: Path | None, on_empty: str = "error", text_fields: tuple[str, ...] = ("title", "content")) -> Dataset:
    """A folder of XC repository raw-text files (LF-Amazon-131K, LF-WikiSeeAlso-320K, ...).

    Files: ``trn.json(.gz)`` and ``tst.json(.gz)`` rows ``{"uid", "title", "content", "target_ind",
    "target_rel"}``, ``lbl.json(.gz)`` rows ``{"uid", "title", "content"}``, and optional
    ``filter_labels_train.txt`` / ``filter_labels_test.txt`` (``row col`` per line).
    """
    folder = _require_dir(path, "xc-repo", "trn.json.gz, tst.json.gz and lbl.json.gz")
    suffixes = (".json.gz", ".json", ".jsonl.gz", ".jsonl")
    files = {key: _find(folder, (stem,), suffixes) for key, stem in (("labels", "lbl"), ("train", "trn"), ("test", "tst"))}
    for key, stem in (("labels", "lbl"), ("train", "trn"), ("test", "tst")):
        if files[key] is None:
            raise input_error(folder / f"{stem}.json.gz", "file not found", f"put the XC repository's {stem}.json.gz in {folder}")

    codes, texts = [], []
    for number, obj in _json_lines(files["labels"]):
        uid = obj.get("uid", str(len(codes)))
        title = obj.get("title")
        if not isinstance(title, str) or not title.strip():
            raise input_error(files["labels"], "label without a 'title' text", "give every label a non-empty title", number)
        codes.append(str(uid))
        texts.append(title.strip())
    if not codes:
        raise input_error(files["labels"], "no labels", "the lbl file must hold one label per line")
    if len(set(codes)) != len(codes):
        # Some releases repeat uids across labels: the row index is the label's identity.
        codes = [f"{i}" for i in range(len(codes))]
    labels = LabelSpace(name=f"xc-repo:{folder.name}", codes=codes, texts=texts)

    rows = []
    n_per_split = {}
    for split in ("train", "test"):
        n = 0
        for number, obj in _json_lines(files[split]):
            parts = [obj.get(f) for f in text_fields]
            for f, value in zip(text_fields, parts):
                if value is not None and not isinstance(value, str):
                    raise input_error(files[split], f"field {f!r} is {type(value).__name__}, not a string", "make it a string", number)
            text = "\n".join(p.strip() for p in parts if p and p.strip())
            target = obj.get("target_ind")
            if not isinstance(target, list):
                raise input_error(files[split], "missing or non-list 'target_ind'", "give each row a list of label indices", number)
            for t in target:
                if isinstance(t, bool) or not isinstance(t, int):
                    raise input_error(files[split], f"target_ind entry {t!r} is not an integer", "use integer label indices", number)
                if not 0 <= t < len(labels):
                    raise input_error(files[split], f"label index {t} out of range (lbl file has {len(labels)} labels)", "fix the index or use the matching lbl file", number)
            if not _nonempty(text, files[split], number, on_empty):
                continue
            rel = obj.get("target_rel")
            rows.append(
                {
                    "doc_id": str(obj.get("uid", f"{split}-{number}")),
                    "split": split,
                    "text": text,
                    "gold": sorted(set(target)),
                    "target_rel": [float(r) for r in rel] if isinstance(rel, list) and len(rel) == len(target) else None,
                }
            )
            n += 1
        n_per_split[split] = n
    docs = pd.DataFrame(rows, columns=["doc_id", "split", "text", "gold", "target_rel"])
    if docs.empty:
        raise input_error(files["train"], "no documents in the trn and tst files", "check that the files hold one JSON row per document")
    if docs["doc_id"].duplicated().any():
        docs["doc_id"] = [f"{s}-{i}" for s, i in zip(docs["split"], docs.groupby("split").cumcount())]
    filters = {}
    for split, stem in (("train", "filter_labels_train"), ("test", "filter_labels_test")):
        fpath = _find(folder, (stem,), (".txt", ".txt.gz"))
        if fpath is not None:
            filters[split] = _read_filter(fpath, n_per_split[split], len(labels))
    return Dataset(name="xc-repo", labels=labels, docs=docs, filters=filters, info={"path": str(folder)})


# --------------------------------------------------------------------------------------------------
# mimic-iv-icd10: credentialed notes in the common preprocessed layouts


def _icd10cm_code(raw: str) -> str | None:
    """Canonical dotted ICD-10-CM code for ``raw`` ("I5022" or "I50.22"), or None if not a code.

    Chapters ("1") and blocks ("A00-A09") are valid items of the package but not codes.
    """
    import simple_icd_10_cm as cm

    stripped = raw.strip().upper().replace(".", "")
    if not stripped or not cm.is_valid_item(stripped) or cm.is_chapter_or_block(stripped):
        return None
    return cm.add_dot(stripped)


def _read_table(path: Path) -> pd.DataFrame:
    try:
        if path.suffix == ".feather":
            return pd.read_feather(path)
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise input_error(path, f"cannot read table ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", "check that the file is intact") from None


def _pick(frame: pd.DataFrame, path: Path, names: tuple[str, ...], what: str) -> str:
    for name in names:
        if name in frame.columns:
            return name
    raise input_error(path, f"no {what} column (looked for {list(names)})", f"rename the {what} column to {names[0]!r}")


def _code_list(value, path: Path, line: int) -> list[str]:
    if isinstance(value, str):
        parts = [p for p in value.replace(",", ";").replace("|", ";").split(";")]
    elif isinstance(value, (list, tuple, np.ndarray)):
        parts = [str(p) for p in value]
    elif value is None or (isinstance(value, float) and np.isnan(value)):
        parts = []
    else:
        raise input_error(path, f"codes are {type(value).__name__}, not a list or ';'-separated string", "write codes as 'I50.22;E11.9'", line)
    return [p.strip() for p in parts if p.strip()]


@register_source("mimic-iv-icd10")
def load_mimic_iv_icd10(path: Path | None, unknown_codes: str = "error", on_empty: str = "error") -> Dataset:
    """MIMIC-IV ICD-10 coding (users supply the credentialed files).

    Layouts accepted in the folder:
    - ``mimiciv_icd10.feather`` (or .parquet/.csv) with ``_id``, ``text``, ``target`` (or
      ``icd10_diag``) plus ``mimiciv_icd10_split.feather`` with ``_id``, ``split``
      (the medical-coding reproducibility layout);
    - ``train*.csv``, ``dev*.csv`` or ``val*.csv``, ``test*.csv`` with ``TEXT`` and ``LABELS``
      (';'-separated; the CAML-style layout).
    Codes are matched to ICD-10-CM with or without the dot. ``unknown_codes="keep"`` keeps codes that
    are not ICD-10-CM (e.g. ICD-10-PCS procedures) as labels whose text is the code.
    """
    import simple_icd_10_cm as cm

    folder = _require_dir(path, "mimic-iv-icd10", "mimiciv_icd10.feather (+ _split) or train/dev/test CSVs")
    tables: list[tuple[Path, pd.DataFrame, str | None]] = []
    main = _find(folder, ("mimiciv_icd10",), (".feather", ".parquet", ".csv"))
    if main is not None:
        frame = _read_table(main)
        split_path = _find(folder, ("mimiciv_icd10_split",), (".feather", ".parquet", ".csv"))
        if split_path is None and "split" not in frame.columns:
            raise input_error(folder / "mimiciv_icd10_split.feather", "file not found", "add the split file (columns _id, split)")
        if split_path is not None:
            splits = _read_table(split_path)
            id_col = _pick(frame, main, ("_id", "hadm_id", "note_id"), "document id")
            sid = _pick(splits, split_path, (id_col, "_id"), "document id")
            _pick(splits, split_path, ("split",), "split")
            mapping = dict(zip(splits[sid].astype(str), splits["split"].astype(str)))
            frame = frame.assign(split=[mapping.get(str(i)) for i in frame[id_col]])
            unmatched = frame["split"].isna()
            if unmatched.any():
                first = frame.loc[unmatched, id_col].iloc[0]
                raise input_error(split_path, f"{int(unmatched.sum())} document(s) have no split (e.g. {id_col}={first})", "add them to the split file")
        tables.append((main, frame, None))
    else:
        for split, stems in (("train", ("train_full", "train")), ("dev", ("dev_full", "dev", "val_full", "val")), ("test", ("test_full", "test"))):
            csv = _find(folder, stems, (".csv", ".csv.gz"))
            if csv is None:
                raise input_error(folder / f"{stems[0]}.csv", "file not found", "supply mimiciv_icd10.feather + split file, or train/dev/test CSVs")
            tables.append((csv, _read_table(csv), split))

    label_index: dict[str, int] = {}
    codes: list[str] = []
    rows = []
    split_names = {"train": "train", "val": "dev", "valid": "dev", "validation": "dev", "dev": "dev", "test": "test"}
    for file, frame, fixed_split in tables:
        text_col = _pick(frame, file, ("text", "TEXT"), "note text")
        label_col = _pick(frame, file, ("target", "icd10_diag", "LABELS", "labels", "icd10"), "code list")
        id_col = next((c for c in ("_id", "note_id", "hadm_id", "HADM_ID") if c in frame.columns), None)
        for i, record in enumerate(frame.to_dict("records")):
            line = i + 2 if file.suffix in (".csv", ".gz") else i + 1  # CSV: header is line 1
            text = record[text_col]
            if not isinstance(text, str):
                raise input_error(file, f"note text is {type(text).__name__}", "make the text column a string", line)
            if not _nonempty(text, file, line, on_empty):
                continue
            gold = []
            for raw in _code_list(record[label_col], file, line):
                code = _icd10cm_code(raw)
                if code is None:
                    if unknown_codes != "keep":
                        raise input_error(file, f"unknown ICD-10-CM code {raw!r}", "fix the code, or load with unknown_codes='keep' to keep non-CM codes", line)
                    code = raw.strip().upper()
                if code not in label_index:
                    label_index[code] = len(codes)
                    codes.append(code)
                gold.append(label_index[code])
            split = fixed_split or split_names.get(str(record["split"]).lower())
            if split is None:
                raise input_error(file, f"unknown split {record['split']!r}", "use train, val/dev or test", line)
            rows.append(
                {
                    "doc_id": str(record[id_col]) if id_col else f"{file.stem}-{i}",
                    "split": split,
                    "text": text,
                    "gold": sorted(set(gold)),
                }
            )
    texts, parents = [], []
    for code in codes:
        if cm.is_valid_item(code):
            texts.append(cm.get_description(code))
            parents.append(cm.get_parent(code) or None)
        else:
            texts.append(code)
            parents.append(None)
    labels = LabelSpace(name="mimic-iv-icd10", codes=codes, texts=texts, parents=parents)
    docs = pd.DataFrame(rows, columns=["doc_id", "split", "text", "gold"])
    return Dataset(name="mimic-iv-icd10", labels=labels, docs=docs, info={"path": str(folder)})


# --------------------------------------------------------------------------------------------------
# jsonl: the generic layout


@register_source("jsonl")
def load_jsonl(path: Path | None, on_empty: str = "error") -> Dataset:
    """A folder with ``labels.jsonl`` (``{"id", "text"}``), ``train.jsonl`` and ``test.jsonl``
    (``{"id", "text", "labels": [label ids]}``), and optionally ``dev.jsonl``."""
    folder = _require_dir(path, "jsonl", "labels.jsonl, train.jsonl and test.jsonl")
    label_file = folder / "labels.jsonl"
    if not label_file.is_file():
        raise input_error(label_file, "file not found", f"write one {{\"id\", \"text\"}} per line to {label_file.name}")
    codes, texts = [], []
    seen: dict[str, int] = {}
    for number, obj in _json_lines(label_file):
        if "id" not in obj:
            raise input_error(label_file, "missing field 'id'", "give every label an id", number)
        code = str(obj["id"])
        if code in seen:
            raise input_error(label_file, f"label id {code!r} repeats line {seen[code]}", "make label ids unique", number)
        seen[code] = number
        text = _text_field(obj, "text", label_file, number)
        codes.append(code)
        texts.append(text)
    if not codes:
        raise input_error(label_file, "no labels", "write one label per line")
    labels = LabelSpace(name=f"jsonl:{folder.name}", codes=codes, texts=texts)
    rows = []
    seen_docs: dict[str, str] = {}
    for split in SPLITS:
        file = folder / f"{split}.jsonl"
        if not file.is_file():
            if split == "dev":
                continue
            raise input_error(file, "file not found", f"write one {{\"id\", \"text\", \"labels\"}} per line to {file.name}")
        for number, obj in _json_lines(file):
            if "id" not in obj:
                raise input_error(file, "missing field 'id'", "give every document an id", number)
            text = _text_field(obj, "text", file, number)
            raw = obj.get("labels")
            if not isinstance(raw, list):
                raise input_error(file, "missing or non-list 'labels'", "give each document a list of label ids", number)
            gold = [labels.id_of(str(code), where=file, line=number) for code in raw]
            doc_id = str(obj["id"])
            if doc_id in seen_docs:
                raise input_error(file, f"document id {doc_id!r} already used at {seen_docs[doc_id]}", "make document ids unique across splits", number)
            seen_docs[doc_id] = f"{file.name}:{number}"
            if not _nonempty(text, file, number, on_empty):
                continue
            rows.append({"doc_id": doc_id, "split": split, "text": text, "gold": sorted(set(gold))})
    docs = pd.DataFrame(rows, columns=["doc_id", "split", "text", "gold"])
    return Dataset(name="jsonl", labels=labels, docs=docs, info={"path": str(folder)})

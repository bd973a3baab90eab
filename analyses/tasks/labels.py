"""The label space every source produces: ids, codes, texts, aliases and optional parent links."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd

from probes.errors import input_error

__all__ = ["LabelSpace", "normalize_text", "text_variants", "short_description", "lower_first"]

_NON_WORD = re.compile(r"[^a-z0-9]+")
_PAREN = re.compile(r"\s*\([^()]*\)")
_BRACKET = re.compile(r"\s*\[[^\[\]]*\]")


def normalize_text(text: str) -> str:
    """Lower-case, drop punctuation and brackets, collapse spaces: the form label texts are matched in."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def text_variants(text: str, aliases: list[str] = ()) -> list[str]:
    """Surface forms of a label: its text and aliases, each also without parentheticals
    ("(congestive)"), bracketed acronyms ("[HFrEF]") and "NOS" (ICD's nonessential modifiers)."""
    out: list[str] = []
    for source in (text, *aliases):
        for candidate in (source, _BRACKET.sub("", _PAREN.sub("", source))):
            candidate = " ".join(candidate.replace(" NOS", "").split()).strip(" ,;")
            if candidate and candidate not in out:
                out.append(candidate)
    return out


def lower_first(phrase: str) -> str:
    """Lower-case the first letter, as a phrase reads inside a sentence; acronyms and words with
    digits ("HIV", "ST elevation", "2") keep their case."""
    first = phrase.split(" ", 1)[0]
    if len(first) > 1 and (first.isupper() or any(ch.isdigit() for ch in first)):
        return phrase
    return phrase[:1].lower() + phrase[1:]


def short_description(text: str) -> str:
    """A label's short description as a reasoning trace writes it after the code
    ("I50.21 acute systolic heart failure"): the text without ICD's nonessential modifiers
    (parentheticals, bracketed acronyms, "NOS"), first letter lower-cased."""
    short = " ".join(_BRACKET.sub("", _PAREN.sub("", text)).replace(" NOS", "").split()).strip(" ,;")
    return lower_first(short or text)


@dataclass(frozen=True)
class LabelSpace:
    """A label space L. Label ``i`` has ``codes[i]``, ``texts[i]``, ``aliases[i]``, ``parents[i]``.

    ``parents`` holds the code of each label's parent node in the hierarchy (which need not be a
    label itself: ICD-10-CM parents are non-billable categories) or ``None`` for flat spaces.
    Labels with the same non-null parent are siblings.
    """

    name: str
    codes: list[str]
    texts: list[str]
    aliases: list[list[str]] = field(default_factory=list)
    parents: list[str | None] = field(default_factory=list)
    extra: dict[str, list] = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.codes)
        if not self.aliases:
            object.__setattr__(self, "aliases", [[] for _ in range(n)])
        if not self.parents:
            object.__setattr__(self, "parents", [None] * n)
        for name, column in [("texts", self.texts), ("aliases", self.aliases), ("parents", self.parents)]:
            if len(column) != n:
                raise input_error(f"label space {self.name}", f"{name} has {len(column)} entries for {n} codes", "give one entry per code")
        for name, column in self.extra.items():
            if len(column) != n:
                raise input_error(f"label space {self.name}", f"extra column {name!r} has {len(column)} entries for {n} codes", "give one entry per code")
        if len(set(self.codes)) != n:
            seen: set[str] = set()
            dup = next(c for c in self.codes if c in seen or seen.add(c))
            raise input_error(f"label space {self.name}", f"code {dup!r} appears twice", "make the codes unique")

    def __len__(self) -> int:
        return len(self.codes)

    @cached_property
    def _index(self) -> dict[str, int]:
        return {code: i for i, code in enumerate(self.codes)}

    @cached_property
    def _children(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, parent in enumerate(self.parents):
            if parent is not None:
                groups[parent].append(i)
        return dict(groups)

    def __contains__(self, code: str) -> bool:
        return code in self._index

    def id_of(self, code: str, where: str | Path | None = None, line: int | None = None) -> int:
        """Label id of ``code``; an unknown code is a ``CtdInputError`` naming ``where``."""
        try:
            return self._index[code]
        except KeyError:
            raise input_error(
                where or f"label space {self.name}",
                f"unknown label code {code!r}",
                f"use one of the {len(self)} codes of {self.name} (e.g. {self.codes[0]!r})",
                line,
            ) from None

    def siblings(self, label_id: int) -> list[int]:
        """Other labels under the same parent (empty for flat spaces)."""
        parent = self.parents[label_id]
        if parent is None:
            return []
        return [j for j in self._children[parent] if j != label_id]

    def subset(self, label_ids, name: str | None = None) -> "LabelSpace":
        """A new space with the given labels, renumbered 0..n-1 in the given order."""
        ids = list(label_ids)
        return LabelSpace(
            name=name or f"{self.name}[{len(ids)}]",
            codes=[self.codes[i] for i in ids],
            texts=[self.texts[i] for i in ids],
            aliases=[list(self.aliases[i]) for i in ids],
            parents=[self.parents[i] for i in ids],
            extra={k: [v[i] for i in ids] for k, v in self.extra.items()},
        )

    def to_frame(self) -> pd.DataFrame:
        """``labels.parquet`` layout: ``label_id``, ``code``, ``text``, ``parent``, ``aliases``, extras."""
        frame = pd.DataFrame(
            {
                "label_id": range(len(self)),
                "code": self.codes,
                "text": self.texts,
                "parent": pd.Series(self.parents, dtype="string"),
                "aliases": self.aliases,
            }
        )
        for key, column in self.extra.items():
            frame[key] = column
        return frame

    def save(self, path: str | Path) -> Path:
        """Write ``labels.parquet`` (atomically) with the space's name in the file's metadata."""
        from analyses.machinery.io import write_parquet

        return write_parquet(self.to_frame(), path, metadata={"ctd_label_space": json.dumps({"name": self.name})})

    @classmethod
    def load(cls, path: str | Path) -> "LabelSpace":
        """Read a ``labels.parquet`` written by :meth:`save` (or any file with the same columns)."""
        from analyses.machinery.io import read_parquet

        path = Path(path)
        frame, metadata = read_parquet(path, required=("label_id", "code", "text", "parent"), with_metadata=True)
        expected = list(range(len(frame)))
        if frame["label_id"].tolist() != expected:
            raise input_error(path, "label_id is not 0..n-1 in order", "rewrite the file with LabelSpace.save")
        name = json.loads(metadata.get("ctd_label_space", "{}")).get("name", path.stem)
        aliases = [list(a) if a is not None else [] for a in frame["aliases"]] if "aliases" in frame else []
        core = {"label_id", "code", "text", "parent", "aliases"}
        extra = {c: frame[c].tolist() for c in frame.columns if c not in core}
        parents = [None if pd.isna(p) else str(p) for p in frame["parent"]]
        return cls(
            name=name,
            codes=[str(c) for c in frame["code"]],
            texts=[str(t) for t in frame["text"]],
            aliases=aliases,
            parents=parents,
            extra=extra,
        )

"""ICD-10-CM from the ``simple-icd-10-cm`` package: billable leaves, texts, inclusion terms, hierarchy."""

from __future__ import annotations

from functools import lru_cache

from analyses.tasks.labels import LabelSpace
from probes.errors import input_error

__all__ = ["icd10cm_labels", "icd10cm_listing_count", "icd10cm_chapters"]


def _cm():
    import simple_icd_10_cm as cm

    return cm


def _is_billable(cm, code: str) -> bool:
    # A billable code is a leaf that is a (sub)category or a 7th-character extension; a few blocks
    # with no children are leaves too but are never billable.
    return cm.is_leaf(code) and (cm.is_category_or_subcategory(code) or cm.is_extended_subcategory(code))


def icd10cm_listing_count() -> int:
    """How many billable entries the package lists (74,724 in the April 2026 release).

    Five codes (B20, F99, P84, R99, Z66) are listed twice, once as a block and once as a category,
    so the label space has five labels fewer than this count.
    """
    cm = _cm()
    return sum(1 for code in cm.get_all_codes(True) if _is_billable(cm, code))


@lru_cache(maxsize=1)
def _full_space() -> LabelSpace:
    cm = _cm()
    codes: list[str] = []
    seen: set[str] = set()
    for code in cm.get_all_codes(True):
        if code in seen or not _is_billable(cm, code):
            continue
        seen.add(code)
        codes.append(code)
    texts, aliases, parents, chapters, blocks = [], [], [], [], []
    for code in codes:
        texts.append(cm.get_description(code))
        # Both kinds of synonym the package carries: inclusion terms and "includes" notes.
        terms = list(dict.fromkeys([*cm.get_inclusion_term(code), *cm.get_includes(code)]))
        aliases.append(terms)
        ancestors = cm.get_ancestors(code)
        parent = cm.get_parent(code)
        parents.append(None if parent == code else parent)
        chapters.append(ancestors[-1])
        blocks.append(next((a for a in ancestors if cm.is_block(a) and a != code), ancestors[-1]))
    return LabelSpace(
        name="icd10cm",
        codes=codes,
        texts=texts,
        aliases=aliases,
        parents=parents,
        extra={"chapter": chapters, "block": blocks},
    )


def icd10cm_chapters() -> dict[str, str]:
    """Chapter number -> description, e.g. ``'9' -> 'Diseases of the circulatory system (I00-I99)'``."""
    cm = _cm()
    return {c: cm.get_description(c) for c in cm.get_all_codes(True) if cm.is_chapter(c)}


def icd10cm_labels(chapters=None, blocks=None, categories=None) -> LabelSpace:
    """Billable ICD-10-CM codes, optionally restricted to chapters, blocks or 3-character categories.

    Args:
        chapters: chapter numbers (``"9"``) or their code ranges (``"I00-I99"``).
        blocks: block ranges such as ``"I30-I5A"``.
        categories: 3-character categories such as ``"I50"``.
    """
    space = _full_space()
    if not chapters and not blocks and not categories:
        return space
    cm = _cm()
    wanted_chapters: set[str] = set()
    ranges = {desc.rsplit("(", 1)[-1].rstrip(")"): num for num, desc in icd10cm_chapters().items()}
    for item in chapters or []:
        item = str(item).strip()
        if item in ranges:
            item = ranges[item]
        if not (cm.is_valid_item(item) and cm.is_chapter(item)):
            raise input_error("icd10cm", f"unknown chapter {item!r}", "use a chapter number 1-22 or a range like I00-I99")
        wanted_chapters.add(item)
    for name, values, check in [("block", blocks, cm.is_block), ("category", categories, cm.is_category)]:
        for item in values or []:
            if not (cm.is_valid_item(item) and check(item)):
                raise input_error("icd10cm", f"unknown {name} {item!r}", f"use an ICD-10-CM {name} code (see `ctd data show icd10cm`)")
    wanted_nodes = set(blocks or []) | set(categories or [])
    keep = []
    for i, code in enumerate(space.codes):
        if space.extra["chapter"][i] in wanted_chapters:
            keep.append(i)
        elif wanted_nodes and (wanted_nodes & set(cm.get_ancestors(code)) or code[:3] in wanted_nodes):
            keep.append(i)
    parts = [f"ch{c}" for c in sorted(wanted_chapters, key=int)] + sorted(wanted_nodes)
    return space.subset(keep, name=f"icd10cm[{','.join(parts)}]")

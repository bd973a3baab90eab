"""Plain-text summaries of datasets (``ctd data show``)."""

from __future__ import annotations

import textwrap

import numpy as np

from analyses.tasks.sources import Dataset

__all__ = ["dataset_summary"]


def dataset_summary(dataset: Dataset, n_examples: int = 3, width: int = 100) -> str:
    """Counts, label-frequency statistics and ``n_examples`` documents, as printable text."""
    labels, docs = dataset.labels, dataset.docs
    lines = [f"source: {dataset.name}   label space: {labels.name}"]
    if dataset.name == "icd10cm":
        from analyses.tasks.icd10 import icd10cm_listing_count

        listed = icd10cm_listing_count()
        lines.append(
            f"ICD-10-CM billable codes listed by simple-icd-10-cm: {listed:,} "
            f"({listed - 5:,} distinct: B20, F99, P84, R99, Z66 are listed as block and category)"
        )
    n_parent = sum(p is not None for p in labels.parents)
    n_alias = sum(bool(a) for a in labels.aliases)
    lines.append(f"labels: {len(labels):,}   with a parent: {n_parent:,}   with aliases: {n_alias:,}")
    counts = docs["split"].value_counts()
    lines.append("documents: " + "   ".join(f"{s}={int(counts.get(s, 0)):,}" for s in ("train", "dev", "test")) + f"   total={len(docs):,}")
    if len(docs):
        per_doc = np.array([len(g) for g in docs["gold"]])
        freq = np.asarray(dataset.gold_matrix().sum(axis=0)).ravel()
        seen = freq[freq > 0]
        lines.append(
            f"labels per document: mean {per_doc.mean():.2f}, median {np.median(per_doc):.0f}, max {per_doc.max()}"
            f"   documents without labels: {int((per_doc == 0).sum())}"
        )
        if len(seen):
            tail = (seen <= 5).mean()
            lines.append(
                f"label frequency: {len(seen):,} labels occur ({len(seen) / len(labels):.1%} of the space); "
                f"documents per occurring label mean {seen.mean():.2f}, median {np.median(seen):.0f}, max {int(seen.max())}; "
                f"tail (<= 5 documents): {tail:.1%}"
            )
            top = np.argsort(-freq, kind="stable")[:5]
            lines.append("most frequent: " + "; ".join(f"{labels.codes[i]} ({int(freq[i])})" for i in top if freq[i] > 0))
        lengths = docs["text"].str.split().str.len()
        lines.append(f"document length (words): mean {lengths.mean():.1f}, max {lengths.max()}")
    for split, count in ((s, len(v)) for s, v in dataset.filters.items()):
        lines.append(f"filter pairs ({split}): {count:,} (removed from predictions before top-k)")
    for _, row in docs.head(n_examples).iterrows():
        gold = ", ".join(f"{labels.codes[g]}" for g in row["gold"])
        lines.append(f"\n[{row['doc_id']}] ({row['split']}) gold: {gold}")
        lines.extend(textwrap.wrap(row["text"][:600], width=width, initial_indent="  ", subsequent_indent="  "))
    return "\n".join(lines)

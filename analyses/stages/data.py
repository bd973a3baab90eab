"""The ``data`` stage (the first of ``ctd run``): the run's label space and documents
(``labels.parquet``, ``docs.parquet``) from a dataset source (:mod:`analyses.tasks.sources`)."""

from __future__ import annotations

import sys

from analyses.machinery.protocol import Stage, StageContext, register_stage
from analyses.tasks.sources import load_dataset

__all__ = ["compute"]


def compute(ctx: StageContext):
    settings = ctx.settings
    options = dict(settings.options)
    if settings.source == "icd10cm":
        options.setdefault("seed", ctx.config.seed)
    else:
        options = {k: v for k, v in options.items() if k not in ("chapters", "n_docs")}
    dataset = load_dataset(settings.source, settings.path, **options)
    dataset.save(ctx.run_dir)
    ctx.record["counts"] = {"labels": len(dataset.labels), "docs": int(len(dataset.docs))}
    ctx.facts["dataset"] = {"name": dataset.name, **dataset.info}
    print(f"[data] {len(dataset.labels):,} labels, {len(dataset.docs):,} documents -> {ctx.run_dir}", file=sys.stderr)
    return None


register_stage(Stage("data", "data", (), ("labels.parquet", "docs.parquet"), compute, "the label space and the documents"))

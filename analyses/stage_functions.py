"""The ``compute`` of each built-in stage: read the run, call the stage's module, return results.

Each takes a :class:`~analyses.stages.StageContext` and never writes the manifest: the runner
(:func:`analyses.stages.run_stage`) records and saves. Facts the run keeps beyond the stage
(which model, which dataset) go into ``ctx.facts``; counts into ``ctx.record``.
"""

from __future__ import annotations

import sys

from analyses.methods.prompts import run_template
from analyses.stages import StageContext

__all__ = ["data", "traces", "capture", "characterize", "patch", "isolate", "distill", "report"]


def data(ctx: StageContext):
    from analyses.tasks.sources import load_dataset

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


def traces(ctx: StageContext):
    from analyses.tasks.sources import Dataset
    from analyses.traces import _template_for, default_dev_docs, make_traces, resolve_model_path

    settings = ctx.settings
    model_dir = resolve_model_path(ctx.config.model)
    dataset = Dataset.load(ctx.run_dir)
    n_dev = default_dev_docs(model_dir, settings.template) if settings.n_dev_docs is None else settings.n_dev_docs
    if ctx.config.quick:
        n_dev = min(n_dev, 20)
    ctx.facts["model"] = {"path": str(model_dir.resolve())}
    ctx.record["template"] = _template_for(model_dir, settings.template).name
    make_traces(ctx.run_dir, dataset, model_dir, settings.split, settings.n_docs, n_dev, settings.template, settings.generation, ctx.progress, ctx.record, from_file=settings.from_file)
    return None


def capture(ctx: StageContext):
    from analyses.capture_stage import capture_traces

    root = capture_traces(ctx.run_dir, ctx.model_path, ctx.settings, ctx.progress, model=ctx.model, record=ctx.record)
    if ctx.record.get("model_info"):
        ctx.facts["model"] = {**ctx.manifest.data.get("model", {}), **ctx.record.pop("model_info")}
    return None if root is None else None


def characterize(ctx: StageContext):
    from analyses.characterize import characterize

    results = characterize(ctx.run_dir, ctx.model_path, ctx.settings, ctx.progress, model=ctx.model, record=ctx.record)
    if ctx.progress:
        print(f"[characterize] {', '.join(f'{s}.parquet' for s in results)} -> {ctx.run_dir}", file=sys.stderr)
    return results


def patch(ctx: StageContext):
    from analyses.patch import patch_run

    return patch_run(ctx.run_dir, ctx.settings, ctx.progress, model=ctx.model, model_path=ctx.model_path, template=run_template(ctx.manifest))


def isolate(ctx: StageContext):
    from analyses.isolate import isolate_run

    result = isolate_run(ctx.run_dir, ctx.settings, ctx.progress, model_path=ctx.model_path, template=run_template(ctx.manifest))
    ctx.record["complementarity"] = result.verdict()
    return result


def distill(ctx: StageContext):
    from analyses.distill import distill_run

    return distill_run(ctx.run_dir, ctx.settings, ctx.progress, model_path=ctx.model_path, template=run_template(ctx.manifest))


def distill_pilot(ctx: StageContext):
    return distill(ctx)


def report(ctx: StageContext):
    from analyses.results.report import write_figures, write_report

    written = write_figures(ctx.run_dir, formats=tuple(ctx.settings.formats))
    path = write_report(ctx.run_dir)
    ctx.record["figures"] = sorted(written)
    print(f"[report] {path} ({len(written)} figures)", file=sys.stderr)
    return None

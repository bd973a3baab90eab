"""Figures for papers and the self-contained ``report.html`` of a run (``ctd run``'s last stage).

One function per figure lives with each result type (``.figure()``); this module gathers them,
writes each as HTML and PNG (PNG needs Chromium for kaleido; without it the HTML is still written
and one line says how to enable PNG), and assembles one offline page with every figure, the key
tables and the manifest.
"""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path

import pandas as pd
import plotly.io as pio

from analyses.io import atomic_path, read_json

__all__ = ["collect_figures", "write_figures", "write_report", "png_available", "characterization_findings"]


def collect_figures(run_dir: str | Path) -> dict[str, object]:
    """Every figure the run's result files support, by name (missing stages are skipped)."""
    from analyses.boundary import Boundary
    from analyses.characterize import Attribution, HeadScores, LensResult, ProbeResults
    from analyses.distill import DistillResult
    from analyses.dynamics import Dynamics
    from analyses.isolate import IsolationResult
    from analyses.patch import PatchingResult

    run_dir = Path(run_dir)
    figures: dict[str, object] = {}

    def have(stem: str) -> bool:
        return (run_dir / f"{stem}.parquet").exists()

    boundary = Boundary.load(run_dir / "boundary.parquet") if have("boundary") else None
    if have("dynamics"):
        figures["dynamics"] = Dynamics.load(run_dir / "dynamics.parquet").figure(boundaries=boundary.medians() if boundary else None)
    if boundary is not None:
        figures["boundary_errors"] = boundary.figure()
    if have("head_scores"):
        figures["head_scores"] = HeadScores.load(run_dir / "head_scores.parquet").figure()
    if have("attribution"):
        attribution = Attribution.load(run_dir / "attribution.parquet")
        figures["kurtosis_map"] = attribution.kurtosis_figure()
        figures["region_attention"] = attribution.figure("mass")
        figures["region_attention_value_weighted"] = attribution.figure("value_mass")
    if have("probes"):
        figures["probes"] = ProbeResults.load(run_dir / "probes.parquet").figure()
    if have("lens"):
        figures["logit_lens"] = LensResult.load(run_dir / "lens.parquet").figure()
    if have("patching"):
        patching = PatchingResult.load(run_dir / "patching.parquet")
        figures["patching_margin"] = patching.figure("margin")
        figures["patching_answer"] = patching.figure("recall")
    if have("isolation"):
        figures["isolation"] = IsolationResult.load(run_dir / "isolation.parquet").figure()
    if have("distill"):
        distill = DistillResult.load(run_dir / "distill.parquet")
        figures["distill"] = distill.figure()
        figures["distill_learning_curves"] = distill.curve_figure()
        figures["distill_mechanism_transfer"] = distill.transfer_figure()
        figures["distill_trajectories"] = distill.trajectory_figure()
    return figures


def png_available() -> bool:
    import shutil

    return any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome", "chrome"))


def write_figures(run_dir: str | Path, formats: tuple[str, ...] = ("html", "png")) -> dict[str, list[Path]]:
    """Write each figure to ``<run>/figures/<name>.<fmt>``; returns the files written per figure."""
    run_dir = Path(run_dir)
    out_dir = run_dir / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = collect_figures(run_dir)
    static = [f for f in formats if f != "html"]
    can_export = png_available()
    if static and not can_export:
        print("[report] no Chromium found: figures written as HTML only; `apt-get install -y chromium` enables PNG/SVG/PDF", file=sys.stderr)
    written: dict[str, list[Path]] = {}
    for name, fig in figures.items():
        files = []
        if "html" in formats:
            with atomic_path(out_dir / f"{name}.html") as tmp:
                # plotly.js is written once beside the figures (offline, and 13 figures share it).
                fig.write_html(str(tmp), include_plotlyjs="directory", full_html=True)
            files.append(out_dir / f"{name}.html")
        if can_export:
            for fmt in static:
                with atomic_path(out_dir / f"{name}.{fmt}") as tmp:
                    fig.write_image(str(tmp), format=fmt, scale=2 if fmt == "png" else 1)
                files.append(out_dir / f"{name}.{fmt}")
        written[name] = files
    return written


def _table(frame: pd.DataFrame, title: str) -> str:
    return f"<h3>{html.escape(title)}</h3>" + frame.to_html(index=False, float_format=lambda x: f"{x:.3f}", border=0, classes="t")


def _fmt_ci(value: float, low: float, high: float, digits: int = 3, percent: bool = False) -> str:
    if percent:
        return f"{100 * value:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def characterization_findings(run_dir: str | Path) -> list[str]:
    """Sentences, each with its number and 95% CI, on what the run's characterisation shows."""
    from analyses.boundary import Boundary
    from analyses.characterize import ProbeResults
    from analyses.dynamics import Dynamics

    run_dir = Path(run_dir)
    out: list[str] = []
    if (run_dir / "boundary.parquet").exists():
        boundary = Boundary.load(run_dir / "boundary.parquet")
        errors = boundary.errors(n_boot=int(boundary.meta.get("n_boot", 1000))).set_index("estimator")
        if "internal" in errors.index:
            e = errors.loc["internal"]
            sentence = f"The internal boundary estimator's median error is {_fmt_ci(e.median_abs_error_frac, e.ci_low, e.ci_high, percent=True)} of the CoT over {int(e.n)} traces"
            for other in ("constant", "fixed", "behavioural"):
                if other in errors.index:
                    o = errors.loc[other]
                    sentence += f"; {other}: {_fmt_ci(o.median_abs_error_frac, o.ci_low, o.ci_high, percent=True)}"
            out.append(sentence + ".")
            if "constant" in errors.index:
                ratio, lo, hi = boundary.ratio("internal", "constant")
                verdict = "at most half" if hi <= 0.5 else "not shown to be at most half"
                out.append(f"Internal over constant (fitted on dev traces, share {boundary.meta.get('constant_share', float('nan')):.3f}): {_fmt_ci(ratio, lo, hi, 2)} ({verdict} of the constant's error, paired bootstrap CI).")
            else:
                out.append(f"No constant baseline: {boundary.meta.get('constant_fitted_on', 'not fitted')}.")
    if (run_dir / "probes.parquet").exists():
        probes = ProbeResults.load(run_dir / "probes.parquet")
        f = probes.frame
        for row in probes.beats_tokens().itertuples():
            best = f[(f["target"] == row.target) & (f["status"] == "fitted")].sort_values("minus_tokens", ascending=False).iloc[0]
            out.append(
                f"Probe '{row.target}': beats token identity (CI above 0) in {int(row.beats_tokens)} of {int(row.cells)} fitted cells"
                + (f" ({int(row.not_fitted)} cells not fitted, listed in probes.parquet)" if row.not_fitted else "")
                + f"; best cell L{int(best.layer)} {best.bucket_name}: probe {best.value:.3f} vs tokens {best.token_baseline:.3f}, difference {_fmt_ci(best.minus_tokens, best.minus_tokens_ci_low, best.minus_tokens_ci_high)}; control task {best.control_value:.3f}."
            )
    if (run_dir / "dynamics.parquet").exists():
        changes = Dynamics.load(run_dir / "dynamics.parquet").phase_changes().set_index("metric")
        if len(changes):
            parts = [f"{m.replace('_change_', ' change over ').replace('phase', 'phase ')} {_fmt_ci(r.value, r.ci_low, r.ci_high)}" for m, r in changes.iterrows()]
            out.append("Behavioural dynamics, paired per trace: " + "; ".join(parts) + ".")
    return out


def _key_tables(run_dir: Path) -> list[str]:
    out = []
    if (run_dir / "boundary.parquet").exists():
        from analyses.boundary import Boundary

        boundary = Boundary.load(run_dir / "boundary.parquet")
        errors = boundary.errors(n_boot=int(boundary.meta.get("n_boot", 1000)))
        if not errors.empty:
            out.append(_table(errors, "Phase-boundary error per estimator (median over traces, bootstrap 95% CI)"))
    if (run_dir / "head_scores.parquet").exists():
        scores = pd.read_parquet(run_dir / "head_scores.parquet")
        top = scores[scores["rank"] <= 5].sort_values(["score", "rank"])[["score", "rank", "layer", "head", "value", "ci_low", "ci_high"]]
        out.append(_table(top, "Top heads per phase score (bootstrap 95% CI)"))
    if (run_dir / "isolation.parquet").exists():
        iso = pd.read_parquet(run_dir / "isolation.parquet")
        out.append(_table(iso[iso["metric"].isin(["micro_f1", "verdict", "f1_gain_over_phase1_alone", "f1_gain_over_phase2_alone", "f1_gain_over_retriever_alone"])][["condition", "metric", "value", "ci_low", "ci_high"]], "Isolation and complementarity"))
    if (run_dir / "distill.parquet").exists():
        d = pd.read_parquet(run_dir / "distill.parquet")
        finals = d[(d["seed"] >= 0) & ~d["metric"].str.startswith("curve:")]
        per = finals.groupby(["condition", "metric"])["value"].mean().unstack()
        keep = [c for c in ("micro_f1", "p_at_1", "well_formed", "gold_logprob", "ce_phase1", "ce_phase2", "transfer_kl_phase1", "transfer_kl_phase2", "las", "steps", "seconds_per_step") if c in per]
        out.append(_table(per[keep].reset_index(), "Distillation: mean over seeds"))
        paired = d[d["seed"] < 0]
        columns = [c for c in ("condition", "metric", "value", "ci_low", "ci_high", "p_value", "p_holm") if c in paired]
        if len(paired):
            out.append(_table(paired[columns], "Distillation: paired differences (seed x note bootstrap, 95% CI; ablation family Holm-adjusted)"))
    return out


def write_report(run_dir: str | Path) -> Path:
    """One offline page: every figure (plotly.js embedded once), key tables and the manifest."""
    run_dir = Path(run_dir)
    figures = collect_figures(run_dir)
    parts = []
    first = True
    for name, fig in figures.items():
        parts.append(f'<section id="{name}"><h2>{html.escape(name.replace("_", " "))}</h2>')
        parts.append(pio.to_html(fig, include_plotlyjs="inline" if first else False, full_html=False))
        parts.append("</section>")
        first = False
    manifest = read_json(run_dir / "manifest.json") if (run_dir / "manifest.json").exists() else {}
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ctd report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:Arial,Helvetica,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table.t{{border-collapse:collapse;font-size:13px}} table.t td,table.t th{{padding:3px 8px;border-bottom:1px solid #ddd}}
pre{{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}} section{{margin-bottom:2.5em}}</style></head>
<body><h1>characterize-then-distill: {html.escape(run_dir.name)}</h1>
<p>Model: <code>{html.escape(str(manifest.get("model", {}).get("path", "?")))}</code>. Figures: {len(figures)}. Each number below is computed from this run's files.</p>
<h2>What the characterisation shows</h2><ul>{''.join(f"<li>{html.escape(s)}</li>" for s in characterization_findings(run_dir))}</ul>
{''.join(_key_tables(run_dir))}
{''.join(parts)}
<h2>manifest</h2><pre>{html.escape(json.dumps(manifest, indent=2, default=str))}</pre>
</body></html>
"""
    with atomic_path(run_dir / "report.html") as tmp:
        tmp.write_text(page)
    return run_dir / "report.html"

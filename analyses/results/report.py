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

from analyses.machinery.io import atomic_path, read_json

__all__ = ["collect_figures", "write_figures", "write_report", "png_available", "characterization_findings", "causal_findings", "distill_findings", "FIGURE_GROUPS"]


def collect_figures(run_dir: str | Path) -> dict[str, object]:
    """Every figure the run's result files support, by name (missing stages are skipped)."""
    from analyses.results import AblationResult, Attribution, Boundary, DistillResult, Dynamics, HeadScores, IsolationResult, LensResult, PatchingResult, ProbeResults

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
        figures["causal_map"] = patching.figure()
        figures["scores_vs_causal_effects"] = patching.scatter_figure()
        figures["ranked_vs_random_heads"] = patching.ranked_figure()
    if have("ablation"):
        figures["ablation"] = AblationResult.load(run_dir / "ablation.parquet").figure()
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


def ranking_splits(meta: dict) -> tuple[str, str]:
    """Which traces a patching run ranked heads on and which it measured them on, as its own
    record says (runs written before the record named them say so in ``ranking``)."""
    if "ranked_on" in meta:
        return meta["ranked_on"]["traces"], meta.get("measured_on", {}).get("traces", "test traces")
    ranking = str(meta.get("ranking", ""))
    ranked = "test traces" if "on test traces" in ranking else "dev traces" if "on dev traces" in ranking else "traces of unrecorded split"
    return ranked, f"{meta.get('n_traces', 'the')} test traces"


def causal_findings(run_dir: str | Path) -> list[str]:
    """Sentences on the phases' causal separation: heads (patching) and positions (isolation)."""
    run_dir = Path(run_dir)
    out: list[str] = []
    if (run_dir / "patching.parquet").exists():
        from analyses.results import PatchingResult

        patching = PatchingResult.load(run_dir / "patching.parquet")
        s = patching.summary
        ranked_on, measured_on = ranking_splits(patching.meta)
        if "test" in ranked_on:
            out.append(f"Heads were ranked on {ranked_on}, the traces their effects are measured on: the score-effect comparisons below are circular.")
        base = s[(s["analysis"] == "baseline") & (s["readout"] == "answer_logprob")]
        if len(base):
            b = base.iloc[0]
            out.append(f"Corrupting the note's evidence moves the gold answer-code log-prob from {b.clean:.2f} to {b.corrupt:.2f} nats (gap {_fmt_ci(b.value, b.ci_low, b.ci_high, 2)}) over {measured_on}.")
            gap = patching.meta.get("gap", {}).get("answer_logprob")
            if gap:
                out.append(f"The gap is concentrated: median {gap['median']:.3f} nats per trace, and the 5 traces with the largest gaps carry {100 * gap['share_of_summed_gap_in_top_5_traces']:.0f}% of the summed gap that pooled recovery and damage are ratios of.")
        reliability = s[(s["analysis"] == "reliability") & (s["readout"] == "answer_logprob")]
        if len(reliability):
            out.append("Each causal map against itself (Spearman over heads between two random halves of the traces, median of 200 splits [2.5%, 97.5%]): " + "; ".join(f"{r.mode} {_fmt_ci(r.value, r.ci_low, r.ci_high, 2)}" for r in reliability.itertuples()) + "; a map that does not reproduce cannot rank heads, so correlations with it say little.")
        corr = patching.correlations()
        for score in ("coarse", "refine"):
            parts = []
            for mode in ("denoise", "noise"):
                r = corr[(corr["score"] == score) & (corr["mode"] == mode) & (corr["readout"] == "answer_logprob") & (corr["metric"] == "spearman")]
                if len(r):
                    r = r.iloc[0]
                    parts.append(f"{'recovery' if mode == 'denoise' else 'damage'} ρ = {_fmt_ci(r.value, r.ci_low, r.ci_high, 2)}, p = {r.p_value:.3f}")
            if parts:
                out.append(f"{score.capitalize()}Score ranked on {ranked_on} against each head's causal effect on {measured_on}: " + "; ".join(parts) + ".")
        ranked = s[(s["analysis"] == "ranked_minus_random") & (s["readout"] == "answer_logprob") & (s["mode"] == "denoise")]
        for score, g in ranked.groupby("score"):
            # every k, not the best one: picking the k after seeing the CIs would be a forking path
            out.append(f"Top-k {score} heads minus k random heads (recovery), " + "; ".join(f"k = {int(r.k)}: {_fmt_ci(r.value, r.ci_low, r.ci_high)}" for r in g.sort_values("k").itertuples()) + ".")
        agree = s[(s["analysis"] == "agreement") & (s["readout"] == "answer_logprob")]
        if len(agree):
            out.append("Attribution patching against the one-head sweep, Spearman over heads: " + "; ".join(f"{r.mode} " + (_fmt_ci(r.value, r.ci_low, r.ci_high, 2) if not pd.isna(r.ci_low) else f"{r.value:.2f}") for r in agree.itertuples()) + ".")
    if (run_dir / "ablation.parquet").exists():
        ab = pd.read_parquet(run_dir / "ablation.parquet")
        names = {"shortlist_recall": "shortlist recall", "answer_micro_f1": "answer micro-F1", "near_miss_kept": "near-misses kept", "boundary_share": "boundary share"}
        for score, g in ab.groupby("score", sort=False):
            k = int(g["k"].max())
            parts = []
            for metric in ("shortlist_recall", "answer_micro_f1"):
                cell = g[(g["k"] == k) & (g["metric"] == metric)].set_index("head_set")
                if "ranked" in cell.index:
                    parts.append(f"{names[metric]} {_fmt_ci(cell.loc['ranked', 'value'], cell.loc['ranked', 'ci_low'], cell.loc['ranked', 'ci_high'])}" + "".join(f" ({kind} k: {_fmt_ci(cell.loc[kind, 'value'], cell.loc[kind, 'ci_low'], cell.loc[kind, 'ci_high'])})" for kind in ("random", "lowest") if kind in cell.index))
            if parts:
                out.append(f"Mean-ablating the top {k} {'CoarseScore' if score == 'coarse' else 'RefineScore'} heads (ranked on dev) while the model regenerates its CoT and answer changes, paired per trace: " + "; ".join(parts) + ".")
    if (run_dir / "isolation.parquet").exists():
        iso = pd.read_parquet(run_dir / "isolation.parquet")
        c = iso[iso["condition"] == "complementarity"].set_index("metric")
        if len(c):
            out.append(
                f"Complementarity: {'shown' if c.loc['verdict', 'value'] == 1 else 'not shown'}; full model minus phase 1 alone {_fmt_ci(c.loc['f1_gain_over_phase1_alone', 'value'], c.loc['f1_gain_over_phase1_alone', 'ci_low'], c.loc['f1_gain_over_phase1_alone', 'ci_high'])} micro-F1, minus phase 2 alone {_fmt_ci(c.loc['f1_gain_over_phase2_alone', 'value'], c.loc['f1_gain_over_phase2_alone', 'ci_low'], c.loc['f1_gain_over_phase2_alone', 'ci_high'])}."
            )
    return out


def distill_findings(run_dir: str | Path) -> list[str]:
    """Sentences on the distillation study's headline, budget and mechanism transfer."""
    run_dir = Path(run_dir)
    if not (run_dir / "distill.parquet").exists():
        return []
    from analyses.results import DistillResult

    d = DistillResult.load(run_dir / "distill.parquet")
    out = []
    finals = d.finals.groupby(["condition", "metric"])["value"].mean().unstack()
    seeds = d.finals["seed"].nunique()
    if "standard" in finals.index and "micro_f1" in finals:
        out.append(f"Standard students reach micro-F1 {finals.loc['standard', 'micro_f1']:.3f} (mean of {seeds} seeds) on {d.meta['config']['n_eval_docs']} held-out notes after {int(finals.loc['standard', 'steps'])} steps from the student base.")
    diffs = d.differences.set_index(["condition", "metric"])
    for (condition, metric), label in ((("mechanistic", "micro_f1_minus_standard"), "Mechanistic minus standard micro-F1"), (("mechanistic", "micro_f1_minus_standard_equal_compute"), "Mechanistic minus standard at equal compute"), (("mechanistic", "gold_logprob_minus_standard"), "Mechanistic minus standard gold-code log-prob"), (("mechanistic", "transfer_kl_phase1_minus_standard"), "Mechanistic minus standard attention KL to the teacher (phase-1 heads)"), (("mechanistic", "transfer_kl_phase2_minus_standard"), "Mechanistic minus standard attention KL to the teacher (phase-2 heads)")):
        if (condition, metric) in diffs.index:
            r = diffs.loc[(condition, metric)]
            out.append(f"{label}: {_fmt_ci(r.value, r.ci_low, r.ci_high)} (paired by seed and note, p = {r.p_value:.3f}).")
    return out


def characterization_findings(run_dir: str | Path) -> list[str]:
    """Sentences, each with its number and 95% CI, on what the run's characterisation shows."""
    from analyses.results import Boundary
    from analyses.results import ProbeResults
    from analyses.results import Dynamics

    run_dir = Path(run_dir)
    out: list[str] = []
    if (run_dir / "boundary.parquet").exists():
        boundary = Boundary.load(run_dir / "boundary.parquet")
        errors = boundary.errors(n_boot=int(boundary.meta.get("n_boot", 1000))).set_index("estimator")
        if "internal" in errors.index:
            e = errors.loc["internal"]
            sentence = f"The internal boundary estimator's median error is {_fmt_ci(e.median_abs_error_frac, e.ci_low, e.ci_high, percent=True)} of the CoT over {int(e.n)} traces (mean {_fmt_ci(e.mean_abs_error_frac, e.mean_ci_low, e.mean_ci_high, percent=True)}, exact on {100 * e.share_exact:.0f}% of traces)"
            for other in ("tokens", "text_probe", "internal_unsupervised", "constant", "fixed", "behavioural"):
                if other in errors.index:
                    o = errors.loc[other]
                    sentence += f"; {other}: {_fmt_ci(o.median_abs_error_frac, o.ci_low, o.ci_high, percent=True)} (mean {100 * o.mean_abs_error_frac:.1f}%, exact {100 * o.share_exact:.0f}%)"
            out.append(sentence + ".")
            text = [b for b in ("tokens", "text_probe") if b in errors.index]
            if text:  # the stronger text-only baseline: the lower median error (mean breaks ties)
                best = min(text, key=lambda b: (errors.loc[b, "median_abs_error_frac"], errors.loc[b, "mean_abs_error_frac"]))
                names = {"tokens": "the two-token lookup", "text_probe": "the 16-token text probe"}
                ratio, lo, hi = boundary.ratio("internal", best)
                verdict = "at most half of it" if hi <= 0.5 else "not shown to be at most half of it"
                if errors.loc[best, "median_abs_error_frac"] == 0:
                    out.append(f"The stronger text-only baseline ({names[best]}) places the median trace's boundary exactly: the text gives the boundary away, and no internal estimator can be shown to beat it here.")
                else:
                    out.append(f"Against the stronger text-only baseline ({names[best]}, median error {100 * errors.loc[best, 'median_abs_error_frac']:.1f}% of the CoT), internal over text: {_fmt_ci(ratio, lo, hi, 2)} ({verdict}, paired bootstrap CI).")
                if errors.loc[best, "mean_abs_error_frac"] <= e.mean_abs_error_frac:
                    out.append(f"Text alone ({names[best]}, fitted on dev) locates the boundary at least as well as the internal estimator: on this model the boundary is marked in the text, so the internal estimate shows only that the internals carry what the text says.")
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
        dynamics = Dynamics.load(run_dir / "dynamics.parquet")
        gaps = dynamics.phase_gaps().set_index("metric")
        if len(gaps):
            names = {"gap_phase1": "phase 1", "gap_phase2": "phase 2", "gap_phase2_minus_phase1": "phase 2 minus phase 1"}
            out.append("Confusion minus Focus, averaged within each phase and paired per trace: " + "; ".join(f"{names[m]} {_fmt_ci(r.value, r.ci_low, r.ci_high)}" for m, r in gaps.iterrows() if m in names) + ".")
        separation = dynamics.meta.get("separation") or {}
        own, other = separation.get("gold_vs_near_miss_cosine"), separation.get("gold_vs_other_notes_near_miss_cosine")
        if own:
            sentence = f"The embedder puts gold and near-miss descriptions at cosine {_fmt_ci(*own)}"
            sentence += f" (gold against other notes' near-misses: {_fmt_ci(*other)})" if other else ""
            change = gaps["value"].get("gap_phase2_minus_phase1") if len(gaps) else None
            flat = change is None or (gaps.loc["gap_phase2_minus_phase1", "ci_low"] <= 0 <= gaps.loc["gap_phase2_minus_phase1", "ci_high"])
            if own[0] >= 0.8 and flat:
                sentence += ": it barely separates a code from its siblings, so Confusion and Focus cannot part here, whatever the CoT does"
            out.append(sentence + ".")
    return out


def _key_tables(run_dir: Path) -> list[str]:
    out = []
    if (run_dir / "boundary.parquet").exists():
        from analyses.results import Boundary

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


FIGURE_GROUPS = {
    "1. Characterize: is the chain of thought two phases, where is the boundary, which heads carry each?": ("dynamics", "boundary_errors", "probes", "head_scores", "kurtosis_map", "region_attention", "region_attention_value_weighted", "logit_lens"),
    "2. Isolate: can the phases be separated, and are they complementary?": ("causal_map", "scores_vs_causal_effects", "ranked_vs_random_heads", "isolation"),
    "3. Distill: does a phase-aware student beat standard CoT distillation?": ("distill", "distill_learning_curves", "distill_mechanism_transfer", "distill_trajectories"),
}


def write_report(run_dir: str | Path) -> Path:
    """One offline page: the three questions of DESIGN §1, each answered in sentences with their
    numbers and CIs, then its figures; key tables and the manifest at the end."""
    run_dir = Path(run_dir)
    figures = collect_figures(run_dir)
    findings = {
        list(FIGURE_GROUPS)[0]: characterization_findings(run_dir),
        list(FIGURE_GROUPS)[1]: causal_findings(run_dir),
        list(FIGURE_GROUPS)[2]: distill_findings(run_dir),
    }
    parts = []
    first = True
    placed: set[str] = set()
    for question, names in FIGURE_GROUPS.items():
        parts.append(f"<h2>{html.escape(question)}</h2>")
        sentences = findings[question] or ["This stage has not run in this run directory."]
        parts.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in sentences) + "</ul>")
        for name in names:
            if name not in figures:
                continue
            placed.add(name)
            parts.append(f'<section id="{name}"><h3>{html.escape(name.replace("_", " "))}</h3>')
            parts.append(pio.to_html(figures[name], include_plotlyjs="inline" if first else False, full_html=False))
            parts.append("</section>")
            first = False
    for name, fig in figures.items():  # anything a group does not name yet
        if name not in placed:
            parts.append(f'<section id="{name}"><h3>{html.escape(name.replace("_", " "))}</h3>')
            parts.append(pio.to_html(fig, include_plotlyjs="inline" if first else False, full_html=False))
            parts.append("</section>")
            first = False
    manifest = read_json(run_dir / "manifest.json") if (run_dir / "manifest.json").exists() else {}
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ctd report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:Arial,Helvetica,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table.t{{border-collapse:collapse;font-size:13px}} table.t td,table.t th{{padding:3px 8px;border-bottom:1px solid #ddd}}
pre{{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}} section{{margin-bottom:2.5em}} li{{margin-bottom:0.4em}}</style></head>
<body><h1>characterize-then-distill: {html.escape(run_dir.name)}</h1>
<p>Model: <code>{html.escape(str(manifest.get("model", {}).get("path", "?")))}</code>. Every number below is computed from this run's files; 95% CIs in brackets.</p>
{''.join(parts)}
<h2>Key tables</h2>
{''.join(_key_tables(run_dir))}
<h2>manifest</h2><pre>{html.escape(json.dumps(manifest, indent=2, default=str))}</pre>
</body></html>
"""
    with atomic_path(run_dir / "report.html") as tmp:
        tmp.write_text(page)
    return run_dir / "report.html"

"""Phase boundary τ per trace: four estimators side by side (DESIGN §2), registered by name.

- ``fixed``: τ = 0.5 of the CoT (the published convention).
- ``constant``: τ = the single share of the CoT that fits dev traces best (the baseline an
  estimator must beat by a wide margin: on traces whose boundary sits at a fixed share, a constant
  matches any estimator).
- ``behavioural``: one change point (ruptures) of the per-token shortlist-growth curve together
  with the Focus and Confusion curves.
- ``internal``: one change point of a per-token multichannel signal read from the model's internals:
  per layer, where its heads look: the attention mass sent to the document, to the model's own
  output so far (the CoT and its label mentions) and to the prompt's scaffolding (optionally also
  the sharpness of attention over the document and principal components of the final residual
  stream). It never sees the true boundary, nor any token or phrase that marks it: the same code
  runs on models whose trace format nobody knows. Its channels and smoothing are chosen on dev
  traces by :func:`tune_internal` (``ctd characterize --run R --tune-boundary``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analyses.figures import ESTIMATOR_COLOURS, themed
from analyses.parsing import Region
from analyses.results import FrameResult
from analyses.tasks.metrics import bootstrap_ci
from probes.errors import input_error
from probes.points import hook_name, reduction_name

__all__ = ["Boundary", "ESTIMATORS", "register_estimator", "change_point", "internal_signal", "behavioural_signal", "estimate_boundaries", "fit_constant_share", "tune_internal", "InternalSettings", "SMOOTHING_GRID"]


class Boundary(FrameResult):
    """``frame`` columns: doc_id, estimator, tau_token, tau_norm, true_token, abs_error_tokens, cot_length."""

    REQUIRED = ("doc_id", "estimator", "tau_token", "tau_norm", "true_token", "abs_error_tokens")

    def medians(self) -> dict[str, float]:
        return self.frame.groupby("estimator")["tau_norm"].median().to_dict()

    def error_fractions(self) -> pd.DataFrame:
        """Per trace and estimator: absolute error as a fraction of the CoT (traces with a known boundary)."""
        f = self.frame.dropna(subset=["abs_error_tokens"])
        return f.assign(frac=f["abs_error_tokens"].astype(float) / f["cot_length"].clip(lower=1))

    def errors(self, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """Median absolute error per estimator (tokens and fraction of the CoT) with a bootstrap
        95% CI over traces of the median fraction."""
        f = self.error_fractions()
        columns = ["estimator", "median_abs_error_tokens", "median_abs_error_frac", "ci_low", "ci_high", "n"]
        if f.empty:
            return pd.DataFrame(columns=columns)
        rows = []
        for estimator, g in f.groupby("estimator", sort=False):
            frac = g["frac"].to_numpy(float)
            _, lo, hi = bootstrap_ci(lambda idx: float(np.median(frac[idx])), n=len(frac), n_boot=n_boot, seed=seed)
            rows.append((estimator, float(g["abs_error_tokens"].median()), float(np.median(frac)), lo, hi, len(g)))
        return pd.DataFrame(rows, columns=columns)

    def ratio(self, estimator: str, baseline: str, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
        """Median error of ``estimator`` over that of ``baseline``, paired by trace: (ratio, CI low,
        CI high); resamples where the baseline's median is 0 (ratio undefined) are left out."""
        f = self.error_fractions().pivot_table(index="doc_id", columns="estimator", values="frac")
        if estimator not in f or baseline not in f:
            return (float("nan"),) * 3
        pair = f[[estimator, baseline]].dropna().to_numpy(float)

        def statistic(idx):
            base = np.median(pair[idx, 1])
            return float(np.median(pair[idx, 0]) / base) if base > 0 else float("nan")

        rng = np.random.default_rng(seed)
        draws = np.array([statistic(rng.integers(0, len(pair), len(pair))) for _ in range(n_boot)])
        draws = draws[np.isfinite(draws)]
        if not len(draws):
            return (statistic(np.arange(len(pair))), float("nan"), float("nan"))
        return (statistic(np.arange(len(pair))), float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975)))

    def figure(self) -> go.Figure:
        """Median error per estimator with its CI, beside the per-trace errors (or τ when no truth is known)."""
        has_truth = self.frame["abs_error_tokens"].notna().any()
        if not has_truth:
            fig = go.Figure()
            for estimator, group in self.frame.groupby("estimator", sort=False):
                fig.add_trace(go.Histogram(x=group["tau_norm"], name=estimator, opacity=0.6, marker_color=ESTIMATOR_COLOURS.get(estimator), xbins=dict(size=0.025)))
            fig.update_layout(barmode="overlay")
            return themed(fig, "Estimated phase boundary per trace (no true boundary known)", "τ (normalised CoT position)", "traces (count)")
        errors = self.errors(n_boot=int(self.meta.get("n_boot", 1000)))
        fig = make_subplots(rows=1, cols=2, column_widths=[0.4, 0.6], subplot_titles=("median |error| (95% CI over traces)", "signed error per trace"))
        fig.add_trace(
            go.Bar(
                x=errors["estimator"], y=errors["median_abs_error_frac"], marker_color=[ESTIMATOR_COLOURS.get(e, "#777") for e in errors["estimator"]],
                error_y=dict(type="data", symmetric=False, array=errors["ci_high"] - errors["median_abs_error_frac"], arrayminus=errors["median_abs_error_frac"] - errors["ci_low"]),
                showlegend=False,
            ),
            row=1, col=1,
        )
        for estimator, group in self.frame.groupby("estimator", sort=False):
            values = (group["tau_token"] - group["true_token"]).astype(float) / group["cot_length"].clip(lower=1)
            fig.add_trace(go.Histogram(x=values, name=estimator, opacity=0.6, marker_color=ESTIMATOR_COLOURS.get(estimator), xbins=dict(size=0.025)), row=1, col=2)
        fig.update_layout(barmode="overlay", width=1000)
        fig = themed(fig, f"Phase-boundary error per estimator (n={errors['n'].max()} traces)", "estimator | estimated − true boundary (fraction of CoT)", "fraction of CoT | traces (count)")
        fig.update_xaxes(title_text="estimator", row=1, col=1)
        fig.update_xaxes(title_text="estimated − true boundary (fraction of CoT length)", row=1, col=2)
        fig.update_yaxes(title_text="median |error| (fraction of CoT)", row=1, col=1)
        fig.update_yaxes(title_text="traces (count)", row=1, col=2)
        return fig



def change_point(signal: np.ndarray, min_size: int = 3, smooth: int = 1) -> int:
    """Index (0-based, into the signal's rows) where the single best break starts.

    Channels are standardised first so that none dominates by scale, optionally smoothed with a
    centred moving average of ``smooth`` tokens (per-token statistics swing with the token type,
    line by line; the phase change is slower), and the break is the exact least-squares one: the
    split minimising the summed within-segment squared deviation (ruptures' ``l2`` cost with one
    break, which a test checks against ``ruptures.Dynp``), found from cumulative sums in O(T).
    """
    x = np.asarray(signal, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    n = len(x)
    if n < 2 * min_size + 1:
        return n // 2
    x = x[:, x.std(0) > 1e-9]
    if x.shape[1] == 0:
        return n // 2
    x = (x - x.mean(0)) / x.std(0)
    if smooth > 1:
        from scipy.ndimage import uniform_filter1d

        x = uniform_filter1d(x, size=smooth, axis=0, mode="nearest")
    csum = np.vstack([np.zeros((1, x.shape[1])), np.cumsum(x, axis=0)])
    csq = np.concatenate([[0.0], np.cumsum((x**2).sum(1))])
    k = np.arange(min_size, n - min_size + 1)
    left = csq[k] - (csum[k] ** 2).sum(1) / k
    right = (csq[n] - csq[k]) - ((csum[n] - csum[k]) ** 2).sum(1) / (n - k)
    return int(k[np.argmin(left + right)])


def behavioural_signal(trace, dynamics_row: dict[str, np.ndarray] | None, grid: np.ndarray) -> np.ndarray:
    """[T, channels]: shortlist growth per CoT token, plus Focus and Confusion interpolated per token."""
    cot_start, cot_end = int(trace.cot_start), int(trace.cot_end)
    T = max(cot_end - cot_start, 1)
    growth = np.zeros(T)
    seen: set[int] = set()
    firsts = sorted((int(m["token_start"]) - cot_start, int(m["label_id"])) for m in trace.mentions if cot_start <= int(m["token_start"]) < cot_end)
    total = len({lab for _, lab in firsts}) or 1
    pointer = 0
    for t in range(T):
        while pointer < len(firsts) and firsts[pointer][0] <= t:
            seen.add(firsts[pointer][1])
            pointer += 1
        growth[t] = len(seen) / total
    channels = [growth]
    if dynamics_row is not None:
        positions = np.arange(T) / T
        for key in ("focus", "confusion"):
            values = dynamics_row.get(key)
            if values is not None and np.isfinite(values).all():
                channels.append(np.interp(positions, grid, values))
    return np.stack(channels, axis=1)


INTERNAL_CHANNELS = ("regions", "document", "all")


def internal_signal(store, doc_id: str, cot_start: int, cot_end: int, layers: list[int], pca=None, channels: str = "regions") -> np.ndarray:
    """[T, channels] from the activation store for the CoT tokens of one trace.

    ``channels``: ``regions`` (default): per layer, the mean over heads of the attention mass sent
    to the document, to the model's own output (CoT and its label mentions) and to the prompt's
    scaffolding: DESIGN §2's phase 1 reads the evidence, phase 2 re-reads the model's own
    shortlist. ``document``: the document mass alone. ``all``: ``regions`` plus mean
    log(1 + kurtosis) over document keys and ``pca`` components of the final residual stream.
    """
    if channels not in INTERNAL_CHANNELS:
        raise input_error(None, f"internal boundary channels {channels!r} unknown", f"use one of {INTERNAL_CHANNELS}")
    document = [int(Region.DOCUMENT), int(Region.ANCHOR)]
    own_output = [int(Region.COT), int(Region.MENTION_GOLD), int(Region.MENTION_NEAR_MISS), int(Region.MENTION_OTHER)]
    groups = [document] if channels == "document" else [document, own_output, [int(Region.PROMPT)]]
    columns: list[np.ndarray] = []
    positions = None
    for layer in layers:
        pos, mass = store.read(doc_id, reduction_name("region_mass", layer))
        keep = ((pos >= cot_start) & (pos < cot_end)).numpy()
        positions = pos.numpy()[keep]
        m = mass.numpy()[keep]  # [T, head, region]
        columns += [m[:, :, group].sum(-1).mean(1) for group in groups]
        if channels == "all":
            _, kurt = store.read(doc_id, reduction_name("doc_kurtosis", layer))
            columns.append(np.log1p(kurt.numpy()[keep]).mean(1))
    if pca is not None and channels == "all":
        last = hook_name("resid_post", max(layers))
        pos, resid = store.read(doc_id, last)
        keep = ((pos >= cot_start) & (pos < cot_end)).numpy()
        columns.extend(pca.transform(resid.float().numpy()[keep]).T)
    signal = np.stack(columns, axis=1)
    if positions is not None and len(positions) != cot_end - cot_start:
        raise input_error(None, f"trace {doc_id}: the activation store lacks some CoT positions", "capture with --positions output or cot")
    return signal


ESTIMATORS: dict[str, Callable] = {}


def register_estimator(name: str):
    def decorate(fn):
        ESTIMATORS[name] = fn
        return fn

    return decorate


@register_estimator("fixed")
def _fixed(trace, **_) -> int:
    T = int(trace.cot_end) - int(trace.cot_start)
    return int(round(0.5 * T))


@register_estimator("behavioural")
def _behavioural(trace, dynamics_row=None, grid=None, min_size=3, **_) -> int:
    return change_point(behavioural_signal(trace, dynamics_row, grid), min_size=min_size)


@register_estimator("constant")
def _constant(trace, constant_share=None, **_) -> int | None:
    if constant_share is None:
        return None  # not fitted: no dev trace with a known boundary
    T = int(trace.cot_end) - int(trace.cot_start)
    return int(round(constant_share * T))


@dataclass(frozen=True)
class InternalSettings:
    """The internal estimator's free choices, made on dev traces by :func:`tune_internal`.

    ``channels``: see :func:`internal_signal`. ``smoothing``: moving-average window as a fraction
    of the CoT length (it damps the token-by-token swing of each line and keeps the slower phase
    change). The defaults are what ``ctd characterize --tune-boundary`` selects on the default
    run's 100 dev traces (BENCHMARKS.md shows the whole grid).
    """

    channels: str = "regions"
    smoothing: float = 0.15


SMOOTHING_GRID = (0.0, 0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3)


@register_estimator("internal")
def _internal(trace, store=None, layers=None, pca=None, min_size=3, internal=InternalSettings(), **_) -> int:
    signal = internal_signal(store, str(trace.doc_id), int(trace.cot_start), int(trace.cot_end), layers, pca, internal.channels)
    smooth = max(1, int(round(internal.smoothing * len(signal))))
    return change_point(signal, min_size=min_size, smooth=smooth)


def fit_constant_share(dev_traces: pd.DataFrame, grid: np.ndarray = np.linspace(0.0, 1.0, 201)) -> float | None:
    """The share of the CoT whose median absolute error over ``dev_traces`` is smallest (the
    metric every estimator is scored on); None when no dev trace has a known boundary."""
    known = dev_traces.dropna(subset=["true_boundary"])
    if known.empty:
        return None
    T = (known["cot_end"] - known["cot_start"]).clip(lower=1).to_numpy(float)
    share = (known["true_boundary"].astype(float).to_numpy() - known["cot_start"].to_numpy(float)) / T
    errors = np.array([np.median(np.abs(np.round(g * T) / T - share)) for g in grid])
    best = np.flatnonzero(errors == errors.min())
    return float(grid[best[np.argmin(np.abs(grid[best] - np.median(share)))]])


def estimate_boundaries(traces: pd.DataFrame, estimators=("fixed", "constant", "behavioural", "internal"), progress: bool = False, **context) -> Boundary:
    """Run each estimator on each trace; ``context`` passes what they need (store, dynamics,
    ``constant_share``, ``internal`` settings, ...). An estimator that cannot run (``constant``
    without dev truth) returns None and gets no rows; the meta says why."""
    from tqdm.auto import tqdm

    dynamics_rows: dict[str, dict[str, np.ndarray]] = context.pop("dynamics_rows", {})
    rows = []
    skipped: dict[str, str] = {}
    for trace in tqdm(list(traces.itertuples(index=False)), desc="boundary", disable=not progress, file=sys.stderr):
        T = int(trace.cot_end) - int(trace.cot_start)
        true_token = None if pd.isna(trace.true_boundary) else int(trace.true_boundary)
        for name in estimators:
            offset = ESTIMATORS[name](trace, dynamics_row=dynamics_rows.get(trace.doc_id), **context)
            if offset is None:
                skipped[name] = "not fitted (no dev trace with a known boundary)"
                continue
            tau_token = int(trace.cot_start) + int(offset)
            rows.append(
                {
                    "doc_id": trace.doc_id,
                    "estimator": name,
                    "tau_token": tau_token,
                    "tau_norm": offset / max(T, 1),
                    "true_token": true_token,
                    "abs_error_tokens": None if true_token is None else abs(tau_token - true_token),
                    "cot_length": T,
                }
            )
    frame = pd.DataFrame(rows)
    frame["true_token"] = frame["true_token"].astype("Int64")
    frame["abs_error_tokens"] = frame["abs_error_tokens"].astype("Float64")
    internal = context.get("internal", InternalSettings())
    meta = {
        "estimators": [e for e in estimators if e not in skipped],
        "not_run": skipped,
        "change_point": "exact least-squares single break on standardised channels (equal to ruptures Dynp, l2 cost, 1 break; parity-tested)",
        "internal": {"channels": internal.channels, "smoothing_fraction_of_cot": internal.smoothing},
    }
    if context.get("constant_share") is not None:
        meta["constant_share"] = context["constant_share"]
    return Boundary(frame, meta)


def tune_internal(traces: pd.DataFrame, store, layers: list[int], pca=None, channels=INTERNAL_CHANNELS, smoothing=SMOOTHING_GRID, min_size: int = 3, progress: bool = True) -> pd.DataFrame:
    """Score every (channels, smoothing) choice of the internal estimator on ``traces`` (dev traces
    with a known boundary): one row per choice with its median absolute error (fraction of the CoT),
    sorted best first. The estimator still sees no truth: the truth only scores the choices."""
    from tqdm.auto import tqdm

    known = traces.dropna(subset=["true_boundary"])
    if known.empty:
        raise input_error(None, "no dev trace has a known boundary", "tune on traces of the embedded task (the generator records the boundary)")
    rows = []
    choices = [(c, s) for c in channels for s in smoothing]
    signals: dict[tuple[str, str], np.ndarray] = {}
    for c, s in tqdm(choices, desc="tune boundary", disable=not progress, file=sys.stderr):
        errors = []
        for trace in known.itertuples(index=False):
            key = (str(trace.doc_id), c)
            if key not in signals:
                signals[key] = internal_signal(store, str(trace.doc_id), int(trace.cot_start), int(trace.cot_end), layers, pca, c)
            signal = signals[key]
            offset = change_point(signal, min_size=min_size, smooth=max(1, int(round(s * len(signal)))))
            T = max(int(trace.cot_end) - int(trace.cot_start), 1)
            errors.append(abs(int(trace.cot_start) + offset - int(trace.true_boundary)) / T)
        rows.append({"channels": c, "smoothing": s, "median_abs_error_frac": float(np.median(errors)), "mean_abs_error_frac": float(np.mean(errors)), "n": len(errors)})
    frame = pd.DataFrame(rows).sort_values(["median_abs_error_frac", "mean_abs_error_frac", "smoothing"], kind="stable").reset_index(drop=True)
    frame["rank"] = np.arange(1, len(frame) + 1)
    return frame

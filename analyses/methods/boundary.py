"""Phase boundary τ per trace: four estimators side by side (DESIGN §2), registered by name.

- ``fixed``: τ = 0.5 of the CoT (the published convention).
- ``constant``: τ = the single share of the CoT that fits dev traces best (the baseline an
  estimator must beat by a wide margin: on traces whose boundary sits at a fixed share, a constant
  matches any estimator).
- ``behavioural``: one change point (ruptures) of the per-token shortlist-growth curve together
  with the Focus and Confusion curves.
- ``internal``: one change point of a per-token signal read from the model's internals. By default
  (``channels="probe"``) the signal is a phase probe's output: a logistic regression on the heads'
  attention statistics per CoT token (per head, the mass sent to the prompt, the document, the CoT
  and its label mentions, and the log kurtosis over document keys), fitted on dev traces with a
  known boundary and applied to test traces it never saw. The unsupervised alternatives
  (``regions``, ``document``, ``all``: per layer, the mean attention mass to each region) fit
  nothing. Either way the estimator never sees a test trace's true boundary, nor any token or
  phrase that marks it: the same code runs on models whose trace format nobody knows. Channels,
  smoothing and C are chosen on dev traces by :func:`tune_internal` (``ctd characterize --run R
  --tune-boundary``, cross-fitted, written to ``boundary_tuning.parquet``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from analyses.methods.parsing import Region
from analyses.results.boundary import Boundary
from analyses.machinery.settings import InternalSettings
from probes.errors import input_error
from probes.points import hook_name, reduction_name

__all__ = ["Boundary", "ESTIMATORS", "DEFAULT_ESTIMATORS", "TokenPhaseTable", "fit_token_phase_table", "TextPhaseProbe", "fit_text_phase_probe", "TEXT_BASELINES", "register_estimator", "change_point", "internal_signal", "behavioural_signal", "estimate_boundaries", "fit_constant_share", "tune_internal", "InternalSettings", "SMOOTHING_GRID", "attention_features", "fit_phase_probe", "PhaseProbe"]


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


SMOOTHING_GRID = (0.0, 0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3)
PROBE_C_GRID = (0.01, 0.1, 1.0)
# Key regions the probe reads, merged so that no channel depends on which labels are gold:
# the prompt scaffolding, the document (its anchors included), the CoT's own tokens, its label mentions.
_FEATURE_REGIONS = ((int(Region.PROMPT),), (int(Region.DOCUMENT), int(Region.ANCHOR)), (int(Region.COT),), (int(Region.MENTION_GOLD), int(Region.MENTION_NEAR_MISS), int(Region.MENTION_OTHER)))


def attention_features(store, doc_id: str, cot_start: int, cot_end: int, layers: list[int]) -> np.ndarray:
    """[T, layers x heads x 5] per CoT token: each head's attention mass to the prompt, the
    document, the CoT and its label mentions, and log(1 + kurtosis) over the document."""
    columns = []
    for layer in layers:
        pos, mass = store.read(doc_id, reduction_name("region_mass", layer))
        _, kurt = store.read(doc_id, reduction_name("doc_kurtosis", layer))
        keep = ((pos >= cot_start) & (pos < cot_end)).numpy()
        m = mass.numpy()[keep]
        columns += [m[:, :, list(group)].sum(-1) for group in _FEATURE_REGIONS]
        columns.append(np.log1p(kurt.numpy()[keep]))
    return np.concatenate(columns, axis=1)


@dataclass
class PhaseProbe:
    """A logistic phase probe on attention statistics: P(phase 2) per CoT token."""

    scaler: object
    model: object
    layers: list[int]
    n_traces: int

    def signal(self, store, doc_id: str, cot_start: int, cot_end: int) -> np.ndarray:
        x = attention_features(store, doc_id, cot_start, cot_end, self.layers)
        return self.model.predict_proba(self.scaler.transform(x))[:, 1:]


def fit_phase_probe(traces: pd.DataFrame, store, layers: list[int], C: float = 0.1) -> PhaseProbe | None:
    """The internal estimator's probe, fitted on ``traces`` with a known boundary (dev traces);
    None when there are none (then the unsupervised channels are used)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    known = traces.dropna(subset=["true_boundary"])
    if known.empty:
        return None
    xs, ys = [], []
    for t in known.itertuples(index=False):
        cs, ce, tb = int(t.cot_start), int(t.cot_end), int(t.true_boundary)
        xs.append(attention_features(store, str(t.doc_id), cs, ce, layers))
        ys.append((np.arange(cs, ce) >= tb).astype(int))
    x, y = np.concatenate(xs), np.concatenate(ys)
    if len(np.unique(y)) < 2:
        return None
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=C, solver="liblinear", max_iter=2000).fit(scaler.transform(x), y)
    return PhaseProbe(scaler, model, list(layers), len(known))


@register_estimator("internal")
def _internal(trace, store=None, layers=None, pca=None, min_size=3, internal=InternalSettings(), phase_probe=None, **_) -> int:
    if internal.channels == "probe" and phase_probe is not None:
        signal = phase_probe.signal(store, str(trace.doc_id), int(trace.cot_start), int(trace.cot_end))
    else:
        channels = "regions" if internal.channels == "probe" else internal.channels
        signal = internal_signal(store, str(trace.doc_id), int(trace.cot_start), int(trace.cot_end), layers, pca, channels)
    smooth = max(1, int(round(internal.smoothing * len(signal))))
    return change_point(signal, min_size=min_size, smooth=smooth)


@register_estimator("internal_unsupervised")
def _internal_unsupervised(trace, store=None, layers=None, pca=None, min_size=3, internal=InternalSettings(), **_) -> int:
    # What the internal estimator does without a fitted probe: unsupervised channels only.
    unsupervised = InternalSettings(channels=internal.unsupervised_channels, smoothing=internal.unsupervised_smoothing)
    return _internal(trace, store=store, layers=layers, pca=pca, min_size=min_size, internal=unsupervised)


@dataclass
class TokenPhaseTable:
    """The token-identity baseline for the boundary: P(phase 2 | current and previous token ids),
    counted on dev traces with a known boundary, backing off to the current token, then to the
    dev share of phase-2 tokens. What a lookup on the text alone gets, with the same change point."""

    pair: dict
    single: dict
    prior: float
    n_traces: int
    # how tau is read from the lookup's P(phase 2) per token: None = the change point; a float =
    # the first token at or above it. Chosen on the same dev traces, so the baseline is as strong
    # as the lookup allows (a change point puts the break one token early, at the line break before
    # a lexically marked boundary).
    threshold: float | None = None

    def locate(self, trace, min_size: int = 3, smooth: int = 1) -> int:
        return _read_tau(self.signal(trace), self.threshold, min_size, smooth)

    def signal(self, trace) -> np.ndarray:
        ids = np.concatenate([np.asarray(trace.prompt_ids), np.asarray(trace.output_ids)])
        out = np.empty(int(trace.cot_end) - int(trace.cot_start))
        for i, p in enumerate(range(int(trace.cot_start), int(trace.cot_end))):
            counts = self.pair.get((int(ids[p]), int(ids[p - 1]))) or self.single.get(int(ids[p]))
            out[i] = self.prior if counts is None else (counts[1] + self.prior) / (counts[0] + counts[1] + 1.0)
        return out[:, None]


def fit_token_phase_table(traces: pd.DataFrame) -> TokenPhaseTable | None:
    """:class:`TokenPhaseTable` from ``traces`` with a known boundary (dev traces); None without."""
    known = traces.dropna(subset=["true_boundary"])
    if known.empty:
        return None
    pair: dict[tuple[int, int], list[int]] = {}
    single: dict[int, list[int]] = {}
    labels = []
    for t in known.itertuples(index=False):
        ids = np.concatenate([np.asarray(t.prompt_ids), np.asarray(t.output_ids)])
        for p in range(int(t.cot_start), int(t.cot_end)):
            y = int(p >= int(t.true_boundary))
            pair.setdefault((int(ids[p]), int(ids[p - 1])), [0, 0])[y] += 1
            single.setdefault(int(ids[p]), [0, 0])[y] += 1
            labels.append(y)
    table = TokenPhaseTable(pair, single, float(np.mean(labels)), len(known))
    table.threshold = _best_threshold(table, known)
    return table


# None = one change point; else the first token at or above the threshold.
TOKEN_THRESHOLDS = (None, 0.5, 0.7, 0.9, 0.99)
# The text probe's probabilities are graded (its window sees a marker from several tokens): a
# finer grid of readings, chosen on its dev traces like the lookup's.
TEXT_PROBE_THRESHOLDS = (None,) + tuple(round(float(x), 3) for x in np.linspace(0.5, 0.995, 34))


def _best_threshold(baseline, known: pd.DataFrame, thresholds=TOKEN_THRESHOLDS, signals: list | None = None) -> float | None:
    """The reading of ``baseline``'s P(phase 2) (a threshold, or None for the change point) with the
    smallest median error on ``known`` (its own dev traces), so the baseline is as strong as it gets.
    ``signals``: the per-trace P(phase 2) to read (default: the baseline's own on ``known``)."""
    T = (known["cot_end"] - known["cot_start"]).clip(lower=1).to_numpy(float)
    truth = known["true_boundary"].astype(float).to_numpy() - known["cot_start"].to_numpy(float)
    signals = [baseline.signal(t) for t in known.itertuples(index=False)] if signals is None else signals
    best = (np.inf, None)
    for threshold in thresholds:
        located = np.array([_read_tau(signal, threshold) for signal in signals], dtype=float)
        error = float(np.median(np.abs(located - truth) / T)) + 1e-6 * float(np.mean(np.abs(located - truth) / T))
        if error < best[0]:
            best = (error, threshold)
    return best[1]


def _read_tau(signal: np.ndarray, threshold: float | None, min_size: int = 3, smooth: int = 1) -> int:
    if threshold is not None:
        above = np.flatnonzero(signal[:, 0] >= threshold)
        if len(above):
            return int(above[0])
    return change_point(signal, min_size=min_size, smooth=smooth)


# The text-only probe reads this many tokens back from (and including) the current one.
TEXT_WINDOW = 16
TEXT_PROBE_C_GRID = (0.1, 1.0, 10.0)


def _window_features(ids: np.ndarray, p: int, window: int = TEXT_WINDOW) -> list[str]:
    """n-grams (n = 1-3) of token ids in the last ``window`` tokens up to position ``p``, as a bag,
    plus the last four tokens and the last bigram at their offsets."""
    w = [int(x) for x in ids[max(0, p - window + 1) : p + 1]]
    out = [f"{n}:" + "_".join(map(str, w[i : i + n])) for n in (1, 2, 3) for i in range(len(w) - n + 1)]
    out += [f"at{k}:{w[-1 - k]}" for k in range(min(4, len(w)))]
    if len(w) >= 2:
        out.append(f"at01:{w[-2]}_{w[-1]}")
    return out


@dataclass
class TextPhaseProbe:
    """The text-only probe baseline for the boundary: logistic regression on hashed n-grams
    (n = 1-3) of the last 16 token ids, fitted on dev traces with a known boundary (C by grouped
    cross-validation, the reading threshold on the same traces). What a reader of the recent text
    alone gets; unlike the two-token lookup it sees a marker up to 15 tokens back."""

    hasher: object
    model: object
    n_traces: int
    C: float
    threshold: float | None = None

    def _matrix(self, trace):
        ids = np.concatenate([np.asarray(trace.prompt_ids), np.asarray(trace.output_ids)])
        return self.hasher.transform(_window_features(ids, p) for p in range(int(trace.cot_start), int(trace.cot_end)))

    def signal(self, trace) -> np.ndarray:
        return self.model.predict_proba(self._matrix(trace))[:, 1:]

    def locate(self, trace, min_size: int = 3, smooth: int = 1) -> int:
        return _read_tau(self.signal(trace), self.threshold, min_size, smooth)


def fit_text_phase_probe(traces: pd.DataFrame, seed: int = 0) -> TextPhaseProbe | None:
    """:class:`TextPhaseProbe` from ``traces`` with a known boundary (dev traces); None without."""
    from scipy import sparse
    from sklearn.feature_extraction import FeatureHasher
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_predict, cross_val_score

    known = traces.dropna(subset=["true_boundary"]).reset_index(drop=True)
    if known.empty:
        return None
    hasher = FeatureHasher(n_features=2**18, input_type="string", alternate_sign=False)
    blocks, ys, groups = [], [], []
    for i, t in enumerate(known.itertuples(index=False)):
        ids = np.concatenate([np.asarray(t.prompt_ids), np.asarray(t.output_ids)])
        positions = range(int(t.cot_start), int(t.cot_end))
        blocks.append(hasher.transform(_window_features(ids, p) for p in positions))
        ys.append((np.arange(int(t.cot_start), int(t.cot_end)) >= int(t.true_boundary)).astype(int))
        groups.append(np.full(len(positions), i))
    x, y, g = sparse.vstack(blocks).tocsr(), np.concatenate(ys), np.concatenate(groups)
    if len(np.unique(y)) < 2:
        return None
    folds = min(3, len(known))
    signals = None
    if folds >= 2:
        scores = {C: float(np.mean(cross_val_score(LogisticRegression(C=C, solver="liblinear", max_iter=2000), x, y, groups=g, cv=GroupKFold(folds), scoring="neg_log_loss"))) for C in TEXT_PROBE_C_GRID}
        C = max(scores, key=scores.get)
        # The reading is chosen on out-of-fold P(phase 2): in-sample, n-grams unique to a trace
        # memorise its phases, and any reading looks exact.
        held_out = cross_val_predict(LogisticRegression(C=C, solver="liblinear", max_iter=2000), x, y, groups=g, cv=GroupKFold(folds), method="predict_proba")[:, 1]
        signals = [held_out[g == i][:, None] for i in range(len(known))]
    else:
        C = 1.0
    probe = TextPhaseProbe(hasher, LogisticRegression(C=C, solver="liblinear", max_iter=2000).fit(x, y), len(known), C)
    probe.threshold = _best_threshold(probe, known, TEXT_PROBE_THRESHOLDS, signals)
    return probe


@register_estimator("text_probe")
def _text_probe(trace, text_probe=None, min_size=3, **_) -> int | None:
    if text_probe is None:
        return None  # not fitted: no dev trace with a known boundary
    return text_probe.locate(trace, min_size=min_size)


# The text-only baselines: the internal estimator is scored against the stronger of them.
TEXT_BASELINES = ("tokens", "text_probe")


@register_estimator("tokens")
def _tokens(trace, token_table=None, min_size=3, **_) -> int | None:
    if token_table is None:
        return None  # not fitted: no dev trace with a known boundary
    return token_table.locate(trace, min_size=min_size)


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


DEFAULT_ESTIMATORS = ("fixed", "constant", "tokens", "text_probe", "behavioural", "internal", "internal_unsupervised")


def estimate_boundaries(traces: pd.DataFrame, estimators=DEFAULT_ESTIMATORS, progress: bool = False, **context) -> Boundary:
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
    probe = context.get("phase_probe")
    used = internal.channels if internal.channels != "probe" or probe is not None else "regions (no dev traces with a known boundary to fit the probe on)"
    meta = {
        "estimators": [e for e in estimators if e not in skipped],
        "not_run": skipped,
        "change_point": "exact least-squares single break on standardised channels (equal to ruptures Dynp, l2 cost, 1 break; parity-tested)",
        "internal": {"channels": used, "smoothing_fraction_of_cot": internal.smoothing, "C": internal.C},
        "internal_unsupervised": {"channels": internal.unsupervised_channels, "smoothing_fraction_of_cot": internal.unsupervised_smoothing, "fitted": "nothing"},
    }
    if probe is not None and internal.channels == "probe":
        meta["internal"]["probe"] = f"logistic regression (C={internal.C}) on each head's attention mass to prompt, document, CoT and label mentions and its document kurtosis, {len(probe.layers)} layers; fitted on {probe.n_traces} dev traces; the estimated trace's truth, text and tokens are never read"
    if context.get("constant_share") is not None:
        meta["constant_share"] = context["constant_share"]
    if context.get("token_table") is not None:
        meta["tokens"] = f"P(phase 2 | current, previous token id) counted on {context['token_table'].n_traces} dev traces (back-off to the current token, then the prior), read as " + (f"the first token with P >= {context['token_table'].threshold}" if context["token_table"].threshold is not None else "one change point") + f" (chosen on the same dev traces among {list(TOKEN_THRESHOLDS)}, None = change point): what a lookup on the text gets"
    if context.get("text_probe") is not None:
        tp = context["text_probe"]
        meta["text_probe"] = f"logistic regression (C={tp.C}, grouped {min(3, tp.n_traces)}-fold CV, reading chosen out of fold) on hashed 1-3-grams of the last {TEXT_WINDOW} token ids and the last four at their offsets, fitted on {tp.n_traces} dev traces, read as " + (f"the first token with P >= {tp.threshold}" if tp.threshold is not None else "one change point") + ": what a reader of the recent text gets"
    return Boundary(frame, meta)


def tune_internal(traces: pd.DataFrame, store, layers: list[int], pca=None, channels=("probe",) + INTERNAL_CHANNELS, smoothing=SMOOTHING_GRID, C_grid=PROBE_C_GRID, folds: int = 5, min_size: int = 3, progress: bool = True, seed: int = 0) -> pd.DataFrame:
    """Score every choice of the internal estimator on ``traces`` (dev traces with a known
    boundary): one row per choice with its median absolute error (fraction of the CoT), best first.

    The unsupervised channels see no truth; the probe is cross-fitted: each dev trace is scored by
    a probe fitted on the other folds of the dev traces, never on itself.
    """
    from tqdm.auto import tqdm

    known = traces.dropna(subset=["true_boundary"]).reset_index(drop=True)
    if known.empty:
        raise input_error(None, "no dev trace has a known boundary", "tune on traces of the embedded task (the generator records the boundary)")
    fold_of = np.random.default_rng(seed).permutation(len(known)) % max(2, min(folds, len(known)))
    signals: dict[tuple, np.ndarray] = {}
    for c in channels:
        for C in (C_grid if c == "probe" else (None,)):
            if c == "probe":
                for f in np.unique(fold_of):
                    probe = fit_phase_probe(known[fold_of != f], store, layers, C)
                    for i in np.flatnonzero(fold_of == f):
                        t = known.iloc[i]
                        signals[(c, C, i)] = probe.signal(store, str(t.doc_id), int(t.cot_start), int(t.cot_end))
            else:
                for i, t in enumerate(known.itertuples(index=False)):
                    signals[(c, C, i)] = internal_signal(store, str(t.doc_id), int(t.cot_start), int(t.cot_end), layers, pca, c)
    rows = []
    choices = sorted({(c, C) for c, C, _ in signals}, key=lambda x: (x[0], -1 if x[1] is None else x[1]))
    for c, C in tqdm(choices, desc="tune boundary", disable=not progress, file=sys.stderr):
        for sm in smoothing:
            errors = []
            for i, t in enumerate(known.itertuples(index=False)):
                signal = signals[(c, C, i)]
                offset = change_point(signal, min_size=min_size, smooth=max(1, int(round(sm * len(signal)))))
                T = max(int(t.cot_end) - int(t.cot_start), 1)
                errors.append(abs(int(t.cot_start) + offset - int(t.true_boundary)) / T)
            rows.append({"channels": c, "C": np.nan if C is None else C, "smoothing": sm, "median_abs_error_frac": float(np.median(errors)), "mean_abs_error_frac": float(np.mean(errors)), "n": len(errors)})
    frame = pd.DataFrame(rows).sort_values(["median_abs_error_frac", "mean_abs_error_frac", "smoothing"], kind="stable").reset_index(drop=True)
    frame["rank"] = np.arange(1, len(frame) + 1)
    frame.attrs["cross_fitted"] = f"probe: {int(fold_of.max()) + 1}-fold cross-fitting over the dev traces"
    return frame
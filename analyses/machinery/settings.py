"""One typed tree of settings: every stage's settings dataclass, nested in :class:`RunConfig`.

Each default is defined once, here; ``ctd`` flags, TOML files (``[patch]`` tables) and
``--set patch.n_docs=20`` all write into the same tree, and the resolved tree is what the manifest
records. Types are checked from the fields' annotations when values come from outside.
This module imports nothing heavy: a notebook or a config check never loads torch.
"""

from __future__ import annotations

import json
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from probes.errors import input_error

__all__ = [
    "DataSettings",
    "GenerationSettings",
    "TracesSettings",
    "CaptureSettings",
    "InternalSettings",
    "CharacterizeSettings",
    "PatchSettings",
    "AblateSettings",
    "IsolateSettings",
    "DistillConfig",
    "ReportSettings",
    "RunConfig",
    "load_config",
    "apply_override",
    "DEFAULT_LABEL_CHAPTERS",
    "DEFAULT_N_NOTES",
    "DEFAULT_N_TRACES",
]

# The embedded task's default label space: ICD-10-CM chapter 9 (circulatory system), 1,427 billable
# codes with deep sibling structure (acute/chronic, systolic/diastolic, laterality, ...).
DEFAULT_LABEL_CHAPTERS = ("9",)
# Notes of the embedded task's default dataset: 2,400 train / 300 dev / 300 test. Distillation
# evaluates on 200 test notes and picks training notes covering their codes; traces, capture and
# characterisation read the first 100 test (and 100 dev) notes.
DEFAULT_N_NOTES = 3000
DEFAULT_N_TRACES = 100


@dataclass
class DataSettings:
    """Where the documents and labels come from.

    Attributes:
        source: a registered dataset source (``icd10cm``, ``xc-repo``, ``mimic-iv-icd10``, ``jsonl``).
        path: the source's folder (none for the generated ``icd10cm`` notes).
        options: source options (``icd10cm``: ``chapters``, ``n_docs``; others: their own).
    """

    source: str = "icd10cm"
    path: str | None = None
    options: dict = field(default_factory=lambda: {"chapters": list(DEFAULT_LABEL_CHAPTERS), "n_docs": DEFAULT_N_NOTES})

    def quick(self) -> "DataSettings":
        if self.source != "icd10cm":
            return self
        return replace(self, options={**self.options, "n_docs": min(int(self.options.get("n_docs", DEFAULT_N_NOTES)), 200)})


@dataclass
class GenerationSettings:
    """Greedy (or sampled) generation with the Hugging Face KV cache, batched with left padding.

    Attributes:
        max_new_tokens: the organism's longest traces run to about 600 tokens; real reasoning
            models need thousands.
        device_map: ``auto``: one model across the GPUs of a node (accelerate).
    """

    max_new_tokens: int = 768
    batch_size: int = 32
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    attn_implementation: str = "sdpa"
    device_map: str | None = None


@dataclass
class TracesSettings:
    """Which documents are traced.

    Attributes:
        split: the documents' split (``test``; ``all`` for every document).
        n_docs: how many of them (None: all).
        n_dev_docs: dev traces written beside them, from the dev split (the training split where
            there is none); heads are ranked on them, never on the test traces (None: 100 for the
            embedded organism, whose traces carry a known boundary; 50 for other models).
        template: prompt template name (None: the model family's default).
        from_file: a serving engine's completions (JSONL, ``ctd traces --from``) parsed instead of
            generating: the file names the documents (its dev documents go to the dev traces), so
            ``n_docs``, ``n_dev_docs`` and ``generation`` do not apply (None: generate).
    """

    split: str = "test"
    n_docs: int | None = DEFAULT_N_TRACES
    n_dev_docs: int | None = None
    template: str | None = None
    from_file: str | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    def quick(self) -> "TracesSettings":
        return replace(self, n_docs=20, n_dev_docs=20 if self.n_dev_docs is None else min(self.n_dev_docs, 20))


@dataclass
class CaptureSettings:
    """What the teacher-forced replay keeps (DESIGN §4).

    Attributes:
        points: activation points (keys of ``probes.points.POINTS``, ``key@layer`` or hook names).
        positions: ``output`` (CoT and answer), ``cot``, ``mentions`` or ``all``.
        attention_layers: layers whose attention is reduced in the hook: ``all``, ``none`` or a list.
        attention: ``auto`` (fused attention: statistics from q, k and v, no T x T pattern;
            ``probes.fused``), ``eager`` (the bridge's full pattern, read in ``hook_pattern``) or
            ``fused``. The manifest records the path that ran.
    """

    points: list = field(default_factory=lambda: ["resid_post", "head_out"])
    positions: str = "output"
    attention_layers: Any = "all"
    attention: str = "auto"
    batch_size: int = 8
    dtype: str = "float16"
    padding: str = "left"
    device_map: str | None = None


@dataclass(frozen=True)
class InternalSettings:
    """The internal boundary estimator's free choices, made on dev traces by
    ``ctd characterize --tune-boundary`` (see :func:`analyses.methods.boundary.tune_internal`).

    Attributes:
        channels: ``probe``: one channel, a phase probe's per-token output, the probe a logistic
            regression on the heads' attention statistics fitted on dev traces with a known
            boundary (without such traces the estimator falls back to ``regions`` and says so);
            ``regions`` / ``document`` / ``all``: unsupervised channels.
        smoothing: moving-average window as a fraction of the CoT length.
        C: the probe's inverse L2 strength.
        unsupervised_channels, unsupervised_smoothing: the ``internal_unsupervised`` estimator,
            reported beside it: what the internal estimator can do where no trace has a known
            boundary (a real model), fitting nothing.
    """

    channels: str = "probe"
    smoothing: float = 0.0
    C: float = 0.1
    # chosen by `ctd characterize --tune-boundary` on the default run's 100 dev traces (median 22.0%)
    unsupervised_channels: str = "document"
    unsupervised_smoothing: float = 0.02


@dataclass
class CharacterizeSettings:
    """Dynamics, boundary, head scores, attribution, probes and logit lens."""

    n_boot: int = 1000
    seed: int = 0
    internal: InternalSettings = field(default_factory=InternalSettings)

    def quick(self) -> "CharacterizeSettings":
        return replace(self, n_boot=200)


@dataclass
class PatchSettings:
    """Settings of the patch stage.

    Attributes:
        n_docs: test traces patched (well-formed, with anchors and a gold code in the answer).
        n_random: random head sets per k (drawn outside the ranked top k).
        what: ``z`` (head outputs) or ``pattern`` (attention patterns, as the published analysis).
        sweep_positions: position sets of the per-head sweep: ``all``, ``phase1`` (CoT before the
            boundary), ``phase2`` (CoT from the boundary on).
        phase_sweep_modes: the modes of the phase-restricted sweeps (``denoise``: does the head at
            that phase's positions carry what the answer needs; add ``noise`` for the damage map,
            one more forward per head and phase). The ``all`` sweep runs both modes.
        sweep: one head at a time (exact); off for models too large to sweep (attribution only).
        regenerate: read the regenerated answer for the head sets.
        batch_size: traces per forward (batched by length: less padding).
        device_map: ``auto``: one large model across the GPUs of a node.
    """

    n_docs: int = 40
    n_random: int = 3
    what: str = "z"
    sweep_positions: tuple = ("all", "phase1", "phase2")
    phase_sweep_modes: tuple = ("denoise",)
    sweep: bool = True
    regenerate: bool = True
    batch_size: int = 10
    n_boot: int = 1000
    n_permutations: int = 2000
    seed: int = 0
    device_map: str | None = None

    def quick(self) -> "PatchSettings":
        return replace(self, n_docs=8, n_random=2, sweep_positions=("all",), n_boot=200, n_permutations=500)


@dataclass
class IsolateSettings:
    """Truncation, shortlist injection, retriever baselines and complementarity.

    Attributes:
        n_docs: traces read (None: all well-formed ones).
        retriever_k: shortlist size of the retriever.
        other_run: another run whose shortlists are injected (``other_shortlist+phase2``).
    """

    n_docs: int | None = None
    retriever_k: int = 5
    other_run: str | None = None
    n_boot: int = 1000
    seed: int = 0

    def quick(self) -> "IsolateSettings":
        return replace(self, n_docs=20, n_boot=200)


@dataclass
class AblateSettings:
    """Heads mean-ablated while the model regenerates its CoT and answer.

    Attributes:
        n_docs: test traces regenerated (their prompts; the first well-formed ones).
        n_dev_docs: dev traces whose CoT tokens give each head's mean output.
        n_random: seeded random head sets per k (outside the ranked set), averaged per trace.
        ks: head-set sizes (None: k = 1-4, or the patch stage's grid on larger models).
    """

    # 32 prompts in one batch x 25 regenerations (k = 1-4, three sets, two scores, and the
    # unablated one) keep the stage near 2 minutes on the organism, inside `ctd run`'s 20 (40
    # prompts in two batches took 168 s).
    n_docs: int = 32
    n_dev_docs: int = 50
    n_random: int = 1
    ks: tuple[int, ...] | None = None
    batch_size: int = 32
    n_boot: int = 1000
    seed: int = 0

    def quick(self) -> "AblateSettings":
        return replace(self, n_docs=12, n_dev_docs=12, ks=(1, 2), n_boot=200)


@dataclass
class DistillConfig:
    """Settings of the distillation study.

    Attributes:
        student: folder of the student base (None: the shipped one, ``analyses/assets/student_base``).
        n_train_docs: training notes (chosen to cover the evaluation notes' gold codes).
        n_eval_docs: held-out notes of the evaluation split every student is scored on.
        eval_split: ``test`` for the study, ``dev`` for the pilot that chooses ``steps``.
        n_curve_docs: held-out notes generated at each learning-curve checkpoint (the teacher-
            forced log-prob uses all of them).
        steps: training steps of every condition but ``standard_equal_compute`` (from a pilot).
        n_checkpoints: learning-curve points after step 0.
        seeds: data orders; every condition of a seed sees the same one.
        ablation_seeds: how many of the seeds the ablations run (the headline pair and the
            equal-compute arm run all of them).
    """

    student: str | None = None
    n_train_docs: int = 1200
    n_eval_docs: int = 200
    eval_split: str = "test"
    n_curve_docs: int = 30
    n_trajectory_docs: int = 20
    steps: int = 300
    n_checkpoints: int = 5
    batch_size: int = 16
    lr: float = 1e-3
    seeds: tuple = (0, 1, 2, 3, 4)
    ablation_seeds: int = 2
    # The headline pair takes about 55 minutes on 2 CPU cores; add "standard_equal_compute",
    # "no_phase1", "no_phase2" (and the other ablations) for the full study (about 2 h there).
    conditions: tuple = ("standard", "mechanistic")
    lambda1: float = 0.5
    lambda2: float = 0.5
    heads_per_phase: int = 3
    max_new_tokens: int = 512
    n_boot: int = 1000

    @classmethod
    def for_run(cls) -> "DistillConfig":
        """What ``ctd run`` uses: the headline pair on 2 seeds, 100 steps from the student base on
        400 training notes, sized to fit the run's 20 minutes on 2 CPU cores (a smoke test of the
        study, not the study: the equal-compute arm, the ablations, 5 seeds and an informative
        budget are ``ctd distill``'s)."""
        return cls(n_train_docs=400, n_eval_docs=100, n_curve_docs=20, n_trajectory_docs=10, steps=100, seeds=(0, 1), conditions=("standard", "mechanistic"))

    def quick(self) -> "DistillConfig":
        return replace(self, n_train_docs=48, n_eval_docs=12, n_curve_docs=6, n_trajectory_docs=6, steps=12, n_checkpoints=2, batch_size=8, seeds=(0, 1), ablation_seeds=2, conditions=("standard", "mechanistic"), max_new_tokens=256, n_boot=200)

    @classmethod
    def pilot(cls) -> "DistillConfig":
        """The learning-curve pilot that chooses ``steps``: standard students, long, scored on dev notes."""
        return cls(eval_split="dev", n_eval_docs=100, n_curve_docs=100, steps=1200, n_checkpoints=8, seeds=(0, 1), conditions=("standard",))

    def checkpoints(self, steps: int | None = None) -> list[int]:
        steps = self.steps if steps is None else steps
        return sorted({max(1, int(round(steps * (i + 1) / self.n_checkpoints))) for i in range(self.n_checkpoints)})


@dataclass
class ReportSettings:
    """Figures (HTML, and PNG where Chromium is present) and ``report.html``."""

    formats: tuple = ("html", "png")


@dataclass
class RunConfig:
    """Everything a run needs: a few run-wide fields and one settings dataclass per stage.

    Attributes:
        out: the run directory.
        model: a Hugging Face model folder (None: the embedded organism).
        seed: the run's seed (stages read theirs from their own settings).
        quick: small settings everywhere (each stage's ``quick()``), for smoke runs.
    """

    out: str = "results/ctd-default"
    model: str | None = None
    seed: int = 0
    quick: bool = False
    data: DataSettings = field(default_factory=DataSettings)
    traces: TracesSettings = field(default_factory=TracesSettings)
    capture: CaptureSettings = field(default_factory=CaptureSettings)
    characterize: CharacterizeSettings = field(default_factory=CharacterizeSettings)
    patch: PatchSettings = field(default_factory=PatchSettings)
    ablate: AblateSettings = field(default_factory=AblateSettings)
    isolate: IsolateSettings = field(default_factory=IsolateSettings)
    distill: DistillConfig = field(default_factory=DistillConfig.for_run)
    report: ReportSettings = field(default_factory=ReportSettings)

    def resolved(self) -> "RunConfig":
        """The tree with the quick presets applied when ``quick`` is set (idempotent)."""
        if not self.quick:
            return self
        out = replace(self)
        for f in fields(self):
            value = getattr(self, f.name)
            if is_dataclass(value) and hasattr(value, "quick") and not isinstance(getattr(type(value), "quick", None), classmethod):
                setattr(out, f.name, value.quick())
        return out

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


# ------------------------------------------------------------------------------------------------
# loading and overriding, with types checked from the annotations


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _accepts(annotation, value) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation in (tuple, list) or origin in (tuple, list):
        return isinstance(value, (list, tuple))
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _coerce(annotation, value):
    if (annotation is tuple or typing.get_origin(annotation) is tuple) and isinstance(value, list):
        return tuple(value)
    if annotation is float and isinstance(value, int):
        return float(value)
    return value


def _assign(node, path: list[str], value, where: str) -> Any:
    """A copy of dataclass ``node`` with ``path`` set to ``value`` (checked against the annotation)."""
    name = path[0]
    names = [f.name for f in fields(node)]
    if name not in names:
        raise input_error(where, f"unknown setting {name!r} in {type(node).__name__}", f"use one of {names}")
    hint = _hints(type(node))[name]
    current = getattr(node, name)
    if len(path) > 1:
        if not is_dataclass(current):
            raise input_error(where, f"setting {name!r} has no fields ({'.'.join(path)})", f"set {name} itself")
        return replace(node, **{name: _assign(current, path[1:], value, where)})
    if is_dataclass(current):
        if not isinstance(value, dict):
            raise input_error(where, f"setting {name!r} is a table of settings, got {type(value).__name__}", f"give a table, or set {name}.FIELD")
        for key, sub in value.items():
            current = _assign(current, [key], sub, where)
        return replace(node, **{name: current})
    if not _accepts(hint, value):
        raise input_error(where, f"setting {name!r} is {type(value).__name__} {value!r}", f"give a value of type {getattr(hint, '__name__', str(hint))}")
    if name in ("n_docs", "n_eval_docs", "n_train_docs", "steps", "batch_size") and isinstance(value, int) and value < 1:
        raise input_error(where, f"{name} is {value}", "give a positive number")
    return replace(node, **{name: _coerce(hint, value)})


def apply_override(config: RunConfig, text: str) -> RunConfig:
    """``--set stage.field=value``: the value is read as TOML (``20``, ``true``, ``"x"``, ``[1, 2]``),
    or as a bare string."""
    if "=" not in text:
        raise input_error("--set", f"{text!r} is not KEY=VALUE", "write e.g. --set patch.n_docs=20")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return _assign(config, key.strip().split("."), value, f"--set {key.strip()}")


def load_config(path: str | Path | None = None, overrides: list[str] = (), start: RunConfig | None = None, **fields_: Any) -> RunConfig:
    """Defaults (or ``start``), then the TOML file (if any), then ``--set`` overrides, then non-None
    keyword fields; unknown keys and wrong types are one-line input errors naming the file or flag."""
    config = start or RunConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise input_error(path, "config file not found", "pass an existing TOML file to --config")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise input_error(path, f"malformed TOML ({exc})", "fix the file") from None
        for key, value in values.items():
            config = _assign(config, [key], value, str(path))
    for text in overrides:
        config = apply_override(config, text)
    for key, value in fields_.items():
        if value is not None:
            config = _assign(config, key.split("."), value, f"--{key.replace('_', '-')}")
    return config

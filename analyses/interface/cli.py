"""The ``ctd`` command line. Input errors print one line to stderr and exit with code 2.

Every stage command (and ``ctd run``) builds one settings tree (:class:`~analyses.machinery.settings.RunConfig`):
defaults, then ``--config FILE`` (TOML), then ``--set stage.field=value``, then the command's own
flags (each a shortcut for one field; its default is the tree's), and runs the stage through the
one runner (:mod:`analyses.stages`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from probes.errors import CtdError, CtdInputError

__all__ = ["main", "build_parser"]


def _parse_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise CtdInputError(f"--opt {text!r}: write options as KEY=VALUE (e.g. --opt n_docs=200)")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _dataset_options(args) -> dict:
    options = dict(_parse_option(o) for o in (args.opt or []))
    if getattr(args, "chapters", None):
        options["chapters"] = [c.strip() for c in args.chapters.split(",") if c.strip()]
    if getattr(args, "n_docs", None) is not None:
        options["n_docs"] = args.n_docs
    return options


# flag dest -> path in the settings tree (a flag left at None keeps the tree's value)
_FLAGS = {
    "run": {"out": "out", "model": "model", "seed": "seed"},
    "traces": {"model": "model", "split": "traces.split", "n_docs": "traces.n_docs", "n_dev_docs": "traces.n_dev_docs", "template": "traces.template", "batch_size": "traces.generation.batch_size", "max_new_tokens": "traces.generation.max_new_tokens", "sample": "traces.generation.do_sample", "seed": "traces.generation.seed", "device_map": "traces.generation.device_map", "from_file": "traces.from_file"},
    "capture": {"points": "capture.points", "positions": "capture.positions", "attention_layers": "capture.attention_layers", "batch_size": "capture.batch_size", "dtype": "capture.dtype", "padding": "capture.padding", "device_map": "capture.device_map", "attention": "capture.attention"},
    "characterize": {"n_boot": "characterize.n_boot", "seed": "characterize.seed", "boundary_channels": "characterize.internal.channels", "boundary_smoothing": "characterize.internal.smoothing", "boundary_c": "characterize.internal.C"},
    "patch": {"n_docs": "patch.n_docs", "n_random": "patch.n_random", "what": "patch.what", "positions": "patch.sweep_positions", "no_sweep": "patch.sweep", "no_regenerate": "patch.regenerate", "seed": "patch.seed", "device_map": "patch.device_map"},
    "ablate": {"n_docs": "ablate.n_docs", "n_random": "ablate.n_random", "seed": "ablate.seed"},
    "isolate": {"n_docs": "isolate.n_docs", "retriever_k": "isolate.retriever_k", "other_run": "isolate.other_run", "seed": "isolate.seed"},
    "distill": {"steps": "distill.steps", "student": "distill.student", "conditions": "distill.conditions"},
}
_NEGATED = {"no_sweep", "no_regenerate"}


def _config(args, command: str, base=None):
    """The settings tree of a command: defaults, --config, --set, then the command's flags."""
    from analyses.machinery.settings import load_config

    values = {}
    for dest, path in _FLAGS.get(command, {}).items():
        value = getattr(args, dest, None)
        if dest in _NEGATED:
            value = False if value else None
        elif isinstance(value, bool) and not value:
            value = None  # a store_true flag left off keeps the tree's value
        if value is not None:
            values[path] = value
    start = None
    if base is not None:  # a preset for the stage's section (the distillation study, its pilot)
        from dataclasses import replace

        from analyses.machinery.settings import RunConfig

        start = replace(RunConfig(), **base)
    config = load_config(getattr(args, "config", None), getattr(args, "set", None) or [], start=start)
    if command == "distill":
        if getattr(args, "seeds", None) is not None:
            values["distill.seeds"] = list(range(args.seeds))
        if values.get("distill.student"):
            values["distill.student"] = str(Path(values["distill.student"]).resolve())
    from analyses.machinery.settings import _assign

    for path, value in values.items():
        if isinstance(value, tuple):
            value = list(value)
        config = _assign(config, path.split("."), value, f"--{path.split('.')[-1].replace('_', '-')}")
    if getattr(args, "quick", False) and command != "distill":
        from dataclasses import replace

        config = replace(config, quick=True)
    return config


def _run_stage(name: str, run_dir, config) -> object:
    from analyses.stages import run

    return run(name, run_dir, config)


def _cmd_data_show(args) -> int:
    from analyses.interface.summary import dataset_summary
    from analyses.tasks.sources import load_dataset

    options = _dataset_options(args)
    dataset = load_dataset(args.source, args.path, **options)
    print(dataset_summary(dataset, n_examples=3))
    return 0


def _cmd_run(args) -> int:
    from dataclasses import replace

    from analyses.stages import run_study

    config = _config(args, "run")
    if args.dataset or args.dataset_path or args.opt:
        data = config.data
        if args.dataset and args.dataset != data.source:
            data = replace(data, source=args.dataset, options={})
        if args.dataset_path:
            data = replace(data, path=args.dataset_path)
        if args.opt:
            data = replace(data, options={**data.options, **dict(_parse_option(o) for o in args.opt)})
        config = replace(config, data=data)
    run_study(config, until=args.until)
    return 0


def _cmd_organism_train(args) -> int:
    from analyses.models.organism import OrganismConfig, default_organism_path, train_organism

    config = OrganismConfig.quick_config() if args.quick else OrganismConfig()
    if args.seed is not None:
        config.seed = args.seed
    if args.max_steps is not None:
        config.max_steps = args.max_steps
    if args.minutes is not None:
        config.time_budget_s = 60.0 * args.minutes
    if args.format is not None:
        config.trace_format = args.format
    out = Path(args.out) if args.out else default_organism_path()
    path = train_organism(out, config)
    meta = json.loads((path / "ctd_organism.json").read_text())
    print(json.dumps({"out": str(path), "steps": meta["steps"], "train_seconds": meta["train_seconds"], **meta["heldout"]}, indent=2))
    return 0


def _cmd_student_train(args) -> int:
    from analyses.models.student import StudentBaseConfig, default_student_base_path, train_student_base

    config = StudentBaseConfig.quick() if args.quick else StudentBaseConfig()
    if args.minutes is not None:
        config.time_budget_s = 60.0 * args.minutes
    out = Path(args.out) if args.out else default_student_base_path()
    path = train_student_base(out, args.teacher, config)
    meta = json.loads((path / "ctd_student.json").read_text())
    print(json.dumps({"out": str(path), "steps": meta["steps"], "train_seconds": meta["train_seconds"], **meta["before_distillation"]}, indent=2))
    return 0


def _cmd_traces(args) -> int:
    from dataclasses import replace

    from analyses.machinery.io import Manifest
    from analyses.stages import run_stage, stage_named

    config = _config(args, "traces")
    source = args.dataset[0] if args.dataset else config.data.source
    path = args.dataset[1] if args.dataset and len(args.dataset) > 1 else config.data.path
    options = dict(config.data.options) if source == config.data.source else {}
    options.update(dict(_parse_option(o) for o in (args.opt or [])))
    config = replace(config, data=replace(config.data, source=source, path=path, options=options))
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run_dir)
    manifest.verify_complete(skip=("traces",))
    if not (run_dir / "docs.parquet").exists():
        run_stage(stage_named("data"), run_dir, config, manifest)
    run_stage(stage_named("traces"), run_dir, config, manifest, redo=True)
    return 0


def _cmd_capture(args) -> int:
    config = _config(args, "capture")
    if args.points:
        from dataclasses import replace

        config = replace(config, capture=replace(config.capture, points=[p for item in args.points for p in item.split(",") if p]))
    layers = config.capture.attention_layers
    if isinstance(layers, str) and layers not in ("all", "none"):
        from dataclasses import replace

        try:
            config = replace(config, capture=replace(config.capture, attention_layers=[int(x) for x in layers.split(",") if x.strip()]))
        except ValueError:
            raise CtdInputError(f"--attention-layers {layers!r}: use all, none or a list like 0,1,2") from None
    _run_stage("capture", args.run, config)
    return 0


def _cmd_characterize(args) -> int:
    import pandas as pd

    from analyses.stages.characterize import tune_boundary_run

    if args.tune_boundary:
        table = tune_boundary_run(args.run, seed=args.seed or 0)
        print(table.head(12).to_string(index=False))
        best = table.iloc[0]
        config = _config(args, "characterize")
        shipped = type(config.characterize.internal)()
        chosen = f"channels={best['channels']}, smoothing={best['smoothing']:.2f}" + ("" if pd.isna(best["C"]) else f", C={best['C']:g}")
        print(f"selected on {int(best['n'])} dev traces: {chosen} "
              f"({'the shipped default' if bool(best['shipped_default']) else f'shipped default: channels={shipped.channels}, smoothing={shipped.smoothing:.2f}, C={shipped.C:g}'}); "
              f"all {len(table)} choices in {Path(args.run) / 'boundary_tuning.parquet'}")
        unsupervised = table[table["channels"] != "probe"].iloc[0]
        print(f"best choice fitting nothing (internal_unsupervised): channels={unsupervised['channels']}, smoothing={unsupervised['smoothing']:.2f}, "
              f"median error {unsupervised['median_abs_error_frac']:.3f} ({'the shipped default' if bool(unsupervised['shipped_unsupervised']) else f'shipped default: channels={shipped.unsupervised_channels}, smoothing={shipped.unsupervised_smoothing:.2f}'})")
        return 0
    results = _run_stage("characterize", args.run, _config(args, "characterize"))
    errors = results["boundary"].errors()
    if not errors.empty:
        print(errors.to_string(index=False))
    for score in ("coarse", "refine"):
        top = results["head_scores"].top(score, 3)
        print(f"top {score} heads: " + ", ".join(f"L{r.layer}H{r.head} {r.value:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]" for r in top.itertuples()))
    return 0


def _cmd_patch(args) -> int:
    result = _run_stage("patch", args.run, _config(args, "patch"))
    corr = result.correlations()
    corr = corr[corr["metric"] == "spearman"]
    print(f"patching.parquet: every head's effect over {result.meta['n_traces']} traces")
    print(corr[["score", "mode", "readout", "value", "ci_low", "ci_high", "p_value"]].to_string(index=False))
    return 0


def _cmd_ablate(args) -> int:
    result = _run_stage("ablate", args.run, _config(args, "ablate"))
    print(result.frame[["score", "k", "head_set", "metric", "value", "ci_low", "ci_high"]].to_string(index=False))
    return 0


def _cmd_isolate(args) -> int:
    result = _run_stage("isolate", args.run, _config(args, "isolate"))
    f1 = result.frame[result.frame["metric"] == "micro_f1"]
    print(f1[["condition", "value", "ci_low", "ci_high"]].to_string(index=False))
    print(f"complementarity: {result.verdict()}")
    return 0


def _cmd_distill(args) -> int:
    from analyses.machinery.settings import DistillConfig

    study = DistillConfig.pilot() if args.pilot else DistillConfig().quick() if args.quick else DistillConfig()
    config = _config(args, "distill", base={"distill": study})
    result = _run_stage("distill_pilot" if args.pilot else "distill", args.run, config)
    finals = result.finals.groupby(["condition", "metric"])["value"].mean().unstack()
    print(finals[[c for c in ("micro_f1", "gold_logprob", "ce_phase2", "transfer_kl_phase1", "transfer_kl_phase2", "steps") if c in finals]].to_string())
    diffs = result.differences
    if len(diffs):
        print(diffs[diffs["metric"].str.startswith(("micro_f1", "gold_logprob"))][["condition", "metric", "value", "ci_low", "ci_high", "p_value", "p_holm"]].to_string(index=False))
    print(f"training notes cover {result.meta['coverage']['share_seen_in_training_traces']:.1%} of the evaluation gold codes")
    return 0


def _cmd_report(args) -> int:
    _run_stage("report", args.run, _config(args, "report"))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file of settings (tables per stage: [patch], [distill], ...)")
    p.add_argument("--set", action="append", metavar="STAGE.FIELD=VALUE", help="any setting of the tree, e.g. patch.n_docs=20 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctd", description="characterize-then-distill: phases of label selection in reasoning models")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the whole study on the embedded default (or --model / --dataset)")
    run.add_argument("--model", help="folder of a Hugging Face causal LM (default: the embedded organism)")
    run.add_argument("--dataset", help="dataset source name (icd10cm, xc-repo, mimic-iv-icd10, jsonl)")
    run.add_argument("--dataset-path", help="folder of the dataset's files")
    run.add_argument("--out", help="run directory (default results/ctd-default)")
    run.add_argument("--quick", action="store_true", help="small settings for a smoke run")
    run.add_argument("--seed", type=int)
    run.add_argument("--opt", action="append", help="dataset option KEY=VALUE (repeatable)")
    run.add_argument("--until", help="stop after this stage (data, traces, capture, characterize, patch, ablate, isolate, distill, report)")
    _common(run)
    run.set_defaults(func=_cmd_run)

    organism = sub.add_parser("organism", help="the embedded reasoning model")
    org_sub = organism.add_subparsers(dest="organism_command", required=True)
    train = org_sub.add_parser("train", help="train the organism from scratch on teacher traces")
    train.add_argument("--out", help="output folder (default: the shipped checkpoint, analyses/assets/organism)")
    train.add_argument("--quick", action="store_true", help="a tiny organism in a few minutes (for CI)")
    train.add_argument("--seed", type=int)
    train.add_argument("--max-steps", type=int)
    train.add_argument("--minutes", type=float, help="time budget of the training loop")
    train.add_argument("--format", choices=("v2", "v3"), help="trace format: v2 marks phase 2 with 'Check', v3 with no word (default: v2)")
    train.set_defaults(func=_cmd_organism_train)

    student = sub.add_parser("student", help="the student base distillation starts from")
    student_sub = student.add_subparsers(dest="student_command", required=True)
    strain = student_sub.add_parser("train", help="train the student base on notes and the code dictionary (no task format)")
    strain.add_argument("--out", help="output folder (default: the shipped base, analyses/assets/student_base)")
    strain.add_argument("--teacher", help="the teacher folder whose tokenizer and label space it uses (default: the organism)")
    strain.add_argument("--quick", action="store_true", help="a tiny base in about a minute (for CI)")
    strain.add_argument("--minutes", type=float, help="time budget of the training loop")
    strain.set_defaults(func=_cmd_student_train)

    traces = sub.add_parser("traces", help="generate and parse traces into a run directory (or parse a serving engine's, --from)")
    traces.add_argument("--out", required=True, help="run directory")
    traces.add_argument("--from", dest="from_file", metavar="FILE.jsonl", help='parse the completions a serving engine wrote instead of generating: one {"doc_id", "completion"} or {"doc_id", "reasoning", "answer"} per line; rows of dev documents become the dev traces (--n-docs, --n-dev-docs and the generation flags do not apply)')
    traces.add_argument("--model", help="model folder (default: the organism)")
    traces.add_argument("--dataset", nargs="+", metavar=("SOURCE", "PATH"), help="dataset source and its folder")
    traces.add_argument("--split", help="documents' split (default test)")
    traces.add_argument("--n-docs", type=int, help="traces written (default 100)")
    traces.add_argument("--n-dev-docs", type=int, help="dev-split traces written beside them (default: 100 for the organism, 50 for other models; heads are ranked on them)")
    traces.add_argument("--template", help="prompt template name (default: the model's chat template, else its family's plain one)")
    traces.add_argument("--batch-size", type=int)
    traces.add_argument("--max-new-tokens", type=int)
    traces.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    traces.add_argument("--seed", type=int)
    traces.add_argument("--opt", action="append", help="dataset option KEY=VALUE (repeatable)")
    traces.add_argument("--device-map", help="accelerate device map for one model across a node's GPUs (e.g. auto)")
    _common(traces)
    traces.set_defaults(func=_cmd_traces)

    cap = sub.add_parser("capture", help="replay a run's traces and store activations and attention statistics")
    cap.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory with traces.parquet (spell it --run-dir under torchrun, whose own --run-path takes --run)")
    cap.add_argument("--points", nargs="+", help="points: keys (resid_post = every layer), KEY@LAYER, or hook names (default resid_post head_out)")
    cap.add_argument("--positions", choices=["output", "cot", "mentions", "all"])
    cap.add_argument("--attention-layers", help="layers whose attention is reduced: all, none or 0,1,...")
    cap.add_argument("--batch-size", type=int)
    cap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"])
    cap.add_argument("--padding", choices=["left", "right"])
    cap.add_argument("--attention", choices=["auto", "fused", "eager"], help="fused: statistics from q, k, v without a T x T pattern (default); eager: the full pattern")
    cap.add_argument("--device-map", help="accelerate device map for one model across a node's GPUs (e.g. auto)")
    _common(cap)
    cap.set_defaults(func=_cmd_capture)

    char = sub.add_parser("characterize", help="dynamics, boundary, head scores, attribution, probes and logit lens")
    char.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory with traces and activations")
    char.add_argument("--n-boot", type=int, help="bootstrap draws for CIs")
    char.add_argument("--seed", type=int)
    char.add_argument("--tune-boundary", action="store_true", help="choose the internal boundary estimator's settings on the run's dev traces (writes boundary_tuning.parquet)")
    char.add_argument("--boundary-channels", choices=["probe", "regions", "document", "all"], help="internal estimator channels (default: the tuned choice)")
    char.add_argument("--boundary-smoothing", type=float, help="internal estimator smoothing, fraction of the CoT (default: the tuned choice)")
    char.add_argument("--boundary-c", type=float, help="internal estimator probe's inverse regularisation (default: the tuned choice)")
    _common(char)
    char.set_defaults(func=_cmd_characterize)

    patch = sub.add_parser("patch", help="every head's causal effect (sweep and attribution) and whether the phase scores find the causal heads")
    patch.add_argument("--run", "--run-dir", dest="run", required=True)
    patch.add_argument("--n-docs", type=int, help="test traces patched (default 40)")
    patch.add_argument("--n-random", type=int, help="seeded draws of k random heads (outside the ranked top k)")
    patch.add_argument("--what", choices=["z", "pattern"], help="patch head outputs (hook_z, default) or attention patterns")
    patch.add_argument("--positions", nargs="+", choices=["all", "phase1", "phase2"], help="position sets of the per-head sweep (default: all three)")
    patch.add_argument("--no-sweep", action="store_true", help="attribution patching only (models too large to sweep)")
    patch.add_argument("--no-regenerate", action="store_true", help="teacher-forced read-outs only")
    patch.add_argument("--seed", type=int)
    patch.add_argument("--device-map", help="accelerate device map for one model across a node's GPUs (e.g. auto)")
    _common(patch)
    patch.set_defaults(func=_cmd_patch)

    abl = sub.add_parser("ablate", help="heads mean-ablated while the model regenerates its CoT and answer")
    abl.add_argument("--run", "--run-dir", dest="run", required=True)
    abl.add_argument("--n-docs", type=int)
    abl.add_argument("--n-random", type=int)
    abl.add_argument("--seed", type=int)
    _common(abl)
    abl.set_defaults(func=_cmd_ablate)

    iso = sub.add_parser("isolate", help="truncation, shortlist injection, retriever baselines and complementarity")
    iso.add_argument("--run", "--run-dir", dest="run", required=True)
    iso.add_argument("--retriever-k", type=int)
    iso.add_argument("--other-run", help="another run directory whose shortlists are injected (other_shortlist+phase2)")
    iso.add_argument("--n-docs", type=int)
    iso.add_argument("--seed", type=int)
    _common(iso)
    iso.set_defaults(func=_cmd_isolate)

    dist = sub.add_parser("distill", help="standard vs mechanistic distillation from the student base, with ablations")
    dist.add_argument("--run", "--run-dir", dest="run", required=True)
    dist.add_argument("--quick", action="store_true", help="two conditions, few notes and steps (a smoke test)")
    dist.add_argument("--pilot", action="store_true", help="the learning-curve pilot on dev notes that chooses the default steps (writes distill_pilot.parquet)")
    dist.add_argument("--steps", type=int)
    dist.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    dist.add_argument("--student", help="folder of the student base (default: the shipped one)")
    dist.add_argument("--conditions", nargs="+", help="conditions to train (standard, mechanistic, standard_equal_compute, no_phase1, no_phase2, no_attn, no_loop, no_write, no_int)")
    _common(dist)
    dist.set_defaults(func=_cmd_distill)

    rep = sub.add_parser("report", help="figures (HTML, PNG) and report.html of a run")
    rep.add_argument("--run", "--run-dir", dest="run", required=True)
    _common(rep)
    rep.set_defaults(func=_cmd_report)

    data = sub.add_parser("data", help="inspect dataset sources")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    show = data_sub.add_parser("show", help="counts, label-frequency statistics and three examples")
    show.add_argument("source", help="icd10cm, xc-repo, mimic-iv-icd10 or jsonl")
    show.add_argument("path", nargs="?", help="the source's folder (not needed for icd10cm)")
    show.add_argument("--chapters", help="icd10cm: comma-separated chapters (e.g. 9,10 or I00-I99)")
    show.add_argument("--n-docs", type=int, help="icd10cm: how many notes to generate")
    show.add_argument("--opt", action="append", help="source option KEY=VALUE (repeatable)")
    show.set_defaults(func=_cmd_data_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    from analyses.machinery.io import RunLock, check_run_name

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        target = getattr(args, "run", None) or (getattr(args, "out", None) if args.command in ("run", "traces") else None)
        if args.command == "run":
            from analyses.machinery.settings import load_config

            target = args.out or load_config(args.config, args.set or []).out
            check_run_name(target)
        if target is None:
            return int(args.func(args) or 0)
        with RunLock(target):
            return int(args.func(args) or 0)
    except CtdInputError as exc:
        print(f"ctd: error: {exc}", file=sys.stderr)
        return 2
    except CtdError as exc:
        print(f"ctd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ctd: interrupted; finished files are kept and a rerun resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

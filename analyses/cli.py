"""The ``ctd`` command line. Input errors print one line to stderr and exit with code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from probes.errors import CtdError, CtdInputError

__all__ = ["main"]


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


def _cmd_data_show(args) -> int:
    from analyses.summary import dataset_summary
    from analyses.tasks.sources import load_dataset

    options = _dataset_options(args)
    dataset = load_dataset(args.source, args.path, **options)
    print(dataset_summary(dataset, n_examples=3))
    return 0


def _cmd_run(args) -> int:
    from analyses.config import load_config
    from analyses.pipeline import run_study

    config = load_config(
        args.config,
        out=args.out,
        model=args.model,
        dataset=args.dataset,
        dataset_path=args.dataset_path,
        quick=True if args.quick else None,
        seed=args.seed,
    )
    if args.opt:
        config.dataset_options = {**config.dataset_options, **dict(_parse_option(o) for o in args.opt)}
    run_study(config, until=args.until)
    return 0


def _cmd_organism_train(args) -> int:
    from analyses.organism import OrganismConfig, default_organism_path, train_organism

    config = OrganismConfig.quick_config() if args.quick else OrganismConfig()
    if args.seed is not None:
        config.seed = args.seed
    if args.max_steps is not None:
        config.max_steps = args.max_steps
    if args.minutes is not None:
        config.time_budget_s = 60.0 * args.minutes
    out = Path(args.out) if args.out else default_organism_path()
    path = train_organism(out, config)
    meta = json.loads((path / "ctd_organism.json").read_text())
    print(json.dumps({"out": str(path), "steps": meta["steps"], "train_seconds": meta["train_seconds"], **meta["heldout"]}, indent=2))
    return 0


def _cmd_traces(args) -> int:
    from analyses.tasks.sources import load_dataset
    from analyses.traces import GenerationConfig, write_traces

    options = dict(_parse_option(o) for o in (args.opt or []))
    source = args.dataset[0] if args.dataset else "icd10cm"
    path = args.dataset[1] if args.dataset and len(args.dataset) > 1 else None
    if source == "icd10cm" and path is None:
        from analyses.config import DEFAULT_LABEL_CHAPTERS, DEFAULT_N_NOTES

        options.setdefault("chapters", list(DEFAULT_LABEL_CHAPTERS))
        options.setdefault("n_docs", DEFAULT_N_NOTES)
    dataset = load_dataset(source, path, **options)
    config = GenerationConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, do_sample=args.sample, seed=args.seed or 0, device_map=args.device_map)
    write_traces(args.out, dataset, model=args.model, split=args.split, n_docs=args.n_docs, template_name=args.template, config=config, n_dev_docs=args.n_dev_docs)
    return 0


def _cmd_capture(args) -> int:
    from analyses.capture_stage import capture_run

    layers = args.attention_layers
    if layers not in ("all", "none"):
        try:
            layers = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise CtdInputError(f"--attention-layers {args.attention_layers!r}: use all, none or a list like 0,1,2") from None
    points = [p for item in (args.points or []) for p in item.split(",") if p]
    capture_run(args.run, points=points or None, attention_layers=layers, positions=args.positions, batch_size=args.batch_size, dtype=args.dtype, padding=args.padding, device_map=args.device_map)
    return 0


def _cmd_characterize(args) -> int:
    from analyses.boundary import InternalSettings
    from analyses.characterize import characterize_run, tune_boundary_run

    if args.tune_boundary:
        table = tune_boundary_run(args.run, seed=args.seed)
        print(table.head(12).to_string(index=False))
        best = table.iloc[0]
        shipped = InternalSettings()
        same = best["channels"] == shipped.channels and abs(best["smoothing"] - shipped.smoothing) < 1e-9
        print(f"selected on {int(best['n'])} dev traces: channels={best['channels']}, smoothing={best['smoothing']:.2f} "
              f"({'the shipped default' if same else f'shipped default: channels={shipped.channels}, smoothing={shipped.smoothing:.2f}'}); "
              f"all {len(table)} choices in {Path(args.run) / 'boundary_tuning.parquet'}")
        return 0
    internal = InternalSettings(**{k: v for k, v in (("channels", args.boundary_channels), ("smoothing", args.boundary_smoothing)) if v is not None})
    results = characterize_run(args.run, n_boot=args.n_boot, seed=args.seed, internal=internal)
    errors = results["boundary"].errors(n_boot=args.n_boot, seed=args.seed)
    if not errors.empty:
        print(errors.to_string(index=False))
    for score in ("coarse", "refine"):
        top = results["head_scores"].top(score, 3)
        print(f"top {score} heads: " + ", ".join(f"L{r.layer}H{r.head} {r.value:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]" for r in top.itertuples()))
    return 0


def _as_stage(run: str, name: str, settings: dict, outputs: list[str], produce):
    """Run ``produce(manifest)`` as stage ``name`` of the run: recorded (settings, timing, output
    hashes) exactly as ``ctd run`` records it, so either command can pick up after the other."""
    from analyses.io import Manifest

    manifest = Manifest(run)
    manifest.verify_complete(skip=(name,))  # this stage is redone; the ones it reads must be intact
    with manifest.stage(name, config=settings, seed=settings.get("seed")) as record:
        result = produce(manifest)
        record["outputs"] = outputs
    return result


def _cmd_patch(args) -> int:
    from dataclasses import asdict

    from analyses.patch import PatchSettings, patch_run

    settings = PatchSettings(n_docs=args.n_docs, n_random=args.n_random, seed=args.seed, what=args.what, sweep=not args.no_sweep, regenerate=not args.no_regenerate, device_map=args.device_map)
    if args.positions:
        settings.sweep_positions = tuple(args.positions)

    def produce(manifest):
        result = patch_run(args.run, settings, manifest=manifest)
        result.save(Path(args.run) / "patching.parquet")
        return result

    result = _as_stage(args.run, "patch", asdict(settings), ["patching.parquet"], produce)
    corr = result.correlations()
    corr = corr[corr["metric"] == "spearman"]
    print(f"patching.parquet: every head's effect over {result.meta['n_traces']} traces")
    print(corr[["score", "mode", "readout", "value", "ci_low", "ci_high", "p_value"]].to_string(index=False))
    return 0


def _cmd_isolate(args) -> int:
    from analyses.isolate import isolate_run

    settings = {"n_docs": args.n_docs, "seed": args.seed, "retriever_k": args.retriever_k, "other_run": args.other_run}

    def produce(manifest):
        result = isolate_run(args.run, retriever_k=args.retriever_k, other_run=args.other_run, n_docs=args.n_docs, seed=args.seed, manifest=manifest)
        result.save(Path(args.run) / "isolation.parquet")
        return result

    result = _as_stage(args.run, "isolate", settings, ["isolation.parquet"], produce)
    f1 = result.frame[result.frame["metric"] == "micro_f1"]
    print(f1[["condition", "value", "ci_low", "ci_high"]].to_string(index=False))
    print(f"complementarity: {result.verdict()}")
    return 0


def _cmd_distill(args) -> int:
    from dataclasses import asdict

    from analyses.distill import DistillConfig, distill_run

    config = DistillConfig.pilot() if args.pilot else DistillConfig.quick() if args.quick else DistillConfig()
    if args.steps is not None:
        config.steps = args.steps
    if args.seeds is not None:
        config.seeds = tuple(range(args.seeds))
    if args.student is not None:
        config.student = str(Path(args.student).resolve())
    if args.conditions:
        config.conditions = tuple(args.conditions)
    stem = "distill_pilot" if args.pilot else "distill"

    def produce(manifest):
        result = distill_run(args.run, config, manifest=manifest)
        result.save(Path(args.run) / f"{stem}.parquet")
        return result

    outputs = [f"{stem}.parquet", "head_map.json"] if args.pilot else ["distill.parquet", "head_map.json", "students/"]
    result = _as_stage(args.run, stem, asdict(config), outputs, produce)
    finals = result.finals.groupby(["condition", "metric"])["value"].mean().unstack()
    print(finals[[c for c in ("micro_f1", "gold_logprob", "ce_phase2", "transfer_kl_phase1", "transfer_kl_phase2", "steps") if c in finals]].to_string())
    diffs = result.differences
    if len(diffs):
        print(diffs[diffs["metric"].str.startswith(("micro_f1", "gold_logprob"))][["condition", "metric", "value", "ci_low", "ci_high", "p_value", "p_holm"]].to_string(index=False))
    print(f"training notes cover {result.meta['coverage']['share_seen_in_training_traces']:.1%} of the evaluation gold codes")
    return 0


def _cmd_student_train(args) -> int:
    from analyses.student import StudentBaseConfig, default_student_base_path, train_student_base

    config = StudentBaseConfig.quick() if args.quick else StudentBaseConfig()
    if args.minutes is not None:
        config.time_budget_s = 60.0 * args.minutes
    out = Path(args.out) if args.out else default_student_base_path()
    path = train_student_base(out, args.teacher, config)
    meta = json.loads((path / "ctd_student.json").read_text())
    print(json.dumps({"out": str(path), "steps": meta["steps"], "train_seconds": meta["train_seconds"], **meta["before_distillation"]}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctd", description="characterize-then-distill: phases of label selection in reasoning models")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the whole study on the embedded default (or --model / --dataset)")
    run.add_argument("--model", help="folder of a Hugging Face causal LM (default: the embedded organism)")
    run.add_argument("--dataset", help="dataset source name (icd10cm, xc-repo, mimic-iv-icd10, jsonl)")
    run.add_argument("--dataset-path", help="folder of the dataset's files")
    run.add_argument("--out", help="run directory (default results/ctd-default)")
    run.add_argument("--config", help="TOML file of settings (see analyses/config.py)")
    run.add_argument("--quick", action="store_true", help="small settings for a smoke run")
    run.add_argument("--seed", type=int)
    run.add_argument("--opt", action="append", help="dataset option KEY=VALUE (repeatable)")
    run.add_argument("--until", help="stop after this stage (data, traces, capture, characterize, patch, isolate, distill, report)")
    run.set_defaults(func=_cmd_run)

    organism = sub.add_parser("organism", help="the embedded reasoning model")
    org_sub = organism.add_subparsers(dest="organism_command", required=True)
    train = org_sub.add_parser("train", help="train the organism from scratch on teacher traces")
    train.add_argument("--out", help="output folder (default: the shipped checkpoint, analyses/assets/organism)")
    train.add_argument("--quick", action="store_true", help="a tiny organism in a few minutes (for CI)")
    train.add_argument("--seed", type=int)
    train.add_argument("--max-steps", type=int)
    train.add_argument("--minutes", type=float, help="time budget of the training loop")
    train.set_defaults(func=_cmd_organism_train)

    traces = sub.add_parser("traces", help="generate and parse traces into a run directory")
    traces.add_argument("--out", required=True, help="run directory")
    traces.add_argument("--model", help="model folder (default: the organism)")
    traces.add_argument("--dataset", nargs="+", metavar=("SOURCE", "PATH"), help="dataset source and its folder")
    traces.add_argument("--split", default="test")
    traces.add_argument("--n-docs", type=int)
    traces.add_argument("--n-dev-docs", type=int, help="dev-split traces written beside them (default: 100 for the organism, else 0)")
    traces.add_argument("--template", help="prompt template name (default: the model family's plain template)")
    traces.add_argument("--batch-size", type=int, default=32)
    traces.add_argument("--max-new-tokens", type=int, default=768)
    traces.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    traces.add_argument("--seed", type=int)
    traces.add_argument("--opt", action="append", help="dataset option KEY=VALUE (repeatable)")
    traces.add_argument("--device-map", help="accelerate device map for one model across a node's GPUs (e.g. auto)")
    traces.set_defaults(func=_cmd_traces)

    cap = sub.add_parser("capture", help="replay a run's traces and store activations and attention statistics")
    cap.add_argument("--run", required=True, help="run directory with traces.parquet")
    cap.add_argument("--points", nargs="+", help="points: keys (resid_post = every layer), KEY@LAYER, or hook names (default resid_post)")
    cap.add_argument("--positions", default="output", choices=["output", "cot", "mentions", "all"])
    cap.add_argument("--attention-layers", default="all", help="layers whose attention is reduced: all, none or 0,1,...")
    cap.add_argument("--batch-size", type=int, default=8)
    cap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    cap.add_argument("--padding", default="left", choices=["left", "right"])
    cap.add_argument("--device-map", help="accelerate device map for one model across a node's GPUs (e.g. auto)")
    cap.set_defaults(func=_cmd_capture)

    char = sub.add_parser("characterize", help="dynamics, boundary, head scores, attribution, probes and logit lens")
    char.add_argument("--run", required=True, help="run directory with traces and activations")
    char.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws for CIs")
    char.add_argument("--seed", type=int, default=0)
    char.add_argument("--tune-boundary", action="store_true", help="choose the internal boundary estimator's channels and smoothing on the run's dev traces (writes boundary_tuning.parquet)")
    char.add_argument("--boundary-channels", choices=["regions", "document", "all"], help="internal estimator channels (default: the tuned choice)")
    char.add_argument("--boundary-smoothing", type=float, help="internal estimator smoothing, fraction of the CoT (default: the tuned choice)")
    char.set_defaults(func=_cmd_characterize)

    patch = sub.add_parser("patch", help="every head's causal effect (sweep and attribution) and whether the phase scores find the causal heads")
    patch.add_argument("--run", required=True)
    patch.add_argument("--n-docs", type=int, default=40)
    patch.add_argument("--n-random", type=int, default=3, help="seeded draws of k random heads (outside the ranked top k)")
    patch.add_argument("--what", default="z", choices=["z", "pattern"], help="patch head outputs (hook_z) or attention patterns")
    patch.add_argument("--positions", nargs="+", choices=["all", "phase1", "phase2"], help="position sets of the per-head sweep (default: all three)")
    patch.add_argument("--no-sweep", action="store_true", help="attribution patching only (models too large to sweep)")
    patch.add_argument("--no-regenerate", action="store_true", help="teacher-forced read-outs only")
    patch.add_argument("--device-map", help="accelerate device map for one model across a node's GPUs (e.g. auto)")
    patch.add_argument("--seed", type=int, default=0)
    patch.set_defaults(func=_cmd_patch)

    iso = sub.add_parser("isolate", help="truncation, shortlist injection, retriever baselines and complementarity")
    iso.add_argument("--run", required=True)
    iso.add_argument("--retriever-k", type=int, default=5)
    iso.add_argument("--other-run", help="another run directory whose shortlists are injected (other_shortlist+phase2)")
    iso.add_argument("--n-docs", type=int)
    iso.add_argument("--seed", type=int, default=0)
    iso.set_defaults(func=_cmd_isolate)

    dist = sub.add_parser("distill", help="standard vs mechanistic distillation from the student base, with ablations")
    dist.add_argument("--run", required=True)
    dist.add_argument("--quick", action="store_true", help="two conditions, few notes and steps (a smoke test)")
    dist.add_argument("--pilot", action="store_true", help="the learning-curve pilot on dev notes that chooses the default steps (writes distill_pilot.parquet)")
    dist.add_argument("--steps", type=int)
    dist.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    dist.add_argument("--student", help="folder of the student base (default: the shipped one)")
    dist.add_argument("--conditions", nargs="+", help="conditions to train (standard, mechanistic, standard_equal_compute, no_phase1, no_phase2, no_attn, no_loop, no_write, no_int)")
    dist.set_defaults(func=_cmd_distill)

    student = sub.add_parser("student", help="the student base distillation starts from")
    student_sub = student.add_subparsers(dest="student_command", required=True)
    strain = student_sub.add_parser("train", help="train the student base on notes and the code dictionary (no task format)")
    strain.add_argument("--out", help="output folder (default: the shipped base, analyses/assets/student_base)")
    strain.add_argument("--teacher", help="the teacher folder whose tokenizer and label space it uses (default: the organism)")
    strain.add_argument("--quick", action="store_true", help="a tiny base in about a minute (for CI)")
    strain.add_argument("--minutes", type=float, help="time budget of the training loop")
    strain.set_defaults(func=_cmd_student_train)

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
    from analyses.io import RunLock, check_run_name

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        target = getattr(args, "run", None) or (getattr(args, "out", None) if args.command in ("run", "traces") else None)
        if args.command == "run":
            from analyses.config import RunConfig

            target = args.out or RunConfig().out
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

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
    run_study(config)
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
    run.set_defaults(func=_cmd_run)

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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
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

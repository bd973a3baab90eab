"""Mutation check: every guarantee the suite claims is guarded by a test that fails when it breaks.

Each mutant below re-introduces one named bug (a one-snippet edit of one file). For each, the
script copies the working tree to a scratch folder, applies the edit there, runs the tests that
guard the guarantee, and expects them to FAIL. A mutant whose tests still pass has "survived": the
guarantee is not really tested. The working tree is never modified.

    python scripts/mutants.py            # every mutant (about 10 min on 2 CPU cores)
    python scripts/mutants.py --list     # the table
    python scripts/mutants.py --check    # each edit still applies and its tests exist (runs no test)
    python scripts/mutants.py --only window_query_identity lock_takes_incomplete
    python scripts/mutants.py --clean    # first check that the guarding tests pass unmutated

Exit code 0 when every mutant is killed; 1 when one survives or its edit no longer applies.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    guarantee: str
    path: str  # file to edit, relative to the repository root
    old: str  # must occur exactly once in that file
    new: str
    tests: tuple[str, ...]  # pytest node ids that must fail
    env: tuple[tuple[str, str], ...] = ()  # extra environment for the tests


# The quick run the patch-stage tests read needs no stage after patch.
_UNTIL_PATCH = (("CTD_QUICK_RUN_UNTIL", "patch"),)

MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "pattern_patch_ignores_positions",
        "pattern patching writes only the chosen query rows",
        "probes/patching.py",
        "where = hm[:, :, None] & positions[:, None, :]  # [batch, head, query]",
        "where = hm[:, :, None] & torch.ones_like(positions)[:, None, :]",
        ("tests/integration/test_patching.py::test_pattern_patching_acts_only_at_the_patched_query_rows", "tests/integration/test_patching.py::test_patch_positions_outside_the_mask_and_other_heads_are_untouched"),
    ),
    Mutant(
        "z_patch_ignores_positions",
        "head-output patching writes only the chosen positions",
        "probes/patching.py",
        "where = positions[:, :, None] & hm[:, None, :]  # [batch, pos, head]",
        "where = torch.ones_like(positions)[:, :, None] & hm[:, None, :]",
        ("tests/integration/test_patching.py::test_patch_positions_outside_the_mask_and_other_heads_are_untouched",),
    ),
    Mutant(
        "patch_every_head",
        "patching writes only the chosen heads",
        "probes/patching.py",
        "hm = head_mask if head_mask.dim() == 2 else head_mask.expand(tensor.shape[0], -1)\n                where = positions",
        "hm = torch.ones_like(head_mask if head_mask.dim() == 2 else head_mask.expand(tensor.shape[0], -1))\n                where = positions",
        ("tests/integration/test_patching.py::test_patch_positions_outside_the_mask_and_other_heads_are_untouched",),
    ),
    Mutant(
        "window_query_identity",
        "the window path maps each requested query to its own row under left padding",
        "probes/attention.py",
        "local_index = query_index - start",
        "local_index = torch.arange(query_index.shape[1]).expand_as(query_index)",
        ("tests/unit/test_attention_reductions.py::test_unequal_rows_equal_per_row_statistics",),
    ),
    Mutant(
        "control_task_per_row",
        "the control task fixes one random label per token type (Hewitt & Liang)",
        "analyses/stages/characterize.py",
        "control_labels(tokens[:, 0], float(train_y.mean()), seed)",
        "control_labels(np.arange(len(tokens)), float(train_y.mean()), seed)",
        ("tests/unit/test_probe_baselines.py::test_control_task_is_memorisable_when_features_carry_the_token_type",),
    ),
    Mutant(
        "selectivity_ci_nan",
        "probe selectivity carries its paired bootstrap CI",
        "analyses/stages/characterize.py",
        '"selectivity_ci_low": sel_lo, "selectivity_ci_high": sel_hi',
        '"selectivity_ci_low": np.nan, "selectivity_ci_high": np.nan',
        ("tests/unit/test_probe_baselines.py::test_selectivity_ci_is_the_paired_document_bootstrap",),
    ),
    Mutant(
        "control_rate_reads_test_rows",
        "the control task's positive rate comes from training rows only",
        "analyses/stages/characterize.py",
        "float(train_y.mean())",
        "float(labels.mean())",
        ("tests/unit/test_probe_baselines.py::test_control_rate_comes_from_training_rows",),
    ),
    Mutant(
        "anchor_direction_attached",
        "the anchor direction is detached: L_write never moves the unembedding",
        "analyses/methods/distillation/losses.py",
        "a_dir = w_u[e.anchors].mean(0).detach().float()",
        "a_dir = w_u[e.anchors].mean(0).float()",
        ("tests/integration/test_distill.py::test_l_write_reaches_exactly_the_head_and_the_stream_it_reads",),
    ),
    Mutant(
        "write_reads_another_heads_columns",
        "a head's write is its own slice of the output projection",
        "analyses/methods/distillation/losses.py",
        "w = attn.o_proj.weight[:, head * d_head : (head + 1) * d_head]",
        "w = attn.o_proj.weight[:, :d_head]",
        ("tests/integration/test_distill.py::test_l_write_reaches_exactly_the_head_and_the_stream_it_reads",),
    ),
    Mutant(
        "lock_takes_over_an_incomplete_lock",
        "a run lock is never taken from a live owner (an unreadable lock is refused, not removed)",
        "analyses/machinery/io.py",
        '                raise input_error(self.path, "the run lock is empty or unreadable", "delete the lock file if no ctd process is running")',
        "                self.path.unlink(missing_ok=True)\n                continue",
        ("tests/unit/test_run_lock.py::test_an_empty_lock_is_refused_not_taken_over",),
    ),
    Mutant(
        "lock_stale_takeover_without_recheck",
        "two processes that find the same stale lock never both hold it",
        "analyses/machinery/io.py",
        "            if current == info:\n                self.path.unlink(missing_ok=True)",
        "            self.path.unlink(missing_ok=True)",
        ("tests/unit/test_run_lock.py::test_a_stale_lock_taken_over_meanwhile_by_another_process_is_kept", "tests/unit/test_run_lock.py::test_one_of_two_processes_takes_a_stale_lock_over"),
    ),
    Mutant(
        "lock_created_empty_then_written",
        "the lock file appears with its owner's record complete",
        "analyses/machinery/io.py",
        "                os.link(tmp, self.path)",
        "                raise PermissionError(1, 'no links')",
        ("tests/unit/test_run_lock.py::test_the_lock_appears_with_its_record_complete",),
    ),
    Mutant(
        "boundary_tuning_reads_test_traces",
        "--tune-boundary chooses its settings on dev traces only",
        "analyses/stages/characterize.py",
        "    traces = _usable_traces(dev_path)\n    missing = sorted(",
        '    traces = pd.concat([_usable_traces(dev_path), _usable_traces(run_dir / "traces.parquet")], ignore_index=True)\n    missing = sorted(',
        ("tests/integration/test_characterize_organism.py::test_boundary_tuning_reads_dev_traces_only",),
    ),
    Mutant(
        "fixture_shares_a_training_note",
        "the organism fixture shares no note with the organism's 40,400 notes",
        "tests/conftest.py",
        "FIXTURE_NOTE_SEED = 20262",
        "FIXTURE_NOTE_SEED = 20261",
        ("tests/unit/test_icd10_and_notes.py::test_the_organism_fixture_shares_no_note_with_the_default_runs_dev_notes",),
    ),
    Mutant(
        "no_dev_traces_outside_the_organism",
        "ctd run draws dev traces for every model",
        "analyses/stages/traces.py",
        'return 100 if template_for(Path(model_dir), template_name).family == "organism" else 50',
        'return 100 if template_for(Path(model_dir), template_name).family == "organism" else 0',
        ("tests/integration/test_dev_split.py::test_ctd_run_on_another_family_writes_dev_traces",),
    ),
    Mutant(
        "report_hard_codes_the_dev_split",
        "the report's ranking sentence follows the patching table's own record",
        "analyses/results/report.py",
        "        ranked_on, measured_on = ranking_splits(patching.meta)\n",
        '        ranked_on, measured_on = "dev traces", "test traces"\n',
        ("tests/integration/test_dev_split.py::test_the_report_names_the_traces_heads_were_ranked_on",),
        env=_UNTIL_PATCH,
    ),
    Mutant(
        "patch_ranks_on_test_traces",
        "the patch stage never ranks heads on the test traces it measures",
        "analyses/stages/patch.py",
        "    if not dev_scores_path.exists():\n        raise input_error(",
        '    if not dev_scores_path.exists():\n        dev_scores_path = run_dir / "head_scores.parquet"\n    if False:\n        raise input_error(',
        ("tests/integration/test_dev_split.py::test_the_report_names_the_traces_heads_were_ranked_on",),
        env=_UNTIL_PATCH,
    ),
    Mutant(
        "all_heads_set_misses_a_head",
        "patching.parquet: patching every head recovers the whole gap",
        "analyses/stages/patch.py",
        "head_set_effects(bridge, inputs, readouts, [heads_all], positions",
        "head_set_effects(bridge, inputs, readouts, [heads_all[1:]], positions",
        ("tests/integration/test_patch_stage.py::test_patching_every_head_recovers_the_whole_gap_in_the_stored_table",),
        env=_UNTIL_PATCH,
    ),
    Mutant(
        "agreement_not_from_the_two_maps",
        "patching.parquet: the stored attribution-vs-sweep agreement is the Spearman of the two maps",
        "analyses/stages/patch.py",
        '"value": _spearman(attr, point), "ci_low": lo',
        '"value": _spearman(point, point), "ci_low": lo',
        ("tests/integration/test_patch_stage.py::test_attribution_agrees_with_the_sweep_as_stored",),
        env=_UNTIL_PATCH,
    ),
    Mutant(
        "dev_scores_computed_on_test_traces",
        "the ranking later stages act on is computed on dev traces",
        "analyses/stages/characterize.py",
        "dev_scores = compute_head_scores(store, bridge, dev, dataset.docs, dataset.labels, dev_tau, n_boot, seed)",
        "dev_scores = compute_head_scores(store, bridge, traces, dataset.docs, dataset.labels, internal_tau, n_boot, seed)",
        ("tests/integration/test_characterize_organism.py::test_dev_head_scores_come_from_dev_traces",),
    ),
    Mutant(
        "patch_ranks_with_the_test_scores",
        "the patch stage ranks heads with the dev scores it records",
        "analyses/stages/patch.py",
        '    scores, ranked_on = dev_scores.frame, dev_scores.meta.get("traces") or "dev traces"',
        '    scores, ranked_on = HeadScores.load(run_dir / "head_scores.parquet").frame, dev_scores.meta.get("traces") or "dev traces"',
        ("tests/integration/test_dev_split.py::test_patching_ranks_heads_with_the_dev_scores_it_records",),
        env=_UNTIL_PATCH,
    ),
    Mutant(
        "control_task_keyed_on_previous_token",
        "the control task's label is fixed per current token type",
        "analyses/stages/characterize.py",
        "control_labels(tokens[:, 0], float(train_y.mean()), seed)",
        "control_labels(tokens[:, 1], float(train_y.mean()), seed)",
        ("tests/unit/test_probe_baselines.py::test_control_task_is_memorisable_when_features_carry_the_token_type",),
    ),
    Mutant(
        "control_bank_fitted_on_every_row",
        "the control task is fitted on the training documents only",
        "analyses/stages/characterize.py",
        "control_fit = fit_probe_bank(controls, train_masks)",
        "control_fit = fit_probe_bank(controls, [np.ones_like(m) for m in train_masks])",
        ("tests/unit/test_probe_baselines.py::test_every_baseline_is_fitted_on_the_training_documents_only",),
    ),
    Mutant(
        "token_baseline_reads_held_out_labels",
        "the token-identity baseline learns from training rows only",
        "analyses/stages/characterize.py",
        "token_identity_predict(tokens[~test], p.labels[~test], tokens[test])",
        "token_identity_predict(tokens, p.labels, tokens[test])",
        ("tests/unit/test_probe_baselines.py::test_token_baseline_reads_training_labels_not_held_out_ones",),
    ),
    Mutant(
        "lock_ignores_the_owners_host",
        "a lock owned on another machine is never taken over",
        "analyses/machinery/io.py",
        "        if info.get(\"host\") != platform.node():\n            return True  # another machine: cannot tell, so respect it\n",
        "",
        ("tests/unit/test_run_lock.py::test_an_owner_on_another_host_is_respected_whatever_its_pid",),
    ),
    Mutant(
        "lock_takes_an_owner_it_may_not_signal",
        "a live owner under another user is respected",
        "analyses/machinery/io.py",
        "        except PermissionError:\n            return True",
        "        except PermissionError:\n            return False",
        ("tests/unit/test_run_lock.py::test_an_owner_we_may_not_signal_is_alive",),
    ),
    Mutant(
        "attribution_from_the_wrong_baseline",
        "patching.parquet: attribution estimates are in the sweep's units (patched from the right run)",
        "analyses/stages/patch.py",
        'base = runs.corrupt[r] if mode == "denoise" else runs.clean[r]',
        'base = runs.clean[r] if mode == "denoise" else runs.corrupt[r]',
        ("tests/integration/test_patch_stage.py::test_attribution_agrees_with_the_sweep_as_stored",),
        env=_UNTIL_PATCH,
    ),
)


def _tree_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files: what a fresh clone plus this change would hold."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [f for f in out.stdout.decode().split("\0") if f and (ROOT / f).is_file()]


def _copy_tree(dest: Path) -> None:
    for rel in _tree_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)


def _apply(copy: Path, mutant: Mutant) -> None:
    path = copy / mutant.path
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(f"mutant {mutant.name}: its snippet occurs {count} times in {mutant.path} (expected once); update scripts/mutants.py to the code")
    path.write_text(text.replace(mutant.old, mutant.new))


def _check(mutant: Mutant) -> list[str]:
    """What keeps ``mutant`` from running as written: its snippet not found exactly once in its file,
    or a guarding test that is not defined (read from the source; nothing is imported or run)."""
    problems = []
    path = ROOT / mutant.path
    count = path.read_text().count(mutant.old) if path.is_file() else None
    if count != 1:
        problems.append(f"{mutant.path}: {'no such file' if count is None else f'its snippet occurs {count} times (expected once)'}")
    for test in mutant.tests:
        file, _, name = test.partition("::")
        source = ROOT / file
        if not source.is_file() or f"def {name}(" not in source.read_text():
            problems.append(f"{test}: no such test")
    return problems


def _run_tests(copy: Path, tests: tuple[str, ...], extra_env: tuple[tuple[str, str], ...] = ()) -> tuple[int, str]:
    # The copy's packages come first on the path (ahead of the editable install of the real tree),
    # also for subprocesses the tests start.
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1", **dict(extra_env)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=copy, env=env, capture_output=True, text=True)
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]
    return proc.returncode, lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the table and exit")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--clean", action="store_true", help="first check that every guarding test passes on the unmutated tree")
    parser.add_argument("--check", action="store_true", help="check that each edit applies and its tests exist, run nothing, and exit")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        print(f"unknown mutants: {sorted(unknown)}; see --list", file=sys.stderr)
        return 2
    if args.check:
        problems = [f"{m.name}: {p}" for m in chosen for p in _check(m)]
        print("\n".join(problems) if problems else f"{len(chosen)} mutants: every edit applies once and every guarding test exists")
        return 1 if problems else 0
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.guarantee} ({m.path}) -> {', '.join(t.split('::')[-1] for t in m.tests)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="ctd-mutants-") as scratch:
        base = Path(scratch) / "tree"
        _copy_tree(base)
        if args.clean:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            code, last = _run_tests(base, tests, _UNTIL_PATCH)
            print(f"{'clean':<36} {'pass' if code == 0 else 'FAIL'}  {last}", flush=True)
            if code != 0:
                print("the guarding tests fail on the unmutated tree: fix them first", file=sys.stderr)
                return 1
        survivors = []
        for m in chosen:
            copy = Path(scratch) / m.name
            shutil.copytree(base, copy)
            _apply(copy, m)
            start = time.perf_counter()
            code, last = _run_tests(copy, m.tests, m.env)
            # pytest exit 1 with a failed test: killed; 0: the tests passed (survived); errors in
            # collection or fixtures do not count as a kill.
            # A fixture that errors also exits 1: only a failed assertion counts.
            killed = code == 1 and " failed" in last
            verdict = "killed" if killed else "SURVIVED" if code == 0 else f"ERROR (pytest exit {code})"
            if not killed:
                survivors.append(m.name)
            print(f"{m.name:<36} {verdict:<9} {time.perf_counter() - start:6.1f} s  {last}", flush=True)
            shutil.rmtree(copy, ignore_errors=True)
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutants killed" + (f"; survived or errored: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())

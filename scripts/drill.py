"""Kill drill: SIGKILL ``ctd run`` at random points inside each stage, rerun, compare with an uninterrupted run.

Usage: python scripts/drill.py [--reference DIR] [--work DIR] [--kills 1] [--seed 0]
                               [--stages data traces ...] [--json FILE]

1. A reference run (``ctd run --quick``) is made in WORK/reference unless --reference names one.
2. For each stage S and each kill: the reference is copied with S and every later stage removed
   (their outputs deleted, their manifest records dropped), ``ctd run --quick --until S`` starts
   on the copy, and once the manifest says S is running the process gets SIGKILL after a random
   delay drawn uniformly within 90% of S's reference duration; if S finished before the kill,
   the attempt is repeated with a third of the delay (at most 4 attempts).
3. The drill then checks that S is not marked complete, reruns ``--until S`` to the end, and
   compares every output file of S with the reference: byte-identical, or equal content where a
   file records timings or random ids (report HTML).

Prints one JSON line per drill and a summary; exits 1 if any rerun differs or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analyses.machinery.io import file_sha256, output_files  # noqa: E402
from analyses.stages import stage_names  # noqa: E402

STAGES = stage_names()  # the stages of `ctd run`, in order


def ctd(run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "analyses.interface.cli", "run", "--quick", "--out", str(run_dir), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def manifest_of(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def stage_status(run_dir: Path, stage: str) -> str | None:
    return manifest_of(run_dir).get("stages", {}).get(stage, {}).get("status")


def prepare(reference: Path, target: Path, stage: str) -> None:
    """``target`` = the reference with ``stage`` and every later stage undone."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(reference, target)
    manifest = manifest_of(target)
    later = STAGES[STAGES.index(stage):]
    for name in later:
        record = manifest.get("stages", {}).pop(name, None) or {}
        for entry in record.get("outputs", []):
            path = target / entry
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    manifest.pop("run_seconds", None)
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2))


_VOLATILE_HTML = [
    re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),  # plotly div ids
    re.compile(r'"seconds": [0-9.]+'),
    re.compile(r'"(run_seconds|created|started|train_seconds)": "?[^,"\n]*"?'),
    re.compile(r"\d+(\.\d+)? s\b"),
]


_RUN_NAME_HTML = [re.compile(r"ctd report: [^<]*</title>"), re.compile(r"characterize-then-distill: [^<]*</h1>")]


def _is_timing(name: str) -> bool:
    return "seconds" in str(name)


def _without_timings(frame):
    """A table with its wall-clock columns and rows (``seconds``, ``train_seconds``, ...) dropped."""
    frame = frame[[c for c in frame.columns if not _is_timing(c)]]
    if "metric" in frame.columns:
        frame = frame[~frame["metric"].astype(str).map(_is_timing)]
        if "condition" in frame.columns and "seed" in frame.columns:  # a seed's equal-compute budget follows wall time
            frame = frame[~((frame["condition"] == "standard_equal_compute") & (frame["metric"] == "steps"))]
    return frame.reset_index(drop=True)


def _mask_timings(obj):
    if isinstance(obj, dict):
        return {k: ("*" if _is_timing(k) else _mask_timings(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_mask_timings(v) for v in obj]
    return obj


def same_content(a: Path, b: Path, run_a: Path, run_b: Path) -> tuple[bool, str]:
    if file_sha256(a) == file_sha256(b):
        return True, "identical bytes"
    if a.suffix == ".html":
        text_a, text_b = a.read_text(), b.read_text()
        # The drill reruns in another directory: the report names its run (title, manifest path).
        text_a, text_b = text_a.replace(str(run_a), "<run>"), text_b.replace(str(run_b), "<run>")
        for pattern in _VOLATILE_HTML + _RUN_NAME_HTML:
            text_a, text_b = pattern.sub("*", text_a), pattern.sub("*", text_b)
        return (text_a == text_b), "equal once ids, timings and the run's path are masked" if text_a == text_b else "HTML differs"
    if a.suffix == ".parquet":
        import pandas as pd

        fa, fb = _without_timings(pd.read_parquet(a)), _without_timings(pd.read_parquet(b))
        try:
            pd.testing.assert_frame_equal(fa, fb, check_exact=True)
        except AssertionError as exc:
            return False, f"table differs: {str(exc).splitlines()[0]}"
        return True, "equal table (parquet metadata differs)"
    if a.suffix == ".json":
        try:
            ja, jb = _mask_timings(json.loads(a.read_text())), _mask_timings(json.loads(b.read_text()))
        except json.JSONDecodeError:
            return False, "bytes differ"
        return (ja == jb), "equal JSON once timings are masked" if ja == jb else "bytes differ"
    if a.suffix == ".png":
        return a.stat().st_size > 0 and b.stat().st_size > 0, "PNG re-rendered (bytes differ)"
    return False, "bytes differ"


def compare(reference: Path, rerun: Path, stage: str) -> tuple[bool, list[str]]:
    record = manifest_of(reference)["stages"][stage]
    ref_files = set(output_files(reference, record.get("outputs", [])))
    new_record = manifest_of(rerun)["stages"][stage]
    new_files = set(output_files(rerun, new_record.get("outputs", [])))
    notes = []
    ok = ref_files == new_files
    if not ok:
        notes.append(f"file sets differ: only reference {sorted(ref_files - new_files)[:3]}, only rerun {sorted(new_files - ref_files)[:3]}")
    kinds = {}
    for rel in sorted(ref_files & new_files):
        same, how = same_content(reference / rel, rerun / rel, reference, rerun)
        ok &= same
        kinds.setdefault(how, 0)
        kinds[how] += 1
        if not same:
            notes.append(f"{rel}: {how}")
    notes.extend(f"{n} file(s) {how}" for how, n in kinds.items() if how not in ("bytes differ", "HTML differs") and not how.startswith("table differs"))
    return ok, notes


def drill(reference: Path, work: Path, stage: str, rng: random.Random, index: int) -> dict:
    target = work / f"{stage}-{index}"
    duration = float(manifest_of(reference)["stages"][stage].get("seconds", 1.0))
    delay = rng.uniform(0.0, 0.9 * duration)
    for attempt in range(1, 5):
        # A kill that lands after the stage finished tests nothing: retry sooner (the reference
        # may have run slower than this machine runs now).
        prepare(reference, target, stage)
        proc = ctd(target, "--until", stage)
        t0 = time.perf_counter()
        while stage_status(target, stage) != "running" and proc.poll() is None and time.perf_counter() - t0 < 600:
            time.sleep(0.01)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status_after_kill = stage_status(target, stage)
        killed_during = status_after_kill == "running"
        if killed_during:
            break
        delay /= 3
    leftovers = sorted(p.name for p in target.rglob(".*.tmp"))
    rerun = ctd(target, "--until", stage)
    _, err = rerun.communicate()
    row = {
        "stage": stage,
        "kill": index,
        "kill_after_s": round(delay, 2),
        "attempts": attempt,
        "stage_seconds": duration,
        "killed_during_stage": killed_during,
        "status_after_kill": status_after_kill,
        "temp_files_left_by_kill": len(leftovers),
        "temp_files_after_rerun": len(list(target.rglob(".*.tmp"))),
        "rerun_exit": rerun.returncode,
    }
    if rerun.returncode != 0:
        row.update(ok=False, notes=[err.strip().splitlines()[-1] if err.strip() else "rerun failed"])
        return row
    same, notes = compare(reference, target, stage)
    row.update(ok=bool(same), notes=notes)
    if same:  # a differing copy is kept for inspection
        shutil.rmtree(target)
    return row


def markdown_table(rows: list[dict]) -> str:
    lines = ["| stage | kill | killed after (s) / stage took (s) | inside the stage | status after kill | temp files left / after rerun | rerun | outputs vs uninterrupted run |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['kill'] + 1} | {r['kill_after_s']} / {r['stage_seconds']:.1f} | {'yes' if r['killed_during_stage'] else 'no (finished first)'} "
            f"| {r['status_after_kill']} | {r['temp_files_left_by_kill']} / {r.get('temp_files_after_rerun', 0)} | exit {r['rerun_exit']} | {'equal' if r['ok'] else 'DIFFERENT'}: {'; '.join(r['notes'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, help="a finished `ctd run --quick` directory (default: make one)")
    parser.add_argument("--work", type=Path, default=ROOT / "results" / "drill")
    parser.add_argument("--kills", type=int, default=1, help="random kill points per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--markdown", type=Path, help="also write a markdown table of the rows here (RELIABILITY.md)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    reference = args.reference
    if reference is None:
        reference = args.work / "reference"
        if stage_status(reference, "report") != "complete":
            print(f"[drill] reference run -> {reference}", file=sys.stderr, flush=True)
            proc = ctd(reference)
            _, err = proc.communicate()
            if proc.returncode != 0:
                print(f"[drill] reference run failed: {err.strip().splitlines()[-1:]}", file=sys.stderr)
                return 1
    rng = random.Random(args.seed)
    rows = []
    for stage in args.stages:
        for index in range(args.kills):
            row = drill(reference, args.work, stage, rng, index)
            rows.append(row)
            print(json.dumps(row), flush=True)
    failed = [r for r in rows if not r["ok"]]
    missed = [r for r in rows if not r["killed_during_stage"]]
    print(f"[drill] {len(rows)} kills, {len(rows) - len(failed)} reruns equal to the reference, {len(failed)} not; {len(missed)} kill(s) landed after the stage had finished", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown_table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

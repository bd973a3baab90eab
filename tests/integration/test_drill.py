"""The kill drill (scripts/drill.py) against the session's `ctd run --quick`: every stage, one random kill."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kill_at_a_random_point_of_each_stage_then_rerun_equals_the_uninterrupted_run(quick_run, tmp_path):
    rows_path = tmp_path / "drill.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "drill.py"), "--reference", str(quick_run), "--work", str(tmp_path / "work"), "--kills", "1", "--seed", "1", "--json", str(rows_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1800,
    )
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    from analyses.stages import stage_names

    assert [r["stage"] for r in rows] == list(stage_names())
    for row in rows:
        assert row["ok"] and row["rerun_exit"] == 0, row
        # A kill inside a stage must leave it unfinished in the manifest.
        if row["killed_during_stage"]:
            assert row["status_after_kill"] == "running", row
    # Most kills must land inside their stage, or the drill tested nothing.
    assert sum(r["killed_during_stage"] for r in rows) >= len(rows) - 1

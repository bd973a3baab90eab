"""scripts/mutants.py's table stays runnable: each mutant's edit still applies to the file it names
(exactly once) and each guarding test exists. Nothing is mutated and no guarded test runs here."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _mutants():
    spec = importlib.util.spec_from_file_location("ctd_mutants", ROOT / "scripts" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_every_mutant_edit_applies_and_every_guarding_test_exists():
    mutants = _mutants()
    problems = [f"{m.name}: {p}" for m in mutants.MUTANTS for p in mutants._check(m)]
    assert not problems, "update scripts/mutants.py to the code:\n" + "\n".join(problems)


def test_the_check_reports_an_edit_that_no_longer_applies():
    mutants = _mutants()
    stale = mutants.Mutant("stale", "a guarantee", "analyses/stages/patch.py", "a snippet the code never had", "", ("tests/unit/test_stages.py::test_no_such_test",))
    assert len(mutants._check(stale)) == 2

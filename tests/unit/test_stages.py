"""The stage protocol: a new stage is one file with a ``compute`` and one ``register_stage`` call."""

import importlib.util
import json
import sys
import textwrap

import pandas as pd
import pytest

from analyses import stages
from analyses.machinery.io import Manifest
from analyses.machinery.settings import RunConfig
from probes.errors import CtdInputError

TOY_STAGE = textwrap.dedent(
    '''
    """A toy stage: counts the documents of a run."""
    import pandas as pd

    from analyses.results import FrameResult
    from analyses.stages import Stage, register_stage


    def compute(ctx):
        docs = pd.read_parquet(ctx.run_dir / "docs.parquet")
        ctx.record["n_docs"] = len(docs)
        return FrameResult(pd.DataFrame({"split": sorted(docs["split"].unique()), "n": docs.groupby("split").size().sort_index().to_numpy()}))


    register_stage(Stage("toy_count", None, ("docs.parquet",), ("toy_count.parquet",), compute, "count documents"), after="isolate")
    '''
)


@pytest.fixture
def toy_stage(tmp_path):
    path = tmp_path / "toy_count_stage.py"
    path.write_text(TOY_STAGE)
    spec = importlib.util.spec_from_file_location("toy_count_stage", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_count_stage"] = module
    spec.loader.exec_module(module)
    yield stages.stage_named("toy_count")
    stages.STAGES[:] = [s for s in stages.STAGES if s.name != "toy_count"]
    sys.modules.pop("toy_count_stage", None)


def test_a_registered_stage_joins_the_run_where_it_was_put(toy_stage):
    names = stages.stage_names()
    assert names.index("toy_count") == names.index("isolate") + 1
    assert names[0] == "data" and names[-1] == "report"


def test_the_runner_records_saves_reuses_and_guards_a_new_stage(toy_stage, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pd.DataFrame({"doc_id": ["a", "b", "c"], "split": ["test", "dev", "test"]}).to_parquet(run_dir / "docs.parquet")
    result = stages.run("toy_count", run_dir, RunConfig(out=str(run_dir)), progress=False)
    assert dict(zip(result.frame["split"], result.frame["n"])) == {"dev": 1, "test": 2}
    record = json.loads((run_dir / "manifest.json").read_text())["stages"]["toy_count"]
    assert record["status"] == "complete" and record["n_docs"] == 3
    assert set(record["sha256"]) == {"toy_count.parquet"}
    assert pd.read_parquet(run_dir / "toy_count.parquet")["n"].sum() == 3
    # finished: reused, not recomputed
    assert stages.run_stage(toy_stage, run_dir, RunConfig(out=str(run_dir))) is None
    # an edited output is refused by name before any stage reads it
    (run_dir / "toy_count.parquet").write_bytes(b"edited")
    with pytest.raises(CtdInputError, match="toy_count.parquet"):
        Manifest(run_dir).verify_complete()


def test_a_missing_input_names_the_command_that_writes_it(toy_stage, tmp_path):
    with pytest.raises(CtdInputError, match="docs.parquet"):
        stages.run("toy_count", tmp_path / "empty", RunConfig(), progress=False)


def test_each_built_in_stage_is_one_module_of_the_stages_folder_in_the_order_of_ctd_run():
    from analyses.machinery.protocol import EXTRA_STAGES

    assert stages.stage_names() == ("data", "traces", "capture", "characterize", "patch", "ablate", "isolate", "distill", "report")
    for stage in stages.STAGES + EXTRA_STAGES:
        module = f"analyses.stages.{stage.name.removesuffix('_pilot')}"
        assert (stage.compute.__module__, stage.compute.__name__) == (module, "compute"), stage.name
        assert getattr(stages, stage.name.removesuffix("_pilot")).compute is stage.compute

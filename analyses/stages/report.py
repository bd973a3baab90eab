"""The ``report`` stage (``ctd report --run DIR``, the last of ``ctd run``): every figure the run's
results support (HTML and PNG, under ``figures/``) and the self-contained ``report.html``.

Drawing needs no model: the figures and the page are assembled by :mod:`analyses.results.report`
from the result tables alone (a notebook draws the same way), so this stage only writes them.
"""

from __future__ import annotations

import sys

from analyses.machinery.protocol import Stage, StageContext, register_stage
from analyses.results.report import write_figures, write_report

__all__ = ["compute"]


def compute(ctx: StageContext) -> None:
    written = write_figures(ctx.run_dir, formats=tuple(ctx.settings.formats))
    path = write_report(ctx.run_dir)
    ctx.record["figures"] = sorted(written)
    print(f"[report] {path} ({len(written)} figures)", file=sys.stderr)
    return None


register_stage(Stage("report", "report", (), ("report.html", "figures/"), compute, "figures and report.html"))

"""Replay requests: a run's traces as the capture instrument reads them (one teacher-forced request
per trace, with the positions whose activations are kept). The capture stage and the
distillation's teacher signals both replay traces through here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analyses.methods.parsing import Region
from probes.capture import CaptureRequest
from probes.errors import input_error

__all__ = ["capture_requests", "POSITION_SETS"]

POSITION_SETS = ("output", "cot", "mentions", "all")
_DOCUMENT_REGIONS = (int(Region.DOCUMENT), int(Region.ANCHOR))


def capture_requests(traces: pd.DataFrame, positions: str = "output", path: Path | None = None) -> list[CaptureRequest]:
    """One request per trace. ``positions``: ``output`` (CoT + answer tokens, the default), ``cot``,
    ``mentions`` (label-mention tokens) or ``all`` (prompt too)."""
    if positions not in POSITION_SETS:
        raise input_error(None, f"unknown position set {positions!r}", f"use one of {POSITION_SETS}")
    requests = []
    for row_number, row in enumerate(traces.itertuples(index=False)):
        ids = list(row.prompt_ids) + list(row.output_ids)
        regions = np.asarray(row.regions, dtype=np.int64)
        if len(regions) != len(ids):
            raise input_error(path, f"trace {row.doc_id!r} has {len(regions)} regions for {len(ids)} tokens", "regenerate traces.parquet with `ctd traces`", row_number + 1)
        cot_start, cot_end = int(row.cot_start), int(row.cot_end)
        if positions == "output":
            pos = np.arange(len(row.prompt_ids), len(ids))
        elif positions == "cot":
            pos = np.arange(cot_start, cot_end)
        elif positions == "mentions":
            pos = np.flatnonzero(np.isin(regions, [int(Region.MENTION_GOLD), int(Region.MENTION_NEAR_MISS), int(Region.MENTION_OTHER)]))
        else:
            pos = np.arange(len(ids))
        requests.append(
            CaptureRequest(
                doc_id=str(row.doc_id),
                token_ids=ids,
                positions=pos,
                regions=regions,
                document_mask=np.isin(regions, _DOCUMENT_REGIONS),
                norm_origin=cot_start,
                norm_length=max(cot_end - cot_start, 1),
            )
        )
    return requests

"""Instruments that read a reasoning model's internals. Never imports ``analyses``.

``load_model`` (any supported HF folder into a TransformerBridge), ``capture`` / ``open_store``
(teacher-forced replay into a checksummed activation store), the activation points, the probe
bank, and head patching (sweep and attribution).
"""

from probes.capture import CaptureConfig, CaptureRequest, capture
from probes.errors import CtdError, CtdInputError, CtdNumericalError
from probes.linear import ProbeProblem, fit_probe_bank
from probes.models import load_model
from probes.patching import PatchInputs, TokenReadout, attribution_patching, head_sweep
from probes.points import POINTS, REDUCTIONS, hook_name, reduction_name
from probes.store import open_store

__all__ = [
    "load_model",
    "capture",
    "CaptureConfig",
    "CaptureRequest",
    "open_store",
    "POINTS",
    "REDUCTIONS",
    "hook_name",
    "reduction_name",
    "ProbeProblem",
    "fit_probe_bank",
    "PatchInputs",
    "TokenReadout",
    "head_sweep",
    "attribution_patching",
    "CtdError",
    "CtdInputError",
    "CtdNumericalError",
]

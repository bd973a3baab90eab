"""Instruments that read a reasoning model's internals. Never imports ``analyses``.

``load_model`` (any supported HF folder into a TransformerBridge), ``capture`` / ``open_store``
(teacher-forced replay into a checksummed activation store), the activation points, the probe
bank, head patching (sweep and attribution), and ``fused_attention`` (attention statistics and
patching without a T x T pattern, for long traces). Names load on first use: importing ``probes``
(or its errors) does not import torch.
"""

from probes.errors import CtdError, CtdInputError, CtdNumericalError

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
    "fused_attention",
    "CtdError",
    "CtdInputError",
    "CtdNumericalError",
]

_HOMES = {
    "load_model": "probes.models",
    "capture": "probes.capture",
    "CaptureConfig": "probes.capture",
    "CaptureRequest": "probes.capture",
    "open_store": "probes.store",
    "POINTS": "probes.points",
    "REDUCTIONS": "probes.points",
    "hook_name": "probes.points",
    "reduction_name": "probes.points",
    "ProbeProblem": "probes.linear",
    "fit_probe_bank": "probes.linear",
    "PatchInputs": "probes.patching",
    "TokenReadout": "probes.patching",
    "head_sweep": "probes.patching",
    "attribution_patching": "probes.patching",
    "fused_attention": "probes.fused",
}


def __getattr__(name):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'probes' has no attribute {name!r}")

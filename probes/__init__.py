"""Instruments that read a reasoning model's internals. Never imports ``analyses``."""

from probes.errors import CtdError, CtdInputError, CtdNumericalError

__all__ = ["CtdError", "CtdInputError", "CtdNumericalError"]

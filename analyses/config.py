"""The run configuration (kept for imports): the settings tree lives in :mod:`analyses.settings`."""

from analyses.settings import DEFAULT_LABEL_CHAPTERS, DEFAULT_N_NOTES, DEFAULT_N_TRACES, RunConfig, apply_override, load_config

__all__ = ["RunConfig", "load_config", "apply_override", "DEFAULT_LABEL_CHAPTERS", "DEFAULT_N_NOTES", "DEFAULT_N_TRACES"]

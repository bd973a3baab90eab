"""``ctd run``: every stage of :mod:`analyses.stages` in order (kept for imports)."""

from __future__ import annotations

from analyses.stages import run_study

__all__ = ["run_study", "stage_names", "STAGES"]


def stage_names() -> tuple[str, ...]:
    """The stages ``ctd run`` runs, in order."""
    from analyses.stages import STAGES as registered, _ensure_registered

    _ensure_registered()
    return tuple(s.name for s in registered)


def __getattr__(name):
    if name == "STAGES":
        return stage_names()
    raise AttributeError(name)

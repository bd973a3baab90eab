"""The stages of the study, one module each, in the order ``ctd run`` runs them:

- :mod:`.data`: the label space and the documents;
- :mod:`.traces`: generate (or import) and parse the model's traces;
- :mod:`.capture`: replay the traces into the activation store;
- :mod:`.characterize`: dynamics, boundary, head scores, attribution, probes, logit lens;
- :mod:`.patch`: every head's causal effect and the scores' agreement with it;
- :mod:`.ablate`: heads mean-ablated while the model regenerates its CoT and answer;
- :mod:`.isolate`: truncation, injection, retriever baselines, complementarity;
- :mod:`.distill`: standard vs mechanistic students (and ``distill_pilot``, its own command only);
- :mod:`.report`: figures and ``report.html``.

Each module holds its stage's ``compute(ctx)`` and registers it with one :func:`register_stage`
call, exactly as a user's stage does; importing this package registers them all, in this order.
A new stage is one module that imports :class:`Stage` and :func:`register_stage` from here and
calls ``register_stage(Stage("name", settings, inputs, outputs, compute), after="isolate")``.

The protocol itself (:mod:`analyses.machinery.protocol`) sits below the stages: every name here
but the stage modules comes from it.
"""

from analyses.machinery.protocol import STAGES, Stage, StageContext, register_stage, run, run_stage, run_study, stage_named, stage_names

# each registers itself on import, in this order (the order of `ctd run`)
from analyses.stages import data, traces, capture, characterize, patch, ablate, isolate, distill, report  # noqa: E402,F401  isort: skip

__all__ = ["Stage", "StageContext", "STAGES", "register_stage", "stage_named", "stage_names", "run", "run_stage", "run_study"]

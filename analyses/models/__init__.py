"""Models: how any model writes a trace (:mod:`.generation`: batched generate, or a serving
engine's completions read back, parsed into rows), and the models the suite ships and trains:
the embedded reasoning model (:mod:`.organism`: trace format, tokenizer, training) and the student
base distillation starts from (:mod:`.student`); their checkpoints are in ``analyses/assets/``."""

"""The methods the stages use, one module each: prompt templates and reasoning markers
(:mod:`.prompts`), the trace parser (:mod:`.parsing`), boundary estimators (:mod:`.boundary`),
Focus/Confusion dynamics (:mod:`.dynamics`), text embeddings (:mod:`.embed`), label retrieval
(:mod:`.retrieval`), replay requests for capture (:mod:`.replay`), the answer read-outs
(:mod:`.readouts`), the training loop every trained model shares (:mod:`.lm_training`), and what
distillation is made of (:mod:`.distillation`: losses, head map, data, training, evaluation).

They import probes/, machinery/, tasks/ and results/, and each other downward; never a model or a
stage.
"""

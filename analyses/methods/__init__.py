"""The methods the stages use, one module each: prompt templates and reasoning markers
(:mod:`.prompts`), the trace parser (:mod:`.parsing`), boundary estimators (:mod:`.boundary`),
Focus/Confusion dynamics (:mod:`.dynamics`), text embeddings (:mod:`.embed`), label retrieval
(:mod:`.retrieval`), and the training loop every trained model shares (:mod:`.lm_training`).

They import probes/, tasks/, results/ and machinery/, and each other downward; never a stage."""

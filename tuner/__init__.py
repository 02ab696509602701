"""roma-tune: post-train the routers of a Mixture-of-Experts LLM with RoMA.

The packages follow the data flow, and imports run one way (left may import right)::

    cli -> run -> train / roma / evaluate / diagnose -> export -> model -> data

* ``data``      rows from files, Hugging Face datasets and lm-eval tasks; prompts; token ids
* ``model``     loading, the batched forward, routing capture, the frozen-layer cache
* ``roma``      task embeddings, the routing snapshot, neighbours, the RoMA objective
* ``train``     the training loop, checkpoints, data parallelism
* ``export``    the delta file and run records; merging deltas into a checkpoint
* ``evaluate``  accuracy base vs tuned through vLLM or transformers
* ``diagnose``  does RoMA's premise hold? neighbour agreement, purity, transplant test
* ``run``       the stages of ``roma-tune run``, their cache, the run directory
* ``cli``       the typer app: one module per command, one error handler

``config`` (the run configuration) and ``progress`` (rich bars) are used across layers.
"""

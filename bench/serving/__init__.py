"""Serving benchmark: ``--load-format roma`` against the base model, side by side.

``python -m bench.serving`` (``make bench-serve``) measures, on a random MoE model large
enough that compute dominates (OLMoE layout, hidden 512, 8 layers, 16 experts top-2, bf16):

1. throughput: two engines stay up (base and roma, one process each); the same greedy
   batch runs on each in turn, alternating which goes first (two sessions of fresh
   processes, started in opposite orders); best of N rounds and the median of per-round
   ratios (neighbours in time share the machine's load; this CPU is shared);
2. load time: engines are started and stopped in one process, alternating base and roma:
   engine start-up and model load (``get_model``: build the model, stream and merge the
   weights, post-process them), and the loader's own work as it times it;
3. load test: ``vllm serve`` base and ``vllm serve --load-format roma`` on loopback, both up;
   rounds of many concurrent completions through the ``openai`` client, alternating;
   requests completed, failed and throughput for each.

The deltas roll every router by one expert: routing changes for nearly every token, but
the experts' load is only relabelled, so the MoE compute is the same as the base model's
and any difference is the plugin's. Results go to ``bench/results/serving.json`` and to the
"## Serving" section of ``bench/README.md``.
"""

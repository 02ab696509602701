"""Real-size benchmark: a 7B-shaped MoE (OLMoE-1B-7B layout, random weights, bf16) served by
vLLM with and without router deltas, and tuned by `roma-tune run`, on this machine.

``python -m bench.realsize`` (``make bench-realsize``), side by side in one run:

* the checkpoint (16 layers, hidden 2048, 64 experts top-8, vocabulary 50304; 13.8 GB in
  three safetensors shards) is built once, tensor by tensor, in ``bench/.cache/`` and reused
  (:mod:`bench.realsize.build`);
* ``roma-tune run --dtype float32`` is refused with one line before loading;
* vLLM engines, each in a fresh process, alternate base / roma (deltas on the last 5
  routers): model-load time (paired ratio) and the process's peak resident memory
  (:mod:`bench.realsize.engine`, :mod:`bench.realsize.measure`);
* ``roma-tune run`` in bf16 on 32 short four-choice prompts, last 5 routers, three epochs,
  without and with ``--cache-frozen-layers``: peak resident memory against the checkpoint's
  size, samples/s, and an epoch's time against one no-grad forward over the same rows
  (the fastest of each, from the run's own log: other work on a shared machine only ever
  slows a run down);

then writes ``bench/results/realsize.json`` and the "## Real size" section of
``bench/README.md`` (:mod:`bench.realsize.report`). It needs ~14 GB of disk once and
~18 GiB of available memory for each heavy step (it waits up to 10 minutes for it).
"""

"""Tuner speed: samples/s and peak memory of `roma-tune run`'s training step against a
naive implementation of the same RoMA objective, on the same model, data and config.

    python -m bench.tuner_speed          # or: make bench-tuner

Variants, each trained for ``--epochs`` epochs from the same routers, with the same
neighbour targets, AdamW, warm-up, clipping and global batch size:

* ``naive``: the textbook implementation, in ``naive.py``: a random permutation cut into
  batches padded to the longest prompt of the dataset, ``model(inputs_embeds=...)`` with
  the embeddings requiring grad (autograd records every layer), the full
  ``[batch, seq, vocab]`` logits, the letter scores read from them at the last prompt token.
* ``ours``: the real training loop (:func:`tuner.train.loop.train`, the code `roma-tune run`
  runs): length-bucketed batches, autograd only above the lowest tuned router, head rows
  only at the scored positions.
* ``ours_cached``: the same with ``--cache-frozen-layers`` (hidden states entering the lowest tuned
  layer computed once and read from disk every epoch); the one-time build is timed apart.
* ``ours_dense``: ``ours`` with ``--router-grad dense`` (the straight-through gradient of the
  mixture of all experts, :mod:`tuner.model.dense_grad`): its cost against ``ours``.

Before timing, one batch is scored both ways and the losses and router gradients must
agree: the naive loop optimises the same objective.

Method: every (variant, repetition) runs in a fresh Python subprocess, the variants
alternating in a rotating order (A B C D, B C D A, ...). Each process first runs one untimed
step (first-call costs), then times every epoch the same way for every variant (collation
and optimiser step included, snapshot passes excluded), in wall-clock and in CPU time; the
medians over all timed epochs of all repetitions are reported. CPU time is the steadier
figure on a shared machine: a process that waits for a core loses wall-clock time but no
CPU time. Torch runs one thread per process (``--threads``): on the shared 2-core machine
the default two threads ran several times slower, from contention.

Peak memory is the kernel's peak resident set size of the variant's process (``VmHWM``),
reset through ``/proc/self/clear_refs`` right before training starts, so model loading is
not counted: "peak RSS" is everything resident at the peak (Python, torch, weights,
activations); "working memory" is the peak minus the resident size when training starts
(activations, gradients, logits, optimiser state, the prefix cache). On CUDA,
``torch.cuda.max_memory_allocated`` is used instead.

``--render`` rewrites the README section from the saved JSON without running anything.

Writes ``bench/results/tuner_speed.json`` and the "## Tuner speed" section of
``bench/README.md``.
"""

"""Task loss, predictions and correctness per sample, from :class:`tuner.model.forward.Outputs`.

* Multiple choice (letter or loglik): cross-entropy over the choice scores (letter/option
  logits, or summed continuation log-likelihoods); the prediction is the best-scoring
  choice.
* Free-form: mean negative log-likelihood of the completion tokens; correct when every
  completion token is the greedy (argmax) choice, i.e. greedy decoding reproduces it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuner.model.forward import Batch, Outputs


@dataclass
class Scored:
    loss: torch.Tensor  # [S] per-sample task loss (with grad when the forward had it)
    correct: torch.Tensor  # [S] bool
    prediction: torch.Tensor  # [S] chosen index (-1 for free-form)


def score(outputs: Outputs, batch: Batch) -> Scored:
    """Per-sample task loss, correctness and prediction."""
    scores = outputs.choice_scores
    device = scores.device
    s = batch.size
    loss = torch.zeros(s, device=device)
    correct = torch.zeros(s, dtype=torch.bool, device=device)
    prediction = torch.full((s,), -1, dtype=torch.long, device=device)
    mc = ~batch.is_free
    if mc.any():
        ce = torch.nn.functional.cross_entropy(scores[mc], batch.labels[mc], reduction="none")
        loss = loss.index_put((mc.nonzero()[:, 0],), ce)
        pred = scores[mc].argmax(-1)
        prediction[mc] = pred
        correct[mc] = pred == batch.labels[mc]
    if batch.is_free.any():
        free_pos = batch.tok_slot < 0
        samples = batch.tok_sample[free_pos]
        counts = torch.zeros(s, device=device).index_add(
            0, samples, torch.ones_like(samples, dtype=torch.float32)
        )
        nll = torch.zeros(s, device=device).index_add(0, samples, -outputs.token_logprobs[free_pos])
        misses = torch.zeros(s, device=device).index_add(
            0, samples, (~outputs.token_hit[free_pos]).float()
        )
        free = batch.is_free
        loss = torch.where(free, nll / counts.clamp(min=1), loss)
        correct = torch.where(free, misses == 0, correct)
    return Scored(loss, correct, prediction)

"""C3PO as a baseline (bench only): per test sample, routing re-mixed from successful neighbours.

C3PO (Li et al., 2025) is the test-time method RoMA distils into the routers. For every test
sample it finds ``k`` neighbours among the *successful* samples of a reference set (here:
the tuning rows the base model answers correctly) in a sentence-embedding space (the tuner's
embedder, usearch index and Gaussian kernel weights: RoMA's own N and W), then

1. **kernel regression**: sets the sample's routing in the tuned layers to the
   kernel-weighted mix of the neighbours' routing, and
2. **neighbourhood gradient descent**: optimises that routing for ``steps`` Adam steps on the
   neighbours' kernel-weighted task loss, with the routing applied to the neighbours, and
   scores the test sample with the result.

The routing is one distribution over experts per tuned layer, parametrised by its log
(``softmax(theta)``), applied through :class:`tuner.diagnose.transplant.RoutingOverride` (the
top-k experts and weights recomputed as the router would). Two scopes:

* ``last``: at the last prompt token (of every row of a loglik sample); the neighbours'
  routing is their last-prompt-token routing (RoMA's routing vector).
* ``all``: at every prompt token; the neighbours' routing is their mean over prompt tokens.

Continuation tokens route as the model does. The cost is measured side by side with a plain
scoring pass over the same samples (wall ratio) and estimated from token counts (forward +
backward counted as three forwards).

    python -m bench.c3po --reference bench/data/demo/train.jsonl --data bench/data/demo/test.jsonl
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import typer
from rich.progress import track

from bench.common import DEMO_DATA, DEMO_MODEL, write_json
from tuner.diagnose.transplant import prompt_positions

SCOPES = ("last", "all")
app = typer.Typer(add_completion=False)


@torch.no_grad()
def reference_routing(tm: Any, encoded: Sequence[Any], scope: str, batch_size: int) -> torch.Tensor:
    """``[N, layers * experts]``: each sample's routing distribution at its last prompt token,
    or averaged over its prompt tokens."""
    from tuner.model.forward import collate, decoder_hidden, sorted_batches
    from tuner.model.routing import RoutingCapture

    out = torch.zeros(len(encoded), len(tm.layers) * tm.num_experts)
    with RoutingCapture(tm) as cap:
        for idx in sorted_batches(encoded, batch_size):
            batch = collate(encoded, idx, tm.tokenizer.pad_token_id)
            flat, owner = prompt_positions(batch, encoded, scope)
            cap.positions = flat
            decoder_hidden(tm, batch.to(tm.device))
            probs = cap.vectors(torch.device("cpu"))
            total = torch.zeros(len(idx), probs.shape[1]).index_add(0, owner, probs)
            count = torch.bincount(owner, minlength=len(idx)).clamp(min=1)
            out[torch.tensor(idx)] = total / count[:, None]
    return out


def _layer_softmax(theta: torch.Tensor, experts: int) -> torch.Tensor:
    """Softmax over experts within each layer's block of ``theta [B, layers * experts]``."""
    b = theta.shape[0]
    return theta.view(b, -1, experts).softmax(-1).view(b, -1)


def _scored(tm: Any, encoded: Sequence[Any], idx: list[int], over: Any, cap: Any,
            targets: torch.Tensor, owner_of: list[int], scope: str) -> Any:  # fmt: skip
    """Forward pass of samples ``idx`` with ``targets[owner_of[s]]`` applied to sample ``s``."""
    from tuner.model.choice_loss import score
    from tuner.model.forward import collate, forward

    batch = collate(encoded, idx, tm.tokenizer.pad_token_id)
    flat, owner = prompt_positions(batch, encoded, scope)
    over.positions = flat
    over.targets = targets[torch.tensor(owner_of)[owner]]
    out = forward(tm, batch.to(tm.device), cap)
    return score(out, batch)


def c3po_correct(
    tm: Any,
    ref_encoded: Sequence[Any],
    ref_routing: torch.Tensor,
    test_encoded: Sequence[Any],
    nb_index: np.ndarray,
    nb_weight: np.ndarray,
    scope: str,
    steps: int,
    lr: float,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, Any]:
    """Per test sample: correct with the kernel mix alone (``mix``) and after ``steps``
    neighbourhood-gradient steps (``c3po``), and the routing applied for ``c3po``
    (``routing``, ``[n, layers * experts]``); a sample without neighbours keeps its own
    routing (scored by the plain model)."""
    from tuner.diagnose.transplant import RoutingOverride
    from tuner.model.routing import RoutingCapture

    n = len(test_encoded)
    mix_ok = torch.zeros(n, dtype=torch.bool)
    c3po_ok = torch.zeros(n, dtype=torch.bool)
    e = tm.num_experts
    final = torch.zeros(n, len(tm.layers) * e)
    order = list(range(n))
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    with RoutingCapture(tm) as cap, RoutingOverride(tm) as over:
        for tb in track(batches, description=f"C3PO ({scope})", disable=not progress):
            idx = np.asarray(tb)
            valid = nb_index[idx] >= 0  # [B, k]
            w = torch.as_tensor(nb_weight[idx], dtype=torch.float32)
            nbr = torch.as_tensor(nb_index[idx].clip(min=0), dtype=torch.long)
            mix = torch.einsum("bk,bkd->bd", w, ref_routing[nbr])
            plain = ~torch.as_tensor(valid.any(axis=1))
            if plain.any():  # samples without neighbours: their own routing
                over.positions = None
                mix[plain] = reference_routing(tm, [test_encoded[i] for i in tb], scope, len(tb))[
                    plain
                ]
            theta = mix.clamp_min(1e-12).log().requires_grad_(True)
            with torch.no_grad():
                s = _scored(tm, test_encoded, tb, over, cap, _layer_softmax(theta, e),
                            list(range(len(tb))), scope)  # fmt: skip
            mix_ok[idx] = s.correct.cpu()
            pairs = [(b, j) for b in range(len(tb)) for j in range(valid.shape[1]) if valid[b, j]]
            if pairs and steps:
                opt = torch.optim.Adam([theta], lr=lr)
                ref_idx = [int(nbr[b, j]) for b, j in pairs]
                owners = [b for b, _ in pairs]
                pw = torch.tensor([float(w[b, j]) for b, j in pairs])
                for _ in range(steps):
                    opt.zero_grad()
                    s = _scored(tm, ref_encoded, ref_idx, over, cap,
                                _layer_softmax(theta, e), owners, scope)  # fmt: skip
                    (s.loss.cpu() * pw).sum().backward()
                    with torch.no_grad():
                        theta.grad[plain] = 0.0
                    opt.step()
            with torch.no_grad():
                final[idx] = _layer_softmax(theta, e).cpu()
                s = _scored(tm, test_encoded, tb, over, cap, final[idx],
                            list(range(len(tb))), scope)  # fmt: skip
            c3po_ok[idx] = s.correct.cpu()
    return {"mix": mix_ok, "c3po": c3po_ok, "routing": final}


def _tokens(encoded: Sequence[Any]) -> int:
    from tuner.model.forward import _rows_of

    return sum(len(r) for e in encoded for r in _rows_of(e))


def run_c3po(
    model: str,
    reference: str,
    data: str,
    scopes: Sequence[str] = SCOPES,
    lrs: Sequence[float] = (0.1,),
    val: str | None = None,
    val_limit: int | None = None,
    k: int = 3,
    sigma: float = 0.4,
    steps: int = 10,
    scoring: str = "loglik",
    layers: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, Any]:
    """C3PO's accuracy on ``data`` per scope, with references from ``reference``.

    With several ``lrs``, each scope's learning rate is chosen on ``val`` (required then:
    the best accuracy on its first ``val_limit`` rows, the smaller rate on ties) and ``data``
    is scored once with it.
    """
    from tuner.config import DEFAULT_EMBEDDER
    from tuner.data.prompts import encode
    from tuner.data.sources import load_examples
    from tuner.model.load import load_model
    from tuner.roma.embed import embed_texts
    from tuner.roma.neighbours import find_neighbours
    from tuner.roma.snapshot import take_snapshot

    if len(lrs) > 1 and val is None:
        raise ValueError("several learning rates need a validation set to choose from")
    torch.manual_seed(0)
    tm = load_model(model, layers, "float32", "cpu", train_routers=False)
    ref_ex = load_examples(reference).examples
    ref_enc = encode(ref_ex, tm.tokenizer, scoring)
    snap = take_snapshot(tm, ref_enc, 32)
    ref_emb = embed_texts([x.prompt for x in ref_ex], DEFAULT_EMBEDDER)
    # the snapshot's routing vectors are the last-prompt-token routing already
    ref_routing = {
        sc: snap.routing if sc == "last" else reference_routing(tm, ref_enc, sc, 32)
        for sc in scopes
    }

    def prepare(path: str, limit: int | None = None) -> tuple[list[Any], list[Any], Any]:
        ex = load_examples(path, limit=limit).examples
        enc = encode(ex, tm.tokenizer, scoring)
        emb = embed_texts([x.prompt for x in ex], DEFAULT_EMBEDDER)
        # references first: the query rows are never successful, so never each other's
        successful = np.concatenate([snap.correct.numpy(), np.zeros(len(ex), dtype=bool)])
        nb = find_neighbours(np.concatenate([ref_emb, emb]), successful, k=k, sigma=sigma)
        return ex, enc, nb

    def accuracy(enc: list[Any], nb: Any, scope: str, lr: float) -> tuple[dict, float]:
        start = time.perf_counter()
        ok = c3po_correct(tm, ref_enc, ref_routing[scope], enc, nb.index[len(ref_enc) :],
                          nb.weight[len(ref_enc) :], scope, steps, lr, batch_size, progress)  # fmt: skip
        return ok, time.perf_counter() - start

    chosen: dict[str, float] = {}
    search: list[dict[str, Any]] = []
    if len(lrs) > 1:
        _, val_enc, val_nb = prepare(val, val_limit)  # type: ignore[arg-type]
        for sc in scopes:
            accs = {}
            for lr in lrs:
                ok, _ = accuracy(val_enc, val_nb, sc, lr)
                accs[lr] = float(ok["c3po"].float().mean())
                search.append({"scope": sc, "lr": lr, "val_accuracy": accs[lr]})
            chosen[sc] = max(sorted(accs), key=lambda x: accs[x])
    else:
        chosen = {sc: lrs[0] for sc in scopes}

    ex, enc, nb = prepare(data)
    start = time.perf_counter()
    base = take_snapshot(tm, enc, batch_size)
    base_seconds = time.perf_counter() - start
    test_nb = nb.index[len(ref_enc) :]
    neighbour_tokens = sum(_tokens([ref_enc[j] for j in row if j >= 0]) for row in test_nb)
    test_tokens = _tokens(enc)
    tasks = [x.task for x in ex]
    out: dict[str, Any] = {
        "n": len(ex),
        "k": k,
        "sigma": sigma,
        "steps": steps,
        "layers": tm.layers,
        "reference": {
            "path": str(reference),
            "n": len(ref_ex),
            "successful": int(snap.correct.sum()),
        },
        "no_neighbour": int((test_nb < 0).all(axis=1).sum()),
        "base": _acc(base.correct, tasks),
        "base_seconds": base_seconds,
        "search": search,
        "chosen_lr": chosen,
        "scopes": {},
    }
    for sc in scopes:
        ok, seconds = accuracy(enc, nb, sc, chosen[sc])
        out["scopes"][sc] = {
            "lr": chosen[sc],
            "mix": _acc(ok["mix"], tasks),
            "c3po": _acc(ok["c3po"], tasks),
            "correct": ok["c3po"].int().tolist(),
            "seconds": seconds,
            "wall_ratio": seconds / base_seconds,
            # per test sample: 2 forwards (mix, final) + steps x (forward + backward) over
            # its neighbours' tokens, against one forward over its own
            "flop_ratio": (2 * test_tokens + 3 * steps * neighbour_tokens) / test_tokens,
        }
    return out


def _acc(correct: torch.Tensor, tasks: list[str]) -> dict[str, Any]:
    c = correct.bool().tolist()
    per_task = {
        t: sum(x for x, tt in zip(c, tasks, strict=True) if tt == t) / tasks.count(t)
        for t in sorted(set(tasks))
    }
    return {"accuracy": sum(c) / max(len(c), 1), "per_task": per_task}


@app.command()
def main(
    model: str = typer.Option(str(DEMO_MODEL), help="Checkpoint."),
    reference: str = typer.Option(str(DEMO_DATA / "train.jsonl"), help="Reference rows."),
    data: str = typer.Option(str(DEMO_DATA / "test.jsonl"), help="Rows to score."),
    val: str = typer.Option(None, help="Validation rows (to choose among several --lrs)."),
    val_limit: int = typer.Option(None, help="Only the first N validation rows."),
    lrs: str = typer.Option("0.1", help="Adam learning rates (comma-separated)."),
    k: int = typer.Option(3, help="Neighbours."),
    steps: int = typer.Option(10, help="Neighbourhood-gradient steps."),
    json_out: Path = typer.Option(None, "--json", help="Write the result here."),
) -> None:
    """Print base, kernel-mix and C3PO accuracy per scope, with the cost ratios."""
    rates = [float(x) for x in lrs.split(",")]
    r = run_c3po(model, reference, data, lrs=rates, val=val, val_limit=val_limit, k=k,
                 steps=steps, progress=True)  # fmt: skip
    print(f"base {100 * r['base']['accuracy']:.1f}%  (n={r['n']})")
    for sc, x in r["scopes"].items():
        print(f"{sc}: mix {100 * x['mix']['accuracy']:.1f}%  C3PO {100 * x['c3po']['accuracy']:.1f}% "
              f"(lr {x['lr']}; cost x{x['wall_ratio']:.1f} wall, x{x['flop_ratio']:.1f} FLOPs)")  # fmt: skip
    if json_out:
        write_json(json_out, r)


if __name__ == "__main__":
    app()

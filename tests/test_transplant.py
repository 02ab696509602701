"""roma-tune diagnose transplant: the routing override hook, the identity transplant, and the counts."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
import torch
from tuner_fixtures import mc_rows, tiny_dir, write_jsonl  # noqa: F401

from tuner.data.prompts import encode
from tuner.data.sources import load_examples
from tuner.diagnose.transplant import (
    RoutingOverride,
    prompt_positions,
    rescore,
    transplant_accuracy,
    transplant_targets,
)
from tuner.model.choice_loss import score
from tuner.model.forward import collate, forward
from tuner.model.load import load_model
from tuner.model.routing import RoutingCapture
from tuner.roma.embed import embed_texts
from tuner.roma.neighbours import brute_force, find_neighbours
from tuner.roma.snapshot import take_snapshot


def multi_token_rows(n: int) -> list[dict]:
    """Rows whose choices are phrases, so loglik scoring gives one row per choice."""
    rows = mc_rows(n, seed=3)
    for r in rows:
        r["choices"] = [f"{c} is a very {c} thing" for c in r["choices"]]
    return rows


def unique_rows(n: int) -> list[dict]:
    seen: dict[str, dict] = {}
    for r in mc_rows(2 * n, seed=1):
        seen.setdefault(r["question"], r)
    return list(seen.values())[:n]


def load(tmp_path, model_dir, rows, scoring, layers=None):
    tm = load_model(str(model_dir), layers, "float32", "cpu")
    examples = load_examples(str(write_jsonl(tmp_path / "d.jsonl", rows))).examples
    return tm, examples, encode(examples, tm.tokenizer, scoring)


def gates(tm) -> dict[int, torch.nn.Module]:
    """Every MoE router of the model by layer, found by name (not via tm.router_modules)."""
    out = {}
    for name, module in tm.model.named_modules():
        parts = name.split(".")
        if parts[-2:] == ["mlp", "gate"]:
            out[int(parts[-3])] = module
    return out


def dirichlet(s: int, layers: int, experts: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(s, layers, experts, generator=g) ** 4 + 1e-3
    return (raw / raw.sum(-1, keepdim=True)).reshape(s, layers * experts)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_prompt_positions_point_at_every_rows_last_prompt_token(
    tmp_path,
    tiny_dir,  # noqa: F811
    padding,
):
    tm, _, enc = load(tmp_path, tiny_dir, multi_token_rows(6), "loglik")
    assert all(e.num_rows > 1 for e in enc)
    batch = collate(enc, [0, 3, 5], tm.tokenizer.pad_token_id, padding)
    flat, owner = prompt_positions(batch, enc)
    ids, mask = batch.input_ids.reshape(-1), batch.attention_mask
    width = batch.input_ids.shape[1]
    assert len(flat) == sum(enc[i].num_rows for i in [0, 3, 5])
    for r, (s, j) in enumerate(batch.rows):
        e = enc[batch.indices[s]]
        assert owner[r] == s
        start = int(mask[r].argmax())  # first real token of the row
        row = batch.input_ids[r, start : start + batch.row_lengths[r]].tolist()
        assert row == e.prompt_ids + e.continuations[j]
        assert flat[r] == r * width + start + len(e.prompt_ids) - 1
        assert ids[flat[r] + 1] == e.continuations[j][0]


# does the architecture's router renormalise its top-k weights? (Mixtral has no attribute)
RENORM = {"OlmoeForCausalLM": False, "Qwen3MoeForCausalLM": True, "MixtralForCausalLM": True}


@pytest.mark.parametrize("arch", sorted(RENORM))
def test_override_replaces_router_output_exactly_at_the_last_prompt_tokens(
    tmp_path,
    tiny_dir,  # noqa: F811
    tiny_model,
    arch,
):
    model_dir = tiny_dir if arch == "OlmoeForCausalLM" else tiny_model(arch)
    tm, _, enc = load(tmp_path, model_dir, multi_token_rows(6), "loglik", layers="1-2")
    all_gates = gates(tm)
    assert sorted(all_gates) == [0, 1, 2, 3] and tm.layers == [1, 2]
    renorm = RENORM[arch]
    assert getattr(all_gates[1], "norm_topk_prob", renorm) == renorm
    samples = [0, 2, 4, 5]
    batch = collate(enc, samples, tm.tokenizer.pad_token_id)
    flat, owner = prompt_positions(batch, enc)
    targets = dirichlet(len(samples), 2, tm.num_experts, seed=0)
    seen: dict[int, tuple] = {}

    def recorder(layer):
        def hook(module, args, output):
            seen[layer] = (module.forward(*args), output)  # the router's own answer, unhooked

        return hook

    with torch.no_grad(), RoutingCapture(tm) as cap:
        plain = forward(tm, batch, cap).choice_scores
        with RoutingOverride(tm) as over:
            handles = [g.register_forward_hook(recorder(i)) for i, g in all_gates.items()]
            over.positions, over.targets = flat, targets[owner]
            out = forward(tm, batch, cap)
            for h in handles:
                h.remove()
    other = torch.ones(batch.input_ids.numel(), dtype=torch.bool)
    other[flat] = False
    for layer, ((logits0, w0, i0), (logits, w, i)) in seen.items():
        # untuned layers and every other token: exactly what the router computes itself
        keep = other if layer in tm.layers else torch.ones_like(other)
        assert torch.equal(logits[keep], logits0[keep])
        assert torch.equal(w[keep], w0[keep]) and torch.equal(i[keep], i0[keep])
        if layer not in tm.layers:
            continue
        n = tm.layers.index(layer)
        t = targets[owner][:, n * tm.num_experts : (n + 1) * tm.num_experts]
        assert torch.allclose(torch.softmax(logits[flat], -1), t, atol=1e-6)
        assert torch.equal(i[flat].sort(-1).values, t.topk(2).indices.sort(-1).values)
        expect = t.gather(1, i[flat])
        if renorm:
            expect = expect / expect.sum(-1, keepdim=True)
        assert torch.allclose(w[flat], expect, atol=1e-6)
        assert not torch.equal(i[flat], i0[flat])  # the targets do change the choice somewhere
    # the capture (registered first) records the transplanted routing, and scores move
    assert torch.allclose(out.routing, targets, atol=1e-5)
    assert not torch.allclose(out.choice_scores, plain, atol=1e-3)


def test_routers_without_softmax_weights_are_refused(tmp_path, tiny_model):
    tm, _, enc = load(tmp_path, tiny_model("DeepseekV3ForCausalLM"), mc_rows(4), "letter")
    targets = dirichlet(2, len(tm.layers), tm.num_experts, seed=1)
    with pytest.raises(ValueError, match="not softmax probabilities"):
        rescore(tm, enc, [0, 1], targets)


@pytest.mark.parametrize("scoring", ["letter", "loglik"])
def test_transplanting_own_routing_changes_nothing(tmp_path, tiny_dir, scoring):  # noqa: F811
    rows = mc_rows(24) if scoring == "letter" else multi_token_rows(12)
    tm, _, enc = load(tmp_path, tiny_dir, rows, scoring)
    snap = take_snapshot(tm, enc, batch_size=32)
    with torch.no_grad(), RoutingCapture(tm) as cap:
        batch = collate(enc, list(range(len(enc))), tm.tokenizer.pad_token_id)
        plain = forward(tm, batch, cap).choice_scores
    samples = list(range(len(enc)))[::-1]  # any order, other batches
    correct, scores = rescore(tm, enc, samples, snap.routing[samples], batch_size=5)
    assert torch.equal(correct, snap.correct[samples])
    for s, i in enumerate(samples):
        assert torch.allclose(scores[s], plain[i][batch.choice_mask[i]], atol=1e-5)
    # and a different target does move the scores (the identity is not vacuous)
    others = snap.routing[samples[::-1]]
    moved_ok, moved = rescore(tm, enc, samples, others, batch_size=5)
    assert any(not torch.allclose(a, b, atol=1e-3) for a, b in zip(moved, scores, strict=True))
    # which matches scoring each sample alone with a hand-written hook
    for s in range(0, len(samples), 3):
        alone_ok, alone = run_one(tm, enc, samples[s], others[s])
        assert alone_ok == bool(moved_ok[s]) and torch.allclose(alone, moved[s], atol=1e-5)


K, SIGMA = 3, 0.05  # a narrow kernel: the weights are far from uniform


@pytest.fixture(scope="module")
def counted(tmp_path_factory, tiny_dir):  # noqa: F811
    """Data with a few one-row tasks, the model, snapshot, embeddings and the brute-force
    neighbour targets (exact kNN, own kernel) of every wrong sample."""
    rows = unique_rows(40)
    for i in range(34, 40):  # tasks of one row: no same-task candidate for the control
        rows[i]["task"] = f"solo{i}"
    data = write_jsonl(tmp_path_factory.mktemp("counts") / "data.jsonl", rows)
    tm = load_model(str(tiny_dir), None, "float32", "cpu")
    examples = load_examples(str(data)).examples
    enc = encode(examples, tm.tokenizer, "letter")
    snap = take_snapshot(tm, enc, batch_size=40)
    ok = snap.correct.numpy()
    emb = embed_texts([e.prompt for e in examples], "all-MiniLM-L6-v2")
    nbr = brute_force(emb, ok, K)
    wrong = [i for i in range(len(rows)) if not ok[i]]
    targets = {}
    for i in wrong:
        d = 1.0 - emb[nbr[i]].astype(np.float64) @ emb[i].astype(np.float64)
        w = np.exp(-(np.maximum(d, 0) ** 2) / (2 * SIGMA**2))
        targets[i] = torch.tensor(w / w.sum(), dtype=torch.float32) @ snap.routing[nbr[i]]
    return dict(
        data=data,
        tm=tm,
        enc=enc,
        snap=snap,
        ok=ok,
        emb=emb,
        wrong=wrong,
        tasks=[e.task for e in examples],
        targets=targets,
    )


def test_targets_are_the_weighted_neighbours_and_random_successes(counted):
    c = counted
    snap, ok, wrong, tasks = c["snap"], c["ok"], c["wrong"], c["tasks"]
    nb = find_neighbours(c["emb"], ok, k=K, sigma=SIGMA)
    chosen, t = transplant_targets("neighbours", wrong, snap, nb, tasks, K, 0)
    assert chosen == wrong
    assert torch.allclose(t, torch.stack([c["targets"][i] for i in wrong]), atol=1e-5)
    for kind in ("random_same_task", "random_any"):
        chosen, t = transplant_targets(kind, wrong, snap, nb, tasks, K, 0)
        for i, target in zip(chosen, t, strict=True):
            pool = [j for j in np.flatnonzero(ok) if kind == "random_any" or tasks[j] == tasks[i]]
            size = min(K, len(pool))
            means = [snap.routing[list(s)].mean(0) for s in combinations(pool, size)]
            assert torch.stack(means).sub(target).abs().amax(-1).min() < 1e-6, (kind, i)
        again = transplant_targets(kind, wrong, snap, nb, tasks, K, 0)[1]
        other = transplant_targets(kind, wrong, snap, nb, tasks, K, 1)[1]
        assert torch.equal(again, t) and not torch.equal(other, t)  # seeded


def test_counts_and_neighbour_fix_rate_match_a_brute_force_recount(counted, tiny_dir):  # noqa: F811
    c = counted
    tm, enc, ok, wrong, tasks = c["tm"], c["enc"], c["ok"], c["wrong"], c["tasks"]
    n = len(enc)
    r = transplant_accuracy(
        str(tiny_dir), str(c["data"]), "letter", k=K, sigma=SIGMA, batch_size=16
    )
    # independent recount: one sample per forward with a hand-written hook
    fixed = {t: 0 for t in tasks}
    for i in wrong:
        fixed[tasks[i]] += run_one(tm, enc, i, c["targets"][i])[0]
    total = sum(fixed.values())
    assert 0 < len(wrong) < n and total > 0  # otherwise this test would prove little

    assert r["n"] == n and r["wrong"] == len(wrong) and r["layers"] == tm.layers
    assert r["base_accuracy"] == pytest.approx(ok.mean())
    nb = r["neighbours"]
    assert nb["tried"] == len(wrong) and nb["fixed"] == total
    assert nb["fix_rate"] == pytest.approx(total / len(wrong))
    for task, sub in r["per_task"].items():
        assert sub["neighbours"]["fixed"] == fixed[task]
        has_peer = [
            i
            for i in wrong
            if tasks[i] == task and any(ok[j] for j in range(n) if tasks[j] == task)
        ]
        assert sub["random_same_task"]["tried"] == len(has_peer)
    assert r["random_any"]["tried"] == len(wrong) > r["random_same_task"]["tried"]
    for key in ("n", "wrong"):
        assert sum(sub[key] for sub in r["per_task"].values()) == r[key]
    for kind in ("neighbours", "random_same_task", "random_any"):
        x = r[kind]
        assert 0 <= x["fixed"] <= x["tried"] <= r["wrong"]
        assert sum(sub[kind]["fixed"] for sub in r["per_task"].values()) == x["fixed"]
        assert x["accuracy_if_applied"] == pytest.approx((ok.sum() + x["fixed"]) / n)


def run_one(tm, enc, i: int, target: torch.Tensor) -> tuple[bool, torch.Tensor]:
    """(correct, choice scores) of sample ``i`` scored alone, with ``target`` forced at the
    last prompt token of each of its rows (one row per choice for multi-token loglik)."""
    batch = collate(enc, [i], tm.tokenizer.pad_token_id)  # right padding: rows start at 0
    width, n_prompt = batch.input_ids.shape[1], len(enc[i].prompt_ids)
    pos = torch.tensor([r * width + n_prompt - 1 for r in range(enc[i].num_rows)])
    e = tm.num_experts

    def hook_for(n):
        def hook(module, args, output):
            logits, w, idx = (o.clone() for o in output)
            t = target[n * e : (n + 1) * e]
            top = t.topk(idx.shape[-1]).indices
            logits[pos], idx[pos], w[pos] = t.log(), top, t[top]
            return logits, w, idx

        return hook

    assert not any(getattr(m, "norm_topk_prob", False) for m in tm.router_modules.values())
    routers = [gates(tm)[x] for x in tm.layers]
    handles = [m.register_forward_hook(hook_for(n)) for n, m in enumerate(routers)]
    try:
        with torch.no_grad(), RoutingCapture(tm) as cap:
            out = forward(tm, batch, cap)
    finally:
        for h in handles:
            h.remove()
    return bool(score(out, batch).correct[0]), out.choice_scores[0][batch.choice_mask[0]]


def test_diagnose_transplant_command_reports_the_brute_force_recount(
    counted,
    tiny_dir,  # noqa: F811
    tmp_path,
):
    """`roma-tune diagnose transplant` prints and writes the fix counts that an independent
    one-sample-at-a-time recount gives."""
    import json

    from typer.testing import CliRunner

    from tuner.cli import app

    c = counted
    fixed = sum(run_one(c["tm"], c["enc"], i, c["targets"][i])[0] for i in c["wrong"])
    out = tmp_path / "t.json"
    args = ["diagnose", "transplant", "--model", str(tiny_dir), "--data", str(c["data"])]
    args += ["--scoring", "letter", "--k", str(K), "--sigma", str(SIGMA), "--json", str(out)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert r["wrong"] == len(c["wrong"]) and r["neighbours"]["fixed"] == fixed
    assert f"{fixed}/{len(c['wrong'])}" in result.output


def test_diagnose_transplant_bad_data_is_one_line(tiny_dir, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from tuner.cli import app

    missing = tmp_path / "nope.jsonl"
    args = ["diagnose", "transplant", "--model", str(tiny_dir), "--data", str(missing)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "nope.jsonl" in result.output and "Traceback" not in result.output

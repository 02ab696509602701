"""`roma-tune eval`: scoring rules, the transformers backend, the JSON report, and agreement of
the vLLM backend (with the roma plugin) and the transformers backend on a tiny model."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tuner.cli.app import app
from tuner.data.prompts import Encoded
from tuner.evaluate.core import evaluate
from tuner.evaluate.options import EvalOptions
from tuner.evaluate.results import choose, free_form
from tuner.evaluate.summary import compare

WORDS = ["red", "green", "blue", "cat", "dog", "bird", "fish", "apple", "pear", "sun", "moon"]


def _rows(seed: int = 0) -> list[dict]:
    """Mixed rows: single-token choices, multi-token choices and free-form, four tasks."""
    rng = random.Random(seed)
    rows = []
    for i in range(24):
        choices = rng.sample(WORDS, 4)
        rows.append(
            {
                "question": " ".join(rng.choice(WORDS) for _ in range(5)) + " which one",
                "choices": choices,
                "answer": rng.randrange(4),
                "task": ["colors", "animals", "sky"][i % 3],
            }
        )
    for _ in range(8):
        rows.append(
            {
                "question": "the " + " ".join(rng.sample(WORDS, 3)),
                "choices": [" ".join(rng.sample(WORDS, 2)) for _ in range(3)],
                "answer": rng.randrange(3),
                "task": "pairs",
            }
        )
    for _ in range(6):
        rows.append(
            {
                "prompt": "the " + " ".join(rng.sample(WORDS, 4)),
                "completion": " " + " ".join(rng.sample(WORDS, 2)),
                "task": "free",
            }
        )
    return rows


def _random_deltas(model_dir: Path, out: Path, layers: set[int], strength: float) -> Path:
    from roma_vllm.architectures import architecture_of, find_routers, num_experts
    from roma_vllm.checkpoint import checkpoint_shapes, checkpoint_tensors, load_config
    from roma_vllm.deltas import make_deltas, write_deltas

    config = load_config(model_dir)
    arch = architecture_of(config)
    routers = find_routers(arch, checkpoint_shapes(model_dir), num_experts(config))
    base = checkpoint_tensors(model_dir, [n for n, layer in routers.items() if layer in layers])
    g = torch.Generator().manual_seed(1)
    tuned = {n: t + strength * t.std() * torch.randn(t.shape, generator=g) for n, t in base.items()}
    return write_deltas(out, make_deltas(base, tuned, arch, str(model_dir)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from roma_vllm.testing.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("eval")
    model = build_tiny_model(root / "olmoe", "OlmoeForCausalLM")
    deltas = _random_deltas(model, root / "deltas.safetensors", {2, 3}, strength=2.0)
    data = root / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return {"root": root, "model": model, "deltas": deltas, "data": data}


@pytest.fixture(scope="module")
def hf_json(setup: dict[str, Path]) -> Path:
    """The transformers backend's report, written through the CLI."""
    out = setup["root"] / "hf.json"
    result = CliRunner().invoke(
        app,
        [
            "eval", "--model", str(setup["model"]), "--deltas", str(setup["deltas"]),
            "--data", str(setup["data"]), "--scoring", "loglik", "--backend", "hf",
            "--json", str(out), "--plot", str(setup["root"] / "hf.png"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


# ------------------------------------------------------------------ scoring rules


def test_choose_prediction_and_margin() -> None:
    s = choose([-2.0, -1.0, -1.5], label=1)
    assert (s.prediction, s.correct) == (1, True)
    assert s.margin == pytest.approx(0.5)
    tie = choose([-1.0, -1.0], label=1)  # exact tie: the first choice, margin 0
    assert (tie.prediction, tie.correct, tie.margin) == (0, False, 0.0)


def test_free_form_margin_stops_at_first_divergence() -> None:
    ok = free_form([5, 6], [5, 6], [0.3, 0.2])
    assert ok.correct and ok.margin == pytest.approx(0.2)
    bad = free_form([5, 6, 7], [5, 9, 7], [0.3, 0.1, 0.001])
    assert not bad.correct and bad.margin == pytest.approx(0.1)  # step 3 is not counted


def test_compare_separates_near_ties_from_disagreements() -> None:
    def report(preds: list[int], margins: list[float], backend: str) -> dict:
        samples = [
            {"base": {"prediction": p, "correct": p == 0, "margin": m}}
            for p, m in zip(preds, margins, strict=True)
        ]
        return {
            "backend": backend,
            "data": "d",
            "data_fingerprint": "f",
            "overall": {"base": {}},
            "samples": samples,
        }

    a = report([0, 1, 2], [1.0, 1e-5, 1.0], "vllm")
    b = report([0, 0, 1], [1.0, 2e-5, 1.0], "hf")
    assert compare(a, b, 1e-3)["base"] == {
        "agree": 1,
        "near_tie_disagreements": [1],
        "disagreements": [2],
    }


# ------------------------------------------------------------------ transformers backend


def test_hf_scores_equal_full_forward(setup: dict[str, Path]) -> None:
    """Batched, padded, head-at-scored-positions scores equal a plain full forward per row."""
    from tuner.evaluate.backends.hf import load_eval_model, score_hf

    tm = load_eval_model(setup["model"], "float32")
    model = tm.model
    encoded = [
        Encoded([1, 40, 41, 42, 43, 44], [60, 61, 62], None, None, 2),
        Encoded([1, 50, 51], None, [[70, 71], [72], [73, 74, 75]], None, 0),
        Encoded([1, 52, 53, 54], None, None, [80, 81, 82], None),
    ]
    got = score_hf(setup["model"], encoded, dtype="float32", batch_rows=16, model=tm)

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    lp = logprobs(encoded[0].prompt_ids)[-1]
    assert got[0].scores == pytest.approx([lp[t].item() for t in [60, 61, 62]], abs=1e-5)
    sums = []
    for cont in encoded[1].continuations:
        lp = logprobs(encoded[1].prompt_ids + cont)
        sums.append(sum(lp[2 + t, tok].item() for t, tok in enumerate(cont)))
    assert got[1].scores == pytest.approx(sums, abs=1e-5)
    # free-form: the model's own greedy continuation is "correct"
    greedy = model.generate(torch.tensor([[1, 52, 53, 54]]), max_new_tokens=3, do_sample=False)
    target = greedy[0, 4:].tolist()
    own = score_hf(
        setup["model"],
        [Encoded([1, 52, 53, 54], None, None, target, None)],
        dtype="float32",
        model=tm,
    )
    assert own[0].correct and own[0].generated == target
    one_by_one = score_hf(setup["model"], encoded, dtype="float32", batch_rows=1, model=tm)
    for a, b in zip(got, one_by_one, strict=True):
        assert a.prediction == b.prediction
        assert a.scores == pytest.approx(b.scores, abs=1e-5) if a.scores else a.correct == b.correct


def test_hf_report_structure_and_deltas_change_scores(
    setup: dict[str, Path], hf_json: Path
) -> None:
    report = json.loads(hf_json.read_text())
    for key in ("model", "deltas", "backend", "dtype", "scoring", "data_fingerprint", "tolerance"):
        assert key in report
    assert report["backend"] == "hf" and report["dtype"] == "float32"
    assert set(report["overall"]) >= {"base", "tuned", "changed_predictions"}
    assert set(report["per_task"]) == {"colors", "animals", "sky", "pairs", "free"}
    n = len(_rows())
    assert report["overall"]["base"]["n"] == n == len(report["samples"])
    for variant in ("base", "tuned"):
        s = report["overall"][variant]
        assert s["correct"] == sum(x[variant]["correct"] for x in report["samples"])
        assert s["accuracy"] == pytest.approx(s["correct"] / n)
        per_task_n = sum(t[variant]["n"] for t in report["per_task"].values())
        assert per_task_n == n
    kinds = {x["kind"] for x in report["samples"]}
    assert kinds == {"option", "loglik", "free"}  # every scoring path is exercised
    diffs = [
        abs(a - b)
        for x in report["samples"]
        if "scores" in x["base"]
        for a, b in zip(x["base"]["scores"], x["tuned"]["scores"], strict=True)
    ]
    assert max(diffs) > 0.05  # the deltas do change what the model computes
    assert (setup["root"] / "hf.png").stat().st_size > 1000


def test_eval_defaults_to_the_training_scoring(setup: dict[str, Path]) -> None:
    from roma_vllm.deltas import read_deltas, write_deltas

    d = read_deltas(setup["deltas"])
    d.training = {"config": {"scoring": "loglik"}}
    path = write_deltas(setup["root"] / "trained.safetensors", d)
    report = evaluate(
        EvalOptions(model=str(setup["model"]), data=str(setup["data"]), deltas=str(path),
                    backend="hf", limit=3)
    )  # fmt: skip
    assert report["scoring"] == "loglik"
    assert report["overall"]["base"]["n"] == 3


def test_inputs_fill_unset_prompt_settings_from_the_training_config(
    setup: dict[str, Path],
) -> None:
    from roma_vllm.deltas import read_deltas, write_deltas
    from tuner.evaluate.inputs import resolve_inputs

    d = read_deltas(setup["deltas"])
    d.training = {
        "config": {"scoring": "loglik", "template": "Q: {question}\nA:", "chat_template": True}
    }
    path = write_deltas(setup["root"] / "recorded.safetensors", d)

    def opts(deltas: str | None, **kw: object) -> EvalOptions:
        return EvalOptions(model=str(setup["model"]), data=str(setup["data"]), deltas=deltas, **kw)

    recorded = resolve_inputs(opts(str(path)))
    assert (recorded.scoring, recorded.template, recorded.chat) == (
        "loglik",
        "Q: {question}\nA:",
        True,
    )
    assert recorded.deltas.layers == d.layers
    explicit = resolve_inputs(
        opts(str(path), scoring="letter", template="{question}", chat_template=False)
    )
    assert (explicit.scoring, explicit.template, explicit.chat) == ("letter", "{question}", False)
    plain = resolve_inputs(opts(None))
    assert (plain.deltas, plain.scoring, plain.template, plain.chat) == (
        None,
        "letter",
        None,
        False,
    )


def test_eval_errors_are_one_line(setup: dict[str, Path], tmp_path: Path) -> None:
    from roma_vllm.testing.tiny import build_tiny_model

    runner = CliRunner()
    base = ["eval", "--model", str(setup["model"]), "--backend", "hf"]
    missing = runner.invoke(app, [*base, "--data", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 1
    assert "Error:" in missing.output and "nope.jsonl: no such file" in missing.output
    other = build_tiny_model(tmp_path / "other", "OlmoeForCausalLM", seed=7)
    foreign = _random_deltas(other, tmp_path / "foreign.safetensors", {3}, 1.0)
    bad = runner.invoke(app, [*base, "--data", str(setup["data"]), "--deltas", str(foreign)])
    assert bad.exit_code == 1
    assert "fingerprint mismatch" in bad.output and bad.output.count("\n") <= 2
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a delta file")
    bad = runner.invoke(app, [*base, "--data", str(setup["data"]), "--deltas", str(junk)])
    assert bad.exit_code == 1 and "not a readable safetensors file" in bad.output
    wrong = runner.invoke(app, [*base[:-1], "tgi", "--data", str(setup["data"])])
    assert wrong.exit_code == 1 and "--backend: must be one of vllm, hf" in wrong.output


# ------------------------------------------------------------------ vLLM backend


@pytest.mark.vllm
def test_vllm_and_hf_agree(setup: dict[str, Path], hf_json: Path) -> None:
    """Through the plugin, vLLM computes what transformers computes with deltas in memory.

    Two engine starts (base, tuned); the run checks itself against the transformers report.
    """
    out = setup["root"] / "vllm.json"
    result = CliRunner().invoke(
        app,
        [
            "eval", "--model", str(setup["model"]), "--deltas", str(setup["deltas"]),
            "--data", str(setup["data"]), "--scoring", "loglik", "--json", str(out),
            "--check-against", str(hf_json), "--enforce-eager",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "base: vllm vs hf agree" in result.output
    report = json.loads(out.read_text())
    hf = json.loads(hf_json.read_text())
    for variant in ("base", "tuned"):
        agreement = report["agreement"][variant]
        assert agreement["disagreements"] == []
        assert len(agreement["near_tie_disagreements"]) <= 1  # rare, and reported
    worst = 0.0
    moved = 0.0
    for x, y in zip(report["samples"], hf["samples"], strict=True):
        for variant in ("base", "tuned"):
            if "scores" in x[variant]:
                pairs = zip(x[variant]["scores"], y[variant]["scores"], strict=True)
                worst = max(worst, *(abs(a - b) for a, b in pairs))
            else:
                assert x[variant]["correct"] == y[variant]["correct"]
        if "scores" in x["base"]:
            pairs = zip(x["base"]["scores"], x["tuned"]["scores"], strict=True)
            moved = max(moved, *(abs(a - b) for a, b in pairs))
    assert worst < 1e-3  # float32 on both sides: kernel-level differences only
    assert moved > 0.05  # and the plugin did apply the deltas
    assert not math.isnan(report["overall"]["tuned"]["accuracy"])

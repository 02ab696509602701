"""The synthetic task generator, the shipped demo data and a short pretraining run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from bench.synthetic import tasks
from bench.synthetic.pretrain import PretrainConfig, pretrain

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "bench" / "models" / "demo-olmoe"
DEMO_DATA = ROOT / "bench" / "data" / "demo"
SMALL = dict(n_train=12, n_val=5, n_test=6)


def check_row(row: dict) -> None:
    assert set(row) == {"question", "choices", "answer", "task"}
    assert isinstance(row["question"], str) and row["question"]
    assert isinstance(row["choices"], list) and 2 <= len(row["choices"]) <= 10
    assert all(isinstance(c, str) for c in row["choices"])
    assert len(set(row["choices"])) == len(row["choices"])
    assert isinstance(row["answer"], int) and 0 <= row["answer"] < len(row["choices"])
    assert row["task"] in tasks.FAMILY_NAMES


def test_generator_deterministic_per_seed():
    assert tasks.downstream_splits(0, **SMALL) == tasks.downstream_splits(0, **SMALL)
    assert tasks.pretrain_rows(200, 0) == tasks.pretrain_rows(200, 0)
    assert tasks.downstream_splits(0, **SMALL) != tasks.downstream_splits(1, **SMALL)
    assert tasks.pretrain_rows(200, 0) != tasks.pretrain_rows(200, 1)


def test_splits_disjoint_sized_and_valid():
    splits = tasks.downstream_splits(3, **SMALL)
    questions = {s: {r["question"] for r in rows} for s, rows in splits.items()}
    assert not questions["train"] & questions["val"]
    assert not questions["train"] & questions["test"]
    assert not questions["val"] & questions["test"]
    for split, n in (("train", 12), ("val", 5), ("test", 6)):
        assert len(questions[split]) == n * len(tasks.FAMILIES)
    for row in [r for rows in splits.values() for r in rows] + tasks.pretrain_rows(400, 3):
        check_row(row)


def test_pretrain_and_downstream_phrasings_differ():
    for family in tasks.FAMILIES:
        assert len(family.pretrain) >= 3 and len(family.downstream) >= 3
        assert not set(family.pretrain) & set(family.downstream)


def test_vocabulary_covers_every_word():
    vocab = set(tasks.vocabulary())
    rows = tasks.pretrain_rows(800, 5) + tasks.downstream_splits(5, **SMALL)["train"]
    for row in rows:
        assert set(tasks.words(row["question"])) <= vocab
        assert set(row["choices"]) <= vocab


def test_too_many_rows_asked_is_a_clear_error():
    with pytest.raises(ValueError, match="task 'facts': only 288 distinct questions, 300 asked"):
        tasks.downstream_splits(0, n_train=0, n_val=150, n_test=150)


def test_train_takes_what_val_and_test_leave():
    splits = tasks.downstream_splits(0, n_train=250, n_val=20, n_test=30)
    train = Counter(r["task"] for r in splits["train"])
    # facts has 288 distinct downstream questions: 288 - 20 - 30 are left for train
    assert train == {name: 238 if name == "facts" else 250 for name in tasks.FAMILY_NAMES}
    for split, n in (("val", 20), ("test", 30)):
        assert Counter(r["task"] for r in splits[split]) == dict.fromkeys(tasks.FAMILY_NAMES, n)


def test_cli_writes_the_four_files(tmp_path: Path):
    from typer.testing import CliRunner

    args = ["--out", str(tmp_path), "--seed", "2", "--n-pretrain", "50", "--n-train", "4"]
    result = CliRunner().invoke(tasks.app, [*args, "--n-val", "2", "--n-test", "3"])
    assert result.exit_code == 0, result.output
    counts = {p.stem: len(tasks.read_jsonl(p)) for p in tmp_path.glob("*.jsonl")}
    assert counts == {"pretrain": 50, "train": 32, "val": 16, "test": 24}


def test_shipped_demo_data_valid_disjoint_single_token():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    seen: set[str] = set()
    for split in tasks.SPLITS:
        rows = tasks.read_jsonl(DEMO_DATA / f"{split}.jsonl")
        assert {r["task"] for r in rows} == set(tasks.FAMILY_NAMES)
        questions = {r["question"] for r in rows}
        assert len(questions) == len(rows) and not questions & seen
        seen |= questions
        for row in rows:
            check_row(row)
            for choice in row["choices"]:
                ids = tok(choice, add_special_tokens=False)["input_ids"]
                assert len(ids) == 1 and ids[0] != tok.unk_token_id, choice
            assert tok.unk_token_id not in tok(row["question"])["input_ids"]


def test_shipped_demo_metrics_are_the_shipped_models():
    """metrics.json's validation accuracies, recomputed from the shipped checkpoint and data
    (the answer word scored among the choices at each prompt's last token; right-padded
    batches with an attention mask), and above chance (4 choices)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metrics = json.loads((DEMO_MODEL / "metrics.json").read_text())
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    rows = tasks.read_jsonl(DEMO_DATA / "val.jsonl")
    for name, wrapper in (("raw", "{q}"), ("qa", "question: {q}\nanswer:")):
        hits: dict[str, list[bool]] = {}
        for start in range(0, len(rows), 100):
            chunk = rows[start : start + 100]
            texts = [wrapper.format(q=r["question"]) for r in chunk]
            ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
            width = max(map(len, ids))
            batch = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
            with torch.no_grad():
                logits = model(input_ids=batch, attention_mask=mask).logits
            for i, r in enumerate(chunk):
                choices = [tok(c, add_special_tokens=False)["input_ids"][0] for c in r["choices"]]
                scores = logits[i, len(ids[i]) - 1, choices]
                hits.setdefault(r["task"], []).append(int(scores.argmax()) == r["answer"])
        every = [h for task_hits in hits.values() for h in task_hits]
        recomputed = {t: round(sum(h) / len(h), 4) for t, h in hits.items()}
        recomputed["all"] = round(sum(every) / len(every), 4)
        assert recomputed == metrics["accuracy"][f"downstream_val/{name}"], name
        assert recomputed["all"] > 0.25 + 0.1, name


TINY = dict(
    steps=3, batch_size=8, hidden=32, heads=1, layers=2, experts=4, expert_width=32, warmup=1
)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("data")
    tasks.generate(data, seed=0, n_pretrain=400, n_train=3, n_val=2, n_test=2)
    return data


def test_short_pretraining_run_is_deterministic_and_loads(tiny_data: Path, tmp_path: Path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        pretrain(tiny_data, out, PretrainConfig(**TINY), progress=False)

    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["seed"] == 0 and not metrics["cut_short_by_minutes"]
    assert {"pretrain_heldout/raw", "downstream_val/qa"} <= set(metrics["accuracy"])
    model = AutoModelForCausalLM.from_pretrained(runs[0])
    assert type(model).__name__ == "OlmoeForCausalLM"
    a, b = (load_file(r / "model.safetensors") for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def served_pretrained(tiny_data: Path, tmp_path_factory, run_vllm_jobs) -> dict:
    """Short pretraining runs of both architectures; HF greedy tokens and vLLM's (one
    subprocess for both engines)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    jobs, expected = {}, {}
    for arch in ("olmoe", "qwen3moe"):
        out = tmp_path_factory.mktemp(arch)
        pretrain(tiny_data, out, PretrainConfig(arch=arch, dtype="float32", **TINY), progress=False)
        tok = AutoTokenizer.from_pretrained(out)
        rows = tasks.read_jsonl(tiny_data / "val.jsonl")
        prompts = [tok(r["question"], add_special_tokens=False)["input_ids"] for r in rows]
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        expected[arch] = []
        with torch.no_grad():
            for ids in prompts:
                seq = torch.tensor([ids])
                for _ in range(4):
                    nxt = model(input_ids=seq).logits[0, -1].argmax()
                    seq = torch.cat([seq, nxt.view(1, 1)], 1)
                expected[arch].append(seq[0, len(ids) :].tolist())
        jobs[arch] = {"model": str(out), "prompts": prompts, "max_tokens": 4}
    return {"expected": expected, "vllm": run_vllm_jobs(jobs)}


@pytest.mark.vllm
@pytest.mark.parametrize("arch", ["olmoe", "qwen3moe"])
def test_short_pretraining_checkpoint_loads_in_vllm_like_transformers(
    arch: str, served_pretrained: dict
):
    result = served_pretrained["vllm"][arch]
    assert result["ok"], result.get("error")
    assert result["tokens"] == served_pretrained["expected"][arch]


def test_short_pretraining_run_qwen3moe(tiny_data: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    pretrain(tiny_data, tmp_path, PretrainConfig(arch="qwen3moe", **TINY), progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert (tmp_path / "metrics.json").exists()


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="--hidden 100: must be a multiple of 32"):
        PretrainConfig(hidden=100)


def test_expert_groups_and_route_loss_match_a_direct_computation():
    from bench.synthetic.pretrain import expert_groups, route_loss

    groups = expert_groups(["b", "a", "c", "a"], 7)
    assert groups == {"a": [0, 1], "b": [2, 3], "c": [4, 5]}
    with pytest.raises(ValueError, match="at least one expert per task: 2 experts, 3 tasks"):
        expert_groups(["a", "b", "c"], 2)

    gen = torch.Generator().manual_seed(0)
    batch, seq, n_exp = 3, 4, 7
    logits = tuple(torch.randn(batch * seq, n_exp, generator=gen) for _ in range(2))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    tasks = ["a", "c", "b"]
    group_mask = torch.zeros(batch, n_exp, dtype=torch.bool)
    for i, t in enumerate(tasks):
        group_mask[i, groups[t]] = True
    terms = []
    for layer in logits:
        for b in range(batch):
            for s in range(seq):
                if mask[b, s]:
                    p = layer[b * seq + s].softmax(-1)
                    terms.append(-torch.log(p[groups[tasks[b]]].sum()))
    expected = torch.stack(terms).reshape(2, -1).mean(1).mean()
    torch.testing.assert_close(route_loss(logits, mask, group_mask), expected)


@pytest.fixture(scope="module")
def routed_model(tiny_data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("routed")
    cfg = PretrainConfig(**{**TINY, "experts": 8, "top_k": 1}, route_coef=1.0, dtype="float32")
    pretrain(tiny_data, out, cfg, progress=False)
    return out


def test_routing_gap_base_matches_pretrain_evaluation_and_forcing_routes_to_the_group(
    routed_model: Path, tiny_data: Path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.synthetic.pretrain import accuracy_by_task, encode, evaluate
    from bench.synthetic.routing_gap import forced_routing, routing_gap

    metrics = json.loads((routed_model / "metrics.json").read_text())
    groups = metrics["expert_groups"]
    assert sorted(groups) == sorted(tasks.FAMILY_NAMES) and all(
        len(g) == 1 for g in groups.values()
    )
    val = tiny_data / "val.jsonl"
    result = routing_gap(str(routed_model), str(val))

    tok = AutoTokenizer.from_pretrained(routed_model)
    model = AutoModelForCausalLM.from_pretrained(routed_model, dtype=torch.float32)
    enc = encode(tasks.read_jsonl(val), tok)
    direct = evaluate(model, enc, 1, tok.pad_token_id)
    assert result["base"] == accuracy_by_task(direct["correct"], enc.tasks)
    assert set(result) >= {"own", "other"}

    # forcing sends every token of a row to its task's expert, in every layer
    seen = []
    ids = tok([tasks.read_jsonl(val)[0]["question"]], add_special_tokens=False)["input_ids"]
    expert = groups[enc.tasks[0]][0]
    bias = {"rows": torch.zeros(len(ids[0]), 8)}
    bias["rows"][:, expert] = 30.0
    with forced_routing(model, bias), torch.no_grad():
        hooks = [  # registered after the forcing hooks: they see the forced choice
            layer.mlp.gate.register_forward_hook(lambda m, a, o: seen.append(o[2][:, 0].clone()))
            for layer in model.model.layers
        ]
        model(input_ids=torch.tensor(ids))
    for h in hooks:
        h.remove()
    assert len(seen) == len(model.model.layers)
    assert all(bool((s == expert).all()) for s in seen)


def test_routing_gap_last_only_forces_just_the_last_prompt_token(
    routed_model: Path, tiny_data: Path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.synthetic.pretrain import accuracy_by_task, encode
    from bench.synthetic.routing_gap import BIAS, forced_routing, routing_gap

    val = tiny_data / "val.jsonl"
    result = routing_gap(str(routed_model), str(val), last_only=True)
    groups = json.loads((routed_model / "metrics.json").read_text())["expert_groups"]
    tok = AutoTokenizer.from_pretrained(routed_model)
    model = AutoModelForCausalLM.from_pretrained(routed_model, dtype=torch.float32)
    enc = encode(tasks.read_jsonl(val), tok)
    bias: dict = {"rows": None}
    correct, scores = [], []
    with forced_routing(model, bias), torch.no_grad():
        for i, task in enumerate(enc.tasks):  # one unpadded row at a time
            ids = enc.prompts[i][1]
            bias["rows"] = torch.zeros(len(ids), 8)
            bias["rows"][-1, groups[task]] = BIAS
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1, enc.choices[i]]
            correct.append(int(logits.argmax()) == enc.answers[i])
            scores.append(logits.tolist())
    assert result["last_only"] is True
    assert result["own"] == pytest.approx(accuracy_by_task(correct, enc.tasks))
    torch.testing.assert_close(torch.tensor(result["choice_scores"]["own"]), torch.tensor(scores))
    everywhere = routing_gap(str(routed_model), str(val))["choice_scores"]["own"]
    assert not torch.allclose(torch.tensor(everywhere), torch.tensor(scores), atol=1e-4)

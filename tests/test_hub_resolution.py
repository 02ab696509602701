"""Hub checkpoints resolve with what their tokenizer and chat template need.

A local folder laid out like a Hub repository stands in for the Hub: ``snapshot_download``
is replaced by a copy that honours ``allow_patterns`` / ``ignore_patterns`` with
huggingface_hub's own filter. The repository holds a sentencepiece tokenizer
(``tokenizer.model`` only, no ``tokenizer.json``), a separate ``chat_template.jinja``,
remote code, and a pickle that must never be fetched.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from roma_vllm.checkpoint import resolve_checkpoint
from roma_vllm.errors import MissingFileError

REPO = "example-org/tiny-moe-spm"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SENTENCE = "the cat is on the red tree"


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A Hub-like repository: tiny OLMoE weights + a sentencepiece tokenizer and extras."""
    import sentencepiece as spm

    from roma_vllm.testing.tiny import build_tiny_model, corpus

    repo = build_tiny_model(tmp_path_factory.mktemp("hub") / "repo", "OlmoeForCausalLM")
    for f in repo.glob("tokenizer*"):  # replace the BPE tokenizer by a sentencepiece one
        f.unlink()
    (repo / "special_tokens_map.json").unlink(missing_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        vocab_size=150,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (repo / "tokenizer.model").write_bytes(model.getvalue())
    (repo / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
            }
        )
    )
    (repo / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (repo / "modeling_tiny.py").write_text("RAN = True\n")
    (repo / "pytorch_model.bin").write_bytes(b"\x80\x04not-to-be-unpickled")
    (repo / "training_args.pt").write_bytes(b"\x80\x04pickle")
    return SimpleNamespace(path=repo, spm=model.getvalue())


@pytest.fixture
def fake_hub(
    hub_repo: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> list[dict]:
    """``huggingface_hub.snapshot_download`` serving ``REPO`` from ``hub_repo``; records calls."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls: list[dict] = []

    def snapshot_download(repo_id: str, **kwargs: Any) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        if repo_id != REPO:
            raise huggingface_hub.errors.RepositoryNotFoundError(f"{repo_id}: not found")
        files = [str(p.relative_to(hub_repo.path)) for p in hub_repo.path.rglob("*") if p.is_file()]
        wanted = filter_repo_objects(
            files,
            allow_patterns=kwargs.get("allow_patterns"),
            ignore_patterns=kwargs.get("ignore_patterns"),
        )
        snapshot = tmp_path / "cache" / f"snapshot-{len(calls)}"
        for name in wanted:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(hub_repo.path / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def _spm(hub_repo: SimpleNamespace) -> list[int]:
    """SENTENCE encoded by sentencepiece itself (no special tokens)."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=hub_repo.spm).encode(SENTENCE)


def _check_tokenizer(folder: Path, hub_repo: SimpleNamespace) -> Any:
    """The folder's tokenizer is the sentencepiece one, with the separate chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    assert tok(SENTENCE)["input_ids"] == [tok.bos_token_id, *_spm(hub_repo)]
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|user|> hi\n<|assistant|>"
    return tok


def test_hub_checkpoint_keeps_sentencepiece_tokenizer_and_chat_template(
    hub_repo: SimpleNamespace, fake_hub: list[dict]
) -> None:
    folder = resolve_checkpoint(REPO)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "chat_template.jinja"} <= names
    assert not names & {"pytorch_model.bin", "training_args.pt"}  # never pickles
    assert "modeling_tiny.py" not in names  # remote code only when trusted
    _check_tokenizer(folder, hub_repo)


def test_remote_code_is_fetched_only_with_trust_remote_code(
    hub_repo: SimpleNamespace, fake_hub: list[dict]
) -> None:
    folder = resolve_checkpoint(REPO, trust_remote_code=True)
    names = {p.name for p in folder.iterdir()}
    assert "modeling_tiny.py" in names and "tokenizer.model" in names
    assert not names & {"pytorch_model.bin", "training_args.pt"}


def test_tuner_and_eval_resolve_the_hub_name_with_the_tokenizer(
    hub_repo: SimpleNamespace, fake_hub: list[dict]
) -> None:
    """load_model (run) and resolve_inputs (eval, report) pass --trust-remote-code along."""
    from tuner.evaluate.inputs import resolve_inputs
    from tuner.model.load import load_model

    tm = load_model(REPO, layers="last1", dtype="float32", device="cpu", trust_remote_code=True)
    assert tm.tokenizer.chat_template == CHAT_TEMPLATE
    assert tm.tokenizer(SENTENCE)["input_ids"] == [tm.tokenizer.bos_token_id, *_spm(hub_repo)]
    assert "*.py" in fake_hub[-1]["allow_patterns"]
    opts = SimpleNamespace(
        model=REPO,
        deltas=None,
        allow_mismatch=False,
        scoring=None,
        template=None,
        chat_template=None,
        trust_remote_code=False,
    )
    inputs = resolve_inputs(opts)
    assert "*.py" not in fake_hub[-1]["allow_patterns"]
    _check_tokenizer(inputs.checkpoint, hub_repo)


def test_unknown_hub_name_is_one_line(fake_hub: list[dict]) -> None:
    with pytest.raises(MissingFileError, match=r"^nobody/nothing: not a local directory") as e:
        resolve_checkpoint("nobody/nothing")
    assert "\n" not in str(e.value)

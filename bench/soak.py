"""Soak: `vllm serve --load-format roma` under many concurrent clients, on loopback.

A tiny OLMoE with handmade deltas on every router is served with the plugin; ``--clients``
threads send greedy completion requests back to back for ``--seconds`` (bounded: every
request has a timeout and every client stops at the deadline). Measured: requests served
and failed, latency percentiles, whether every answer to the same prompt is the same text
(greedy decoding under load), and the resident memory of the server's process group sampled
every few seconds (first minute against last minute: flat means no leak).

    python -m bench.soak            # make bench-soak: 64 clients, 3 minutes
    python -m bench.soak --clients 8 --seconds 20   # a smoke run
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import typer

from bench.common import RESULTS, machine, machine_summary, write_json, write_readme_section

PROMPTS = [f"Question {i}: which word follows {w}?" for i, w in enumerate("abcdefghijklmnop")]
SAMPLE_EVERY = 5.0  # seconds between memory samples

app = typer.Typer(add_completion=False)


def group_rss(pgid: int) -> int:
    """Resident bytes of every live process in process group ``pgid`` (Linux /proc)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in (stat.parent / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
    return total


def _request(url: str, model: str, prompt: str, timeout: float) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0.0}
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())["choices"][0]["text"]


def load(url: str, model: str, clients: int, seconds: float, timeout: float) -> dict[str, Any]:
    """``clients`` threads, each sending requests back to back until the deadline."""
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []
    answers: dict[str, set[str]] = {}

    def client(n: int) -> None:
        i = n
        while time.monotonic() < deadline:
            prompt = PROMPTS[i % len(PROMPTS)]
            i += clients
            t0 = time.perf_counter()
            try:
                text = _request(url, model, prompt, timeout)
            except Exception as e:  # noqa: BLE001  (a failed request is what we count)
                with lock:
                    failures.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
                answers.setdefault(prompt, set()).add(text)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + timeout + 30)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {
        "requests": len(latencies) + len(failures),
        "served": len(latencies),
        "failed": len(failures),
        "failures": failures[:10],
        "latency_s": {"p50": q[49], "p95": q[94], "p99": q[98], "max": max(latencies, default=0)},
        "requests_per_s": len(latencies) / seconds,
        "prompts_with_one_answer": sum(len(a) == 1 for a in answers.values()),
        "prompts_answered": len(answers),
        "stuck_clients": sum(t.is_alive() for t in threads),
    }


def soak(clients: int, seconds: float, timeout: float, work: Path) -> dict[str, Any]:
    from roma_vllm.testing import VllmServer, write_handmade_deltas
    from roma_vllm.testing.tiny import build_tiny_model

    model = build_tiny_model(work / "olmoe")
    deltas = write_handmade_deltas(model, work / "deltas.safetensors")
    args = [
        "--load-format", "roma",
        "--model-loader-extra-config", json.dumps({"roma_deltas": str(deltas)}),
        "--enforce-eager", "--max-model-len", "256", "--dtype", "float32",
        "--max-num-seqs", str(clients),
    ]  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    samples: list[tuple[float, int]] = []
    with VllmServer(model, args, log_path=work / "serve.log", env=env) as server:
        if "roma-vllm: merged router deltas" not in server.log():
            raise RuntimeError(f"the plugin did not log its merge; see {work / 'serve.log'}")
        url = server.base_url + "/v1/completions"
        _request(url, str(model), PROMPTS[0], timeout)  # warm-up, outside the figures
        stop = threading.Event()
        t0 = time.monotonic()

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.monotonic() - t0, group_rss(server.proc.pid)))
                stop.wait(SAMPLE_EVERY)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = load(url, str(model), clients, seconds, timeout)
        stop.set()
        sampler.join()
        result["server_alive"] = server.proc.poll() is None
        result["startup_s"] = server.startup_seconds
    window = min(60.0, seconds / 3)
    first = [r for t, r in samples if t <= window]
    last = [r for t, r in samples if t >= samples[-1][0] - window]
    result["rss_mib"] = {
        "first_window_median": statistics.median(first) / 2**20,
        "last_window_median": statistics.median(last) / 2**20,
        "max": max(r for _, r in samples) / 2**20,
        "window_s": window,
        "samples": [(round(t, 1), round(r / 2**20, 1)) for t, r in samples],
    }
    result["rss_growth"] = result["rss_mib"]["last_window_median"] / max(
        result["rss_mib"]["first_window_median"], 1e-9
    )
    return result


def section(r: dict[str, Any], cmd: str, wall: float) -> str:
    rss, lat = r["rss_mib"], r["latency_s"]
    ok = r["failed"] == 0 and r["stuck_clients"] == 0 and r["server_alive"]
    return f"""## Soak: the plugin under concurrent load

`{cmd}` ({wall / 60:.1f} min in all), {machine_summary(r["machine"], ("torch", "vllm"))}.
A tiny OLMoE with deltas on every router, served by `vllm serve --load-format roma` on
loopback; {r["clients"]} clients send greedy 8-token completions back to back for
{r["seconds"]:.0f} s. Raw numbers: [results/soak.json](results/soak.json).

| figure | measured | goal |
|---|---|---|
| requests served / failed | {r["served"]} / **{r["failed"]}** | 0 failed |
| clients still waiting at the end | {r["stuck_clients"]} | 0 |
| throughput | {r["requests_per_s"]:.1f} requests/s | |
| latency p50 / p95 / p99 / max | {lat["p50"]:.2f} / {lat["p95"]:.2f} / {lat["p99"]:.2f} / {lat["max"]:.2f} s | |
| prompts whose every answer was the same text | {r["prompts_with_one_answer"]} of {r["prompts_answered"]} | all (greedy) |
| server RSS, first {rss["window_s"]:.0f} s → last {rss["window_s"]:.0f} s (median) | {rss["first_window_median"]:.0f} → {rss["last_window_median"]:.0f} MiB (**{r["rss_growth"]:.3f}x**), max {rss["max"]:.0f} MiB | flat |

{"All goals met." if ok else "**Goals missed: see the figures above.**"}
"""


@app.command()
def main(
    clients: int = typer.Option(64, help="Concurrent clients."),
    seconds: float = typer.Option(180.0, help="How long the clients send requests."),
    timeout: float = typer.Option(120.0, help="Per-request timeout (s)."),
    readme: bool = typer.Option(True, help="Write the results section of bench/README.md."),
) -> None:
    """Serve with the plugin under concurrent load; print and record the figures."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="roma-soak-") as tmp:
        r = soak(clients, seconds, timeout, Path(tmp))
    wall = time.perf_counter() - t0
    r |= {"clients": clients, "seconds": seconds, "machine": machine(), "wall_s": wall}
    print(json.dumps({k: v for k, v in r.items() if k not in ("machine", "rss_mib")}, indent=2))
    print(f"rss MiB: {r['rss_mib']['first_window_median']:.0f} -> "
          f"{r['rss_mib']['last_window_median']:.0f} ({r['rss_growth']:.3f}x)")  # fmt: skip
    if readme:
        write_json(RESULTS / "soak.json", r)
        cmd = "make bench-soak" if (clients, seconds) == (64, 180.0) else "python -m bench.soak"
        write_readme_section(section(r, cmd, wall))
    if r["failed"] or r["stuck_clients"] or not r["server_alive"]:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()

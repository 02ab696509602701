"""Running the measured commands: a process tree's peak memory, waiting for free memory,
the alternating vLLM engine rounds and the `roma-tune run`s.

Memory of a child is measured two ways: ``wait4``'s ``ru_maxrss`` (the kernel's peak
resident set of the child and the descendants it waited for) and a 0.2-s poll of the whole
tree's ``VmRSS`` and ``RssAnon`` (anonymous memory: what the process allocated, as opposed
to file pages mapped from the checkpoint, which the kernel can drop at any time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import ROOT, TUNE

GIB = 1024**3
HEAVY_FREE_GIB = 18  # available memory a heavy step waits for
WAIT_FOR_MEMORY_S = 600


def available_gib() -> float:
    return psutil.virtual_memory().available / GIB


def wait_for_memory(what: str, need_gib: float | None = None) -> float:
    """Wait (up to ``WAIT_FOR_MEMORY_S``) until ``need_gib`` (default ``HEAVY_FREE_GIB``)
    GiB are available; returns what is available then. Other work shares this machine."""
    need_gib = HEAVY_FREE_GIB if need_gib is None else need_gib
    t0 = time.monotonic()
    while (free := available_gib()) < need_gib:
        if time.monotonic() - t0 > WAIT_FOR_MEMORY_S:
            raise SystemExit(
                f"{what}: needs {need_gib} GiB available, only {free:.1f} GiB after waiting "
                f"{WAIT_FOR_MEMORY_S // 60} min (other work is using the memory); try later"
            )
        print(f"  {what}: {free:.1f} GiB available, waiting for {need_gib} ...", flush=True)
        time.sleep(30)
    return round(free, 1)


def _status(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of ``pid`` in bytes; zeros if it is gone."""
    rss = anon = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return rss, anon


def _cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class TreePeak:
    """Polls a process and its descendants: the peak of the summed VmRSS and RssAnon, and a
    series of (wall clock, CPU seconds) to tell how much CPU any interval of the run got."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.rss = self.anon = self.anon_at_peak = 0
        self.cpu: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                pids = [self.pid] + [c.pid for c in root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss, anon = map(sum, zip(*(_status(p) for p in pids), strict=True))
            if rss > self.rss:
                self.rss, self.anon_at_peak = rss, anon
            self.anon = max(self.anon, anon)
            self.cpu.append((time.time(), sum(_cpu(p) for p in pids)))
            self._stop.wait(self.interval)

    def cpu_between(self, t0: float, t1: float) -> float:
        """CPU seconds the tree used between wall-clock times ``t0`` and ``t1``."""
        return _cpu_at(self.cpu, t1) - _cpu_at(self.cpu, t0)

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _cpu_at(series: list[tuple[float, float]], t: float) -> float:
    """Cumulative CPU seconds at wall time ``t``, interpolated in the poll series."""
    if not series:
        return 0.0
    for (ta, ca), (tb, cb) in zip(series, series[1:], strict=False):
        if ta <= t <= tb:
            return ca + (cb - ca) * (t - ta) / (tb - ta) if tb > ta else ca
    return series[0][1] if t < series[0][0] else series[-1][1]


def run_measured(args: list[str], log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``args`` (output appended to ``log``); exit status, wall time and peak memory."""
    with log.open("a") as f:
        f.write("$ " + " ".join(args) + "\n")
        f.flush()
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        proc = subprocess.Popen(
            args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
        )
        with TreePeak(proc.pid) as peak:
            _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": proc.returncode,
        "wall_s": round(time.perf_counter() - t0, 2),
        # other work's load on the machine (1-min average) as the command started and ended
        "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_bytes": peak.rss,
        "peak_anon_bytes": peak.anon,
        # at the moment of the RSS peak: anonymous memory, the rest is mapped file pages
        "anon_at_peak_rss_bytes": peak.anon_at_peak,
        "maxrss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "_peak": peak,  # the poll series, for stage CPU times; dropped by the caller
    }


def _tail(log: Path, n: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


# -- vLLM: base and roma engines, alternating ---------------------------------------------


def read_through(model: Path, chunk: int = 16 * 2**20) -> dict[str, float]:
    """Read every safetensors shard of ``model`` once, start to end, so that the next load
    finds the page cache in the same state whichever variant it is: as much of the
    checkpoint cached as the free memory holds, in file order. (Without it the first load
    after the build read a warm cache and the others a cold one: 15 s against 24-27 s on
    an AMX machine.) Returns the bytes read and the seconds it took: a few seconds when
    the pages were still cached, longer when they came from the disk."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    t0, total = time.perf_counter(), 0
    for shard in sorted(model.glob("*.safetensors")):
        with open(shard, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return {"bytes": total, "seconds": round(time.perf_counter() - t0, 2)}


def pair_order(pairs: int) -> list[tuple[str, str]]:
    """Base first in even pairs, roma first in odd ones: base, roma, roma, base, ..."""
    return [("base", "roma") if p % 2 == 0 else ("roma", "base") for p in range(pairs)]


def engine_rounds(model: Path, deltas: Path, pairs: int, work: Path) -> list[dict[str, Any]]:
    """``2 * pairs`` engine starts, each in a fresh process, in the order base, roma, roma,
    base, ...: each pair's two rounds are neighbours in time, and neither variant always
    goes first. Before each, the checkpoint is read through once (:func:`read_through`)
    so both sides of a pair load from the same page-cache state."""
    rounds = []
    for p, names in enumerate(pair_order(pairs)):
        for name in names:
            free = wait_for_memory(f"vLLM {name} load")
            warm = read_through(model)
            out = work / f"engine-{p}-{name}.json"
            log = work / f"engine-{p}-{name}.log"
            args = [sys.executable, "-m", "bench.realsize.engine", str(model), str(out)]
            if name == "roma":
                args.append(str(deltas))
            res = run_measured(args, log)
            res.pop("_peak")
            if res["returncode"] or not out.exists():
                raise SystemExit(f"vLLM {name} engine failed (see {log}):\n{_tail(log)}")
            res.update(json.loads(out.read_text()), pair=p, variant=name, available_gib=free)
            res["read_through"] = warm
            res["merge_logged"] = "roma-vllm: merged router deltas" in log.read_text()
            rounds.append(res)
            print(
                f"  pair {p + 1}/{pairs} {name}: checkpoint read through in "
                f"{warm['seconds']:.1f} s, model load {res['model_load_s']:.1f} s, "
                f"engine start {res['engine_start_s']:.1f} s, peak RSS "
                f"{res['peak_rss_bytes'] / GIB:.2f} GiB (anon {res['peak_anon_bytes'] / GIB:.2f})",
                flush=True,
            )
    return rounds


# -- roma-tune run --------------------------------------------------------------------------

# three epochs: on a shared machine the fastest of several epochs and passes is the figure
# least touched by other work (which only ever slows a run down)
EPOCHS = 3
RUN_ARGS = [
    "--layers", "last5", "--dtype", "bfloat16", "--epochs", str(EPOCHS), "--batch-size", "8",
    "--lr", "1e-3", "--device", "cpu", "--no-progress",
]  # fmt: skip


def tune(model: Path, data: Path, out: Path, log: Path, cached: bool) -> dict[str, Any]:
    """One ``roma-tune run`` in bf16, measured; its own stage and epoch timings from
    ``RUN_DIR/train_log.jsonl``, with the CPU seconds of each interval.

    No-grad passes over the training rows, in order: the routing snapshot (stage
    ``snapshot``), after each epoch the train-accuracy pass (``--refresh epoch``), and after
    training the pass at served precision. With the frozen-layer cache the first full pass
    is split in two stages (``prefix``: the frozen layers, ``snapshot``: the tuned ones from
    the cache), and the later passes read the cache too.
    """
    name = "cached" if cached else "plain"
    free = wait_for_memory(f"roma-tune run ({name})")
    args = [TUNE, "run", "--model", str(model), "--data", str(data), "--out", str(out)]
    args += RUN_ARGS + (["--cache-frozen-layers"] if cached else [])
    res = run_measured(args, log)
    if res["returncode"]:
        raise SystemExit(f"roma-tune run ({name}) failed (see {log}):\n{_tail(log)}")
    peak: TreePeak = res.pop("_peak")
    events = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]

    def cpu(t0: float, t1: float) -> float:
        return round(peak.cpu_between(t0, t1), 2)

    # the log stamps each stage's end (wall clock); CPU time is read off the poll series
    timed = [e for e in events if e["event"] == "stage" and "seconds" in e]
    stages = {
        e["stage"]: {"seconds": e["seconds"], "cpu": cpu(e["time"] - e["seconds"], e["time"])}
        for e in timed
    }
    train = next(e for e in timed if e["stage"] == "training")
    epochs, after = [], []
    start = train["time"] - train["seconds"]  # the first epoch opens the training stage
    for e in (e for e in events if e["event"] == "epoch"):
        end = start + e["seconds"]
        epochs.append(
            {
                "seconds": e["seconds"],
                "cpu": cpu(start, end),
                "samples_per_second": e["samples_per_second"],
            }
        )
        # logged once the train-accuracy pass after the epoch is done; the next epoch starts
        # right after (a router checkpoint of a few MB is saved in between)
        after.append({"seconds": round(e["time"] - end, 3), "cpu": cpu(end, e["time"])})
        start = e["time"]
    done = next(e for e in events if e["event"] == "done")
    served = {
        "seconds": round(done["time"] - train["time"], 3),
        "cpu": cpu(train["time"], done["time"]),
    }
    res.update(
        variant=name,
        available_gib=free,
        stages=stages,
        epochs=epochs,
        passes_after_epoch=after,
        served_pass=served,
        log_lines=[x for x in log.read_text(errors="replace").splitlines() if x.strip()][-16:],
    )
    walls = ", ".join(f"{x['seconds']:.1f}" for x in epochs)
    after_walls = ", ".join(f"{x['seconds']:.1f}" for x in after)
    stage_walls = {k: v["seconds"] for k, v in stages.items()}
    print(
        f"  roma-tune run ({name}): {res['wall_s']:.0f} s, epochs {walls} s, passes after "
        f"them {after_walls} s, stages {stage_walls}, peak RSS "
        f"{res['peak_rss_bytes'] / GIB:.2f} GiB",
        flush=True,
    )
    return res


def refused_float32(model: Path, data: Path, out: Path, log: Path) -> dict[str, Any]:
    """``roma-tune run --dtype float32``: refused before loading, with one line."""
    args = [TUNE, "run", "--model", str(model), "--data", str(data), "--out", str(out)]
    args += ["--dtype", "float32", "--device", "cpu", "--no-progress"]
    start = log.stat().st_size if log.exists() else 0
    res = run_measured(args, log)
    res.pop("_peak")
    with log.open() as f:
        f.seek(start)
        lines = [x for x in f.read().splitlines()[1:] if x.strip()]
    errors = [x for x in lines if x.startswith("Error") or "Traceback" in x]
    res.update(lines=lines, error_lines=errors, available_gib=round(available_gib(), 1))
    return res

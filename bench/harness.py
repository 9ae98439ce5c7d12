"""Shared pieces of the benchmarks: timing, the measured bandwidth ceiling, and
the table that every bench_<family>.py prints and appends to bench/results/.

Speed claims are ratios within one process (the machines are noisy): each row
times tokcore and a peer on the same workload, back to back.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 5, min_runs: int = 5,
            min_seconds: float = 0.5, warmup_seconds: float = 3.0, max_warmup_seconds: float = 20.0) -> float:
    """Median seconds per call of fn in steady state (CUDA events on GPU, wall clock on CPU).

    Warm-up (skipped if warmup is 0) runs at least `warmup` calls and warmup_seconds,
    then goes on until three calls in a row are within 15% of each other, for at most
    max_warmup_seconds. On the CPU machines here (VMs) the first calls of a process
    that allocate large fresh outputs are several times slower than later ones, and
    steadily so (measured: 2 to 9 calls at 0.25 s, then 0.022 s, for a 215 MB output):
    memory that the VM gave back to its host is faulted in again until the process
    reuses its own. Counting calls alone mistook that slow phase for the steady state.
    """
    start = time.perf_counter()
    recent: list[float] = []
    for i in range(10_000):
        elapsed = time.perf_counter() - start
        steady = len(recent) >= 3 and max(recent[-3:]) <= 1.15 * min(recent[-3:])
        if warmup == 0 or elapsed > max_warmup_seconds or (
                i >= warmup and elapsed >= warmup_seconds and steady):
            break
        t0 = time.perf_counter()
        fn()
        sync(device)
        recent.append(time.perf_counter() - t0)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start_all < min_seconds and len(times) < 200):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_alternating(fn: Callable[[], object], settings: list[tuple[str, str]], runs: int) -> list[float]:
    """CPU: median seconds per call of fn under each environment setting (name,
    value), the settings taking turns call by call, so that drifts of the machine's
    memory bandwidth hit each alike. For switches that the library reads on every
    call; the environment is restored afterwards."""
    saved = {name: os.environ.get(name) for name, _ in settings}
    times: list[list[float]] = [[] for _ in settings]
    try:
        for i in range(runs + 2):  # the first two rounds warm up
            for k, (name, value) in enumerate(settings):
                os.environ[name] = value
                t0 = time.perf_counter()
                out = fn()
                elapsed = time.perf_counter() - t0
                del out
                if i >= 2:
                    times[k].append(elapsed)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return [statistics.median(t) for t in times]


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, warmup_seconds: float = 3.0) -> tuple[float, str]:
    """Measured ceiling: bytes read + written per second by the fastest large copy at
    hand, and how it was made.

    On a GPU that is torch's copy_. On a CPU, torch's copy_ reads each destination line
    into cache before writing it (46 GB/s on the 2-core VM, against 58 GB/s for a copy
    with streaming stores, measured in one process), so the ceiling is the faster of
    copy_ and a streaming-store copy: tokcore's segment_expand over one-row segments.
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device, min_runs=5, warmup_seconds=warmup_seconds)
    best, how = 2 * nbytes / seconds, "torch copy_"
    if device.type == "cpu":
        from tokcore.pooling import segment_expand

        rows = src.view(-1, 256)  # 1 KB rows: whole cache lines, streamed when >= 64 MB
        offsets = torch.arange(rows.shape[0] + 1, device=device)
        seconds = time_fn(lambda: segment_expand(rows, offsets), device, min_runs=5, warmup_seconds=warmup_seconds)
        if 2 * nbytes / seconds > best:
            best, how = 2 * nbytes / seconds, "streaming-store copy (segment_expand, one-row segments)"
    return best, how


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([c if isinstance(c, str) else f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells])

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def machine_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-").lower()
    return f"cpu-{os.cpu_count()}core-{platform.machine()}"


def write_results(tables: list[Table], device: torch.device, command: str) -> Path:
    """Appends the tables, with the command that made them, to bench/results/<machine>.md
    (or to $OUT/<machine>.md when OUT is set, as on the GPU machine)."""
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{machine_kind(device)}.md"
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    header = (f"## {stamp}: `{command}`\n\n"
              f"torch {torch.__version__}, Python {sys.version.split()[0]}, "
              f"{torch.get_num_threads()} CPU threads, tokcore CPU kernels: {_tokcore_cpu_isa()}\n\n")
    separator = "\n" if path.exists() and path.stat().st_size else ""
    with path.open("a") as f:
        f.write(separator + header + "\n".join(t.markdown() for t in tables) + "\n")
    return path


def _tokcore_cpu_isa() -> str:
    import tokcore

    return tokcore.cpu_isa()


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9

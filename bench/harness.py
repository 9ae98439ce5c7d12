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
        times.append(time_call(fn, device))
    return statistics.median(times)


# Cycles of a GPU spin queued before each timed CUDA call (about 1 ms on an H200):
# the call begins with the GPU idle (the previous one was synchronized), so without
# it the events would also time the host's work before fn's first kernel (Python,
# the autograd engine, reload_settings) while the GPU waits: tens of us (estimated,
# not yet measured on a GPU) against kernels of about 0.7 ms at the targets' size.
# With it that work overlaps the spin; a host sync inside fn
# (the offsets check) still counts, as it should.
CUDA_SPIN_CYCLES = 2_000_000


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds that one call of fn takes (CUDA events on GPU, wall clock on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(CUDA_SPIN_CYCLES)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *, rounds: int = 7,
                     warmup_seconds: float = 3.0) -> dict[str, float]:
    """Median seconds per call of each fn: each is warmed up as in time_fn, then
    timed in rounds in which every fn runs once, in turn. The memory bandwidth of
    the CPU VMs here drifts by up to 1.7x within a minute; timed one after the
    other, a fast op and its peer could fall in different periods, while here
    each ratio compares calls made seconds apart."""
    for fn in fns.values():
        time_fn(fn, device, min_runs=1, min_seconds=0.0, warmup_seconds=warmup_seconds,
                warmup=5 if warmup_seconds > 0 else 0)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_call(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


@dataclass
class CopyProbe:
    """A large copy (`how`), timed again next to each workload: calls made seconds
    apart see the same memory bandwidth, which on the CPU VMs here changes by up to
    1.7x from one minute to the next, so a share of the copy bandwidth measured once
    at the start (shares above 100% in older results) says less than this one."""
    how: str
    nbytes: int  # bytes read + written by one call
    call: Callable[[], object]


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30,
                   warmup_seconds: float = 3.0) -> tuple[float, CopyProbe]:
    """Measured ceiling: bytes read + written per second by the fastest copy of
    nbytes at hand, and that copy, to time again next to each workload.

    On a GPU that is torch's copy_. On a CPU, torch's copy_ reads each destination line
    into cache before writing it (46 GB/s on the 2-core VM, against 58 GB/s for a copy
    with streaming stores, measured in one process), so the ceiling is the faster of
    copy_ and a streaming-store copy: tokcore's segment_expand over one-row segments.
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    probe = CopyProbe("torch copy_", 2 * nbytes, lambda: dst.copy_(src))
    best = probe.nbytes / time_fn(probe.call, device, min_runs=5, warmup_seconds=warmup_seconds)
    if device.type == "cpu":
        from tokcore.pooling import segment_expand

        rows = src.view(-1, 256)  # 1 KB rows: whole cache lines, streamed when >= 64 MB
        offsets = torch.arange(rows.shape[0] + 1, device=device)
        streamed = CopyProbe("streaming-store copy (segment_expand, one-row segments)", 2 * nbytes,
                             lambda: segment_expand(rows, offsets))
        rate = streamed.nbytes / time_fn(streamed.call, device, min_runs=5, warmup_seconds=warmup_seconds)
        if rate > best:
            best, probe = rate, streamed
    return best, probe


def read_bandwidth_cpu(nbytes: int = 1 << 30, warmup_seconds: float = 3.0) -> float:
    """Bytes per second that the CPU reads from memory with every thread: a lower
    bound on any op's time is the bytes it must read over this. torch's own sum
    reads at well below it here (x.sum(0): 34.6 ms against 13.8 ms for 1 GB), so it
    is tokcore's segment_reduce over one segment per thread, whose output is tiny."""
    from tokcore.pooling import segment_reduce

    threads = torch.get_num_threads()
    rows = torch.ones(nbytes // 4, dtype=torch.float32).view(-1, 256)
    offsets = torch.linspace(0, rows.shape[0], threads + 1).round().to(torch.int64)
    seconds = time_fn(lambda: segment_reduce(rows, offsets, "sum"), torch.device("cpu"), min_runs=5,
                      warmup_seconds=warmup_seconds)
    return nbytes / seconds


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

"""The benchmark suite must keep running: CI runs each benchmark at tiny sizes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(autouse=True)
def _bench_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))


def test_bench_pooling_quick_run(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))  # never touch bench/results from a test
    import bench_pooling

    assert bench_pooling.main(["--quick", "--no-save"]) == 0
    out = capsys.readouterr().out
    for workload in ("segment_reduce mean fwd float32", "segment_reduce mean bwd bfloat16",
                     "segment_expand fwd", "word_boundaries"):
        assert workload in out
    assert "torch.segment_reduce" in out and "index_reduce_" in out and "scatter_reduce_ into a reused buffer" in out
    assert "TOKCORE_CPU_STREAM_MIN_MB=1000000" in out and "segment_unpack fwd" in out  # the CPU streaming table
    assert "HierarchicalByteLM.generate (tiny" in out and "ByteLM.generate (tiny" in out  # the generation table


def test_bench_pooling_only_runs_the_named_steps(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    import bench_pooling

    assert bench_pooling.main(["--quick", "--no-save", "--only", "generation"]) == 0
    out = capsys.readouterr().out
    assert "ByteLM.generate (tiny" in out and "segment_reduce" not in out and "### pooling on" not in out
    with pytest.raises(SystemExit) as e:
        bench_pooling.main(["--quick", "--no-save", "--only", "nosuch"])
    assert e.value.code == 2 and "--only nosuch: no step's name holds it" in capsys.readouterr().err


def test_bench_pooling_prints_what_it_measured_when_stopped(capsys, monkeypatch, tmp_path):
    # The GPU check's `timeout` stops a benchmark with SIGTERM: the rows of the steps
    # done are still printed as tables (and saved, outside --quick), marked as cut short.
    monkeypatch.setenv("OUT", str(tmp_path))
    import bench_pooling

    def stopped_here(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # (the signal arrives at once; the handler raises)
        raise AssertionError("SIGTERM did not stop the benchmark")

    monkeypatch.setattr(bench_pooling, "bench_word_boundaries", stopped_here)
    before = signal.getsignal(signal.SIGTERM)
    assert bench_pooling.main(["--quick", "--no-save", "--only", "segment ops float32",
                               "--only", "word_boundaries"]) == 0
    captured = capsys.readouterr()
    assert "STOPPED EARLY (SIGTERM) during step 'word_boundaries'" in captured.out
    assert "| segment_reduce mean fwd float32 |" in captured.out  # the step before, in the table
    assert "stopped (SIGTERM)" in captured.err
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


def test_harness_writes_results_with_command(monkeypatch, tmp_path):
    import torch

    import harness

    monkeypatch.setenv("OUT", str(tmp_path))
    table = harness.Table("t", ["a", "b"])
    table.add("x", 1.5)
    path = harness.write_results([table], torch.device("cpu"), "python bench/x.py")
    text = path.read_text()
    assert "`python bench/x.py`" in text and "| x | 1.5 |" in text


def test_cli_bench_runs_from_a_checkout(capsys):
    from tokcore import cli

    repo = str(BENCH_DIR.parent)
    assert cli.main(["bench", "--family", "pooling", "--quick", "--no-save", "--repo", repo]) == 0
    assert "segment_reduce mean fwd" in capsys.readouterr().out
    assert cli.main(["bench", "--family", "nosuch", "--quick", "--repo", repo]) == 2


def test_gpu_target_notes_judge_each_workload():
    import bench_pooling
    import harness

    table = harness.Table("t", ["workload", "peer", "a", "b", "c", "d", "copy GB/s", bench_pooling.SHARE_COLUMN])
    table.add("segment_reduce mean fwd bfloat16", "torch.segment_reduce", 1.0, 2.0, 2.0, 3.0, 4.0, "86%")
    table.add("segment_reduce mean bwd bfloat16", "torch.segment_reduce", 1.0, 2.0, 2.0, 3.0, 4.0, "79%")
    # a workload the targets do not name, though its name starts alike
    table.add("segment_reduce mean fwd, 8 segments bfloat16", "torch.segment_reduce", 1.0, 2.0, 2.0, 3.0, 4.0,
              "20%")
    notes = bench_pooling.target_notes(table, bench_pooling.GPU_TARGETS)
    assert notes[0].endswith("86% met")
    assert notes[1].endswith("79% NOT MET")
    assert notes[2].endswith("NOT MEASURED")  # segment_expand has no row here


def test_peers_whose_results_differ_are_marked():
    # a ratio against a peer that computes something else says little: each peer's
    # result is compared with tokcore's before timing, and marked where it differs
    import torch

    import bench_pooling
    from tokcore.pooling import segment_reduce

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 15, 4, generator=g)
    offsets = torch.tensor([0, 1 << 14, 1 << 15])
    peers = {"torch.segment_reduce": lambda: torch.segment_reduce(x.bfloat16(), "mean", lengths=offsets.diff()),
             "same": lambda: segment_reduce(x.bfloat16(), offsets, "mean"),
             "f32 mean": lambda: x.view(2, -1, 4).mean(1).bfloat16()}
    labels = bench_pooling.checked_peers(lambda: segment_reduce(x.bfloat16(), offsets, "mean"), peers,
                                         torch.bfloat16)
    assert "RESULT DIFFERS" in labels["torch.segment_reduce"]  # torch sums bf16 in bf16
    assert labels["same"] == "same" and labels["f32 mean"] == "f32 mean"
    # max backward: tied maxima get the gradient split by torch, all of it at the first by tokcore
    x = torch.tensor([[1.0], [1.0], [0.5], [2.0]], requires_grad=True)
    offsets = torch.tensor([0, 3, 4])
    grad = torch.ones(2, 1)
    tok = lambda: torch.autograd.grad(segment_reduce(x, offsets, "max"), x, grad)  # noqa: E731
    peer = {"torch": lambda: torch.autograd.grad(
        torch.segment_reduce(x, "max", lengths=offsets.diff()), x, grad)}
    assert "RESULT DIFFERS" in bench_pooling.checked_peers(tok, peer, torch.float32)["torch"]
    assert bench_pooling.checked_peers(tok, peer, torch.float32, bench_pooling.untied(x, offsets))["torch"] == "torch"


def test_a_peer_with_nan_past_the_first_chunk_differs(monkeypatch):
    # results are compared chunk by chunk; Python's max() keeps a NaN only when it comes first
    import torch

    import bench_pooling

    chunks = bench_pooling._chunks
    monkeypatch.setattr(bench_pooling, "_chunks", lambda t: chunks(t, 4))
    expected = torch.ones(12)
    got = expected.clone()
    got[-1] = float("nan")
    assert bench_pooling.difference(expected, got, torch.float32) is not None
    assert bench_pooling.difference(expected, expected.clone(), torch.float32) is None


def test_cuda_timing_queues_a_spin_before_its_start_event(monkeypatch):
    # without work queued ahead, CUDA events time the host's Python before the first kernel
    import torch

    import harness

    calls = []

    class Event:
        def __init__(self, enable_timing):
            pass

        def record(self):
            calls.append("record")

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 1.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: calls.append("spin"))
    assert harness.time_call(lambda: calls.append("fn"), torch.device("cuda")) == 1e-3
    assert calls == ["spin", "record", "fn", "record"]


def test_gpu_check_parses_and_names_an_unknown_stage(tmp_path):
    # the GPU check runs only where a GPU is lent, rarely: CI at least parses it and
    # sees it refuse a stage list it cannot run, before it does any work
    script = BENCH_DIR / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = dict(os.environ, GPU_CHECK_STAGES="tests bogus", OUT=str(tmp_path))
    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "unknown stage 'bogus' (choose from: tests bench variants memcheck)" in run.stderr
    assert list(tmp_path.iterdir()) == []  # nothing was installed or run
    for name, value, unit in (("GPU_CHECK_WORKERS", "4x", "pytest workers"), ("GPU_CHECK_BUDGET", "7m", "seconds")):
        env = dict(os.environ, GPU_CHECK_STAGES="tests", OUT=str(tmp_path), **{name: value})
        run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 2
        assert f"{name} must be a whole number ({unit}), got '{value}'" in run.stderr
        assert list(tmp_path.iterdir()) == []

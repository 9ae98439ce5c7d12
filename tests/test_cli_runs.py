"""Run folders and checkpoints at the command line: a new run does not replace an
earlier one unless asked (--overwrite), a damaged or mismatched checkpoint or a path
that is not a regular file is one `tokcore CMD: error:` line with exit status 2, and
the help texts say what each command does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
import zipfile
from pathlib import Path

import pytest
import torch

from test_cli_args import TEXT, TINY, assert_usage_error, run_cli  # (tests/ is on sys.path, as for reference/)
from test_models import TINY_HIER
from tokcore import cli
from tokcore.errors import UsageError
from tokcore.pooling.lm import ByteLM, ByteLMConfig, HierarchicalByteLM, HierConfig
from tokcore.pooling.train import TrainConfig, load_checkpoint, load_model, save_checkpoint, train

TINY_CPU = TINY + ["--no-progress", "--device", "cpu"]  # quiet, and on the CPU whatever the machine has


@pytest.fixture
def data(tmp_path):
    f = tmp_path / "text.py"
    f.write_bytes(TEXT)
    return f


def train_argv(data, *extra):
    return ["train", "--data", data, *TINY_CPU, *extra]


def steps_in(run) -> int:
    return load_checkpoint(run)["state"]["counters"]["step"]


# ------------------------------------------------------------------------------ --out and --overwrite
def test_train_does_not_replace_a_run_without_resume_or_overwrite(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(train_argv(data, "--out", run, "--steps", "2"), capsys)[0] == 0
    # forgot --resume: refused before training, the run is as it was
    err = assert_usage_error(train_argv(data, "--out", run, "--steps", "1"), capsys,
                             "argument --out", str(run), "checkpoint.pt", "--resume", "--overwrite")
    assert steps_in(run) == 2
    assert_usage_error(train_argv(data, "--out", run, "--steps", "1", "--resume", "--overwrite"), capsys,
                       "--overwrite", "--resume")
    # --resume continues it, --overwrite starts over
    assert run_cli(train_argv(data, "--out", run, "--steps", "3", "--resume"), capsys)[0] == 0
    assert steps_in(run) == 3
    assert run_cli(train_argv(data, "--out", run, "--steps", "1", "--overwrite"), capsys)[0] == 0
    assert steps_in(run) == 1
    # a folder without a checkpoint is a new run's
    (tmp_path / "other").mkdir()
    assert run_cli(train_argv(data, "--out", tmp_path / "other", "--steps", "1"), capsys)[0] == 0


def test_resume_without_out_warns_that_nothing_is_saved(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(train_argv(data, "--out", run, "--steps", "1"), capsys)[0] == 0
    rc, out, err = run_cli(["train", "--data", data, "--steps", "2", "--no-progress", "--device", "cpu",
                            "--seq-len", "32", "--batch-size", "2", "--eval-windows", "2", "--resume", run], capsys)
    assert rc == 0 and "Traceback" not in err
    assert "tokcore train: warning: --resume without --out" in err and "not saved" in err
    assert steps_in(run) == 1  # as the warning says


def test_compare_does_not_replace_earlier_results(data, tmp_path, capsys):
    base = ["compare", "--data", data, *TINY_CPU, "--steps", "1"]
    # an earlier compare's table, or a model run of one that stopped early: refused before training
    for name in ("compare.json", "hier/checkpoint.pt", "byte/checkpoint.pt"):
        out = tmp_path / name.replace("/", "_")
        (out / name).parent.mkdir(parents=True)
        (out / name).write_text("earlier\n")
        assert_usage_error(base + ["--out", out], capsys, "argument --out", str(out), "--overwrite")
        assert (out / name).read_text() == "earlier\n"
    out = tmp_path / "cmp"
    rc, stdout, err = run_cli(base + ["--out", out], capsys)
    assert rc == 0, err
    # the table's header names the budget that was given, and only that one
    header = (out / "compare.md").read_text().splitlines()[0]
    assert "budget 1 step per model" in header and "-s budget" not in header and "s budget" not in header
    assert_usage_error(base + ["--out", out], capsys, "--overwrite")
    rc, stdout, err = run_cli(base + ["--out", out, "--overwrite", "--steps", "2"], capsys)
    assert rc == 0, err
    assert load_checkpoint(out / "hier")["state"]["counters"]["step"] == 2


def test_demo_saves_no_run(monkeypatch):
    # `make demo` may run it twice in a row: it must not write a run folder that a
    # second run would refuse to replace
    import tokcore.data
    import tokcore.pooling.train as train_module
    from tokcore.demo import DemoOptions, demo_pooling

    seen = []

    def fake_train(cfg, *args, **kwargs):
        seen.append(cfg)
        raise KeyboardInterrupt  # stop before any training

    monkeypatch.setattr(train_module, "train", fake_train)
    monkeypatch.setattr(tokcore.data, "load_corpus", lambda *a, **k: types.SimpleNamespace(describe=lambda: "-"))
    with pytest.raises(KeyboardInterrupt):
        demo_pooling(DemoOptions(device="cpu", seconds=1, progress=False))
    assert len(seen) == 1 and seen[0].out is None


# ------------------------------------------------------------------------------ checkpoints
def _tiny_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(path, HierarchicalByteLM(HierConfig(**TINY_HIER)), None, {"counters": {}})


def test_damaged_checkpoints_are_refused(data, tmp_path, capsys):
    good = _tiny_checkpoint(tmp_path / "good.pt")
    raw = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:  # the largest tensor's bytes: a weight matrix
        member = max(z.infolist(), key=lambda i: i.file_size)
        payload = z.read(member)
    at = raw.find(payload)
    assert at > 0
    for i in range(at + 100, at + 140):
        raw[i] ^= 0xFF
    bad = tmp_path / "bad.pt"
    bad.write_bytes(raw)
    # torch.load does not check CRCs: this used to load, with wrong weights
    with pytest.raises(UsageError, match=f"damaged.*{member.filename}"):
        load_checkpoint(bad)
    assert_usage_error(["generate", bad, "--device", "cpu"], capsys, str(bad), "damaged", member.filename)
    assert_usage_error(train_argv(data, "--resume", bad, "--steps", "1"), capsys, str(bad), "damaged")
    load_model(good)  # the undamaged file loads


def _variant(path: Path, edit) -> Path:
    ckpt = torch.load(_tiny_checkpoint(path), weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("name, edit", [
    ("width", lambda c: c["model_config"].update(d_model=64)),           # size mismatch
    ("keys", lambda c: c.update(model={})),                               # missing keys
    ("config", lambda c: c["model_config"].update(nonsense=1)),           # unknown config key
    ("kind", lambda c: c.update(kind="byte")),                            # a hier model said to be a byte LM
    ("badkind", lambda c: c.update(kind="zzz")),
    ("heads", lambda c: c["model_config"].update(n_heads=0)),             # a config no model can have
])
def test_checkpoints_that_do_not_match_their_model(data, tmp_path, capsys, name, edit):
    path = _variant(tmp_path / f"{name}.pt", edit)
    with pytest.raises(UsageError, match="checkpoint does not match its model"):
        load_model(path)
    assert_usage_error(["generate", path, "--device", "cpu"], capsys, str(path), "checkpoint does not match its model")
    if name not in ("kind", "badkind"):  # (train says that the kind is not the one asked for)
        err = assert_usage_error(train_argv(data, "--resume", path, "--steps", "1"), capsys, str(path),
                                 "checkpoint does not match its model")
        assert len(err.splitlines()[-1]) < 600  # the reason, not every key of the state dict


def test_optimizer_state_that_does_not_fit_is_refused(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(train_argv(data, "--out", run, "--steps", "1"), capsys)[0] == 0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["optimizer"]["param_groups"] = ckpt["optimizer"]["param_groups"][:1]
    torch.save(ckpt, run / "checkpoint.pt")
    assert_usage_error(train_argv(data, "--out", run, "--steps", "2", "--resume"), capsys,
                       "checkpoint.pt", "training state")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_not_a_checkpoint(tmp_path):
    # opening a FIFO blocks until someone writes to it: a subprocess, so that a hang fails the test
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for argv in (["generate", str(fifo), "--device", "cpu"], ["train", "--resume", str(fifo), "--steps", "1"]):
        try:
            r = subprocess.run([sys.executable, "-m", "tokcore.cli", *argv], capture_output=True, text=True,
                               timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"tokcore {argv[0]} hangs on a FIFO")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"tokcore {argv[0]}: error: " in r.stderr and "not a regular file" in r.stderr


# ------------------------------------------------------------------------------ help and bench
def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_help_texts_fit_their_command(capsys):
    compare_help = _help("compare", capsys)
    assert "--resume" not in compare_help  # compare has none
    assert "compare.svg" in compare_help and "--overwrite" in compare_help
    assert "a single --data file holds out its last 1/N" in compare_help
    train_help = _help("train", capsys)
    assert "with --resume: in total, across resumes" in train_help and "--overwrite" in train_help
    assert "a single --data file holds out its last 1/N" in train_help


def test_bench_errors_are_usage_errors(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nonexistent"
    err = assert_usage_error(["bench", "--repo", missing], capsys, f"--repo {missing}")
    assert "pass --repo" not in err  # it was passed
    monkeypatch.chdir(tmp_path)  # no checkout here or above
    if not any((p / "bench" / "harness.py").is_file() for p in [tmp_path, *tmp_path.parents]):
        assert_usage_error(["bench"], capsys, "no bench/ folder", "pass --repo")
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    (repo / "bench" / "harness.py").write_text("")
    assert_usage_error(["bench", "--repo", repo, "--family", "nosuch"], capsys, "nosuch")


# ------------------------------------------------------------------------------ resuming
def test_resuming_another_run_does_not_replace_out(data, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(train_argv(data, "--out", a, "--steps", "3"), capsys)[0] == 0
    assert run_cli(train_argv(data, "--out", b, "--steps", "1", "--seed", "2"), capsys)[0] == 0
    assert_usage_error(train_argv(data, "--out", a, "--resume", b, "--steps", "2"), capsys,
                       "argument --out", str(a), "a run of its own", "another --out")
    assert steps_in(a) == 3
    with pytest.raises(UsageError, match="resuming .* there would replace it"):
        train(TrainConfig(data=str(data), out=str(a), steps=2, seq_len=32, batch_size=2, device="cpu"),
              resume=str(b), log=lambda s: None)
    assert steps_in(a) == 3
    # out's own checkpoint, named by path, or an empty folder: resumed there
    assert run_cli(train_argv(data, "--out", a, "--resume", a / "checkpoint.pt", "--steps", "4"), capsys)[0] == 0
    assert steps_in(a) == 4
    assert run_cli(train_argv(data, "--out", tmp_path / "c", "--resume", b, "--steps", "2"), capsys)[0] == 0
    assert steps_in(tmp_path / "c") == 2 and steps_in(b) == 1


def test_a_resumed_run_keeps_its_training_settings_and_budget(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(train_argv(data, "--out", run, "--steps", "2", "--lr", "0.001"), capsys)[0] == 0
    # other settings given: named, and not used (the report tells what the run ran with)
    rc, out, err = run_cli(["train", "--data", data, "--out", run, "--resume", "--steps", "3", "--seq-len", "16",
                            "--seed", "5", "--no-progress", "--device", "cpu", "--eval-windows", "2"], capsys)
    assert rc == 0, err
    assert "keeps its training settings: lr=0.001 (not 0.002)" not in out  # --lr not given here: not named
    assert "seq_len=32 (not 16)" in out and "seed=0 (not 5)" in out
    assert "(32 bytes)" in out  # the report's window
    saved = load_checkpoint(run)["train_config"]
    assert (saved["seq_len"], saved["seed"], saved["lr"], saved["batch_size"]) == (32, 0, 0.001, 2)
    assert steps_in(run) == 3
    # no budget given: the run's own (3 steps, done), not the 300 s default
    rc, out, err = run_cli(["train", "--data", data, "--out", run, "--resume", "--no-progress", "--device", "cpu"],
                           capsys)
    assert rc == 0, err
    assert "keeps its own: steps=3" in out and "planned" not in out
    assert "the run already has 3 steps (steps=3): nothing more to train" in out
    assert steps_in(run) == 3


def test_a_run_resumes_from_any_folder_and_its_corpus_can_move(tmp_path, capsys, monkeypatch):
    # the corpus is saved by absolute path: a run started with a relative --data resumes
    # from another folder; a corpus moved since is refused unless --data gives its place
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir(), elsewhere.mkdir()
    (start / "corpus.py").write_bytes(TEXT)
    run = tmp_path / "run"
    monkeypatch.chdir(start)
    assert run_cli(["train", "--data", "corpus.py", *TINY_CPU, "--out", run, "--steps", "1"], capsys)[0] == 0
    assert load_checkpoint(run)["train_config"]["data"] == str(start / "corpus.py")
    monkeypatch.chdir(elsewhere)
    rc, out, err = run_cli(["train", "--out", run, "--resume", "--steps", "2", "--no-progress", "--device", "cpu"],
                           capsys)
    assert rc == 0, err
    assert steps_in(run) == 2 and "keeps its training settings" not in out
    (start / "corpus.py").rename(elsewhere / "moved.py")
    assert_usage_error(["train", "--out", run, "--resume", "--steps", "3", "--no-progress", "--device", "cpu"],
                       capsys, f"the run's corpus {start / 'corpus.py'} is not there any more", "--data")
    rc, out, err = run_cli(["train", "--data", "moved.py", "--out", run, "--resume", "--steps", "3", "--no-progress",
                            "--device", "cpu"], capsys)
    assert rc == 0, err
    assert f"using {elsewhere / 'moved.py'} in its place" in out
    assert steps_in(run) == 3 and load_checkpoint(run)["train_config"]["data"] == str(elsewhere / "moved.py")


def test_the_final_evaluation_batch_is_no_larger_than_the_training_batch(data, tmp_path, capsys, monkeypatch):
    # a batch lowered to fit memory must not run out of it in the held-out evaluation
    from tokcore.pooling import train as train_module

    batches = []
    real = train_module.evaluate

    def recording(model, windows, batch_size, device):
        batches.append(batch_size)
        return real(model, windows, batch_size, device)

    monkeypatch.setattr(train_module, "evaluate", recording)
    assert run_cli(train_argv(data, "--steps", "1", "--batch-size", "1"), capsys)[0] == 0
    assert batches == [1]


def test_resume_takes_the_model_kind_from_the_checkpoint(data, tmp_path, capsys):
    run = tmp_path / "byte"
    assert run_cli(train_argv(data, "--model", "byte", "--out", run, "--steps", "1"), capsys)[0] == 0
    assert_usage_error(train_argv(data, "--model", "hier", "--out", run, "--resume", "--steps", "2"), capsys,
                       "argument --model", "'byte' model", "--model byte")
    rc, out, err = run_cli(train_argv(data, "--out", run, "--resume", "--steps", "2"), capsys)
    assert rc == 0, err
    assert "model                 byte" in out and steps_in(run) == 2


def test_cli_defaults_are_the_train_configs():
    # a resumed run names the settings given otherwise than TrainConfig's defaults:
    # the command line's defaults must be those, or every resume would name them
    from tokcore.pooling.train import RUN_SETTINGS

    args = cli.build_parser().parse_args(["train"])
    names = {"data_pattern": "pattern", "warmup_steps": "warmup"}
    for key in RUN_SETTINGS:
        if hasattr(args, names.get(key, key)):
            assert getattr(args, names.get(key, key)) == getattr(TrainConfig(), key), key


def test_held_interrupts_hold_sigterm_and_sighup_too():
    # what a job scheduler, `timeout` or a closed terminal sends: held like Ctrl-C, and
    # a second one stops at once (train.Stopped, a KeyboardInterrupt naming the signal)
    from tokcore.pooling.train import Stopped, _HeldInterrupts

    for signum in (signal.SIGTERM, signal.SIGHUP):
        outside = signal.signal(signum, signal.SIG_DFL)
        try:
            with _HeldInterrupts() as held:
                os.kill(os.getpid(), signum)
                assert held.pending == signum
                with pytest.raises(Stopped) as e:
                    os.kill(os.getpid(), signum)
                assert e.value.signum == signum and isinstance(e.value, KeyboardInterrupt)
            assert signal.getsignal(signum) == signal.SIG_DFL
            signal.signal(signum, signal.SIG_IGN)  # nohup's: left alone
            with _HeldInterrupts():
                assert signal.getsignal(signum) == signal.SIG_IGN
        finally:
            signal.signal(signum, outside)


def test_held_interrupts_wait_for_the_step():
    from tokcore.pooling.train import _HeldInterrupts

    # Python's own handler, as in a terminal (a process started in the background, as CI
    # may be, inherits SIGINT ignored, and _HeldInterrupts then leaves it so)
    outside = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with _HeldInterrupts() as held:
            os.kill(os.getpid(), signal.SIGINT)  # during a step: held
            assert held.pending
            with pytest.raises(KeyboardInterrupt):  # a second one: at once
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with _HeldInterrupts():  # ignored stays ignored
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outside)


def _default_stop_signals():
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_saves_the_steps_done(data, tmp_path, signum):
    run = tmp_path / "run"
    argv = [sys.executable, "-u", "-m", "tokcore", *(str(a) for a in train_argv(data, "--out", run))]
    # SIGINT and SIGTERM at their defaults in the child, whatever this process inherited (a
    # process started in the background, as CI may be, has SIGINT ignored, and so would the child)
    proc = subprocess.Popen(argv + ["--steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"),
                            preexec_fn=_default_stop_signals)
    try:
        for line in proc.stdout:  # training starts after this line
            if line.startswith("model hier"):
                break
        time.sleep(1.5)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # (a no-op once it has ended)
        proc.wait()
    assert proc.returncode == 128 + signum, err  # as a shell reports a command the signal stopped
    assert err.strip().endswith("interrupted" if signum == signal.SIGINT else "stopped (SIGTERM)"), err
    assert "Traceback" not in err and "interrupted at step" in out and "saved in" in out
    done = steps_in(run)
    assert done >= 1
    assert subprocess.run(argv + ["--resume", "--steps", str(done + 2)], capture_output=True,
                          timeout=120).returncode == 0
    assert steps_in(run) == done + 2


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
def test_a_checkpoint_that_cannot_be_written_is_one_message(data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt.tmp").symlink_to("/dev/full")  # writes there fail: no space left on device
    rc, out, err = run_cli(train_argv(data, "--out", run, "--steps", "1"), capsys)
    assert rc == 1 and "Traceback" not in err
    assert f"tokcore train: error: cannot write checkpoint {run / 'checkpoint.pt'}: No space left on device" in err
    assert "held-out bits/byte" in out  # the run's result is still shown
    assert not (run / "checkpoint.pt.tmp").exists() and not (run / "checkpoint.pt").exists()


def test_truncated_and_unreadable_checkpoints_say_so(tmp_path):
    good = _tiny_checkpoint(tmp_path / "good.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UsageError, match="damaged \\(truncated"):
        load_checkpoint(cut)
    if os.geteuid() != 0:  # (root reads any file)
        good.chmod(0)
        with pytest.raises(UsageError, match="cannot read .*Permission denied"):
            load_checkpoint(good)


def test_a_refused_run_leaves_no_empty_out_folder(data, tmp_path, capsys):
    # --out is checked (it could be made) but made only when the run starts: a command
    # refused after the check used to leave the new folder, and its parents, behind
    out = tmp_path / "new" / "run"
    assert_usage_error(train_argv(data, "--out", out, "--steps", "1", "--seq-len", "100000"), capsys,
                       "fewer than seq_len=100000")
    assert not (tmp_path / "new").exists()
    assert run_cli(train_argv(data, "--out", out, "--steps", "1"), capsys)[0] == 0
    assert steps_in(out) == 1


def test_empty_paths_and_stray_files_are_usage_errors(data, tmp_path, capsys):
    assert_usage_error(train_argv(data, "--out", "", "--steps", "1"), capsys, "argument --out", "an empty path")
    assert_usage_error(["train", "--data", "", *TINY_CPU, "--steps", "1"], capsys, "argument --data", "empty path")
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "byte").write_text("not a folder\n")
    assert_usage_error(["compare", "--data", data, *TINY_CPU, "--steps", "1", "--out", out], capsys,
                       str(out / "byte"), "not a folder")


def test_compare_counts_both_models_words_alike(data, tmp_path, capsys):
    # the byte model's words are counted with the hierarchical model's max_word_bytes;
    # both draw the same batches (same seed), so they count the same words
    rc, out, err = run_cli(["compare", "--data", data, *TINY_CPU, "--steps", "2", "--max-word-bytes", "4",
                            "--out", tmp_path / "cmp"], capsys)
    assert rc == 0, err
    hier, byte = json.loads((tmp_path / "cmp" / "compare.json").read_text())["reports"]
    assert hier["train_bytes"] == byte["train_bytes"]
    assert hier["bytes_per_word"] == pytest.approx(byte["bytes_per_word"]) and hier["bytes_per_word"] < 4


def test_cpu_allocation_failures_are_out_of_memory():
    e = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                     "you tried to allocate 1099511627776 bytes.")
    assert cli._is_out_of_memory(e)
    assert not cli._is_out_of_memory(RuntimeError("shape mismatch"))


def test_a_closed_pipe_ends_quietly():
    # `tokcore info | head -1`: the reader is gone before tokcore writes
    proc = subprocess.Popen([sys.executable, "-m", "tokcore", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == ""


def test_each_named_demo_runs_once(monkeypatch, capsys):
    import tokcore.demo as demo

    calls = []
    monkeypatch.setattr(demo, "DEMOS", [demo.Demo("x", "a demo", lambda opts: calls.append(1))])
    demo.run_demos(["x", "x"])
    assert calls == [1]

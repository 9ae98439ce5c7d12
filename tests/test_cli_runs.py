"""Run folders and checkpoints at the command line: a new run does not replace an
earlier one unless asked (--overwrite), a damaged or mismatched checkpoint or a path
that is not a regular file is one `tokcore CMD: error:` line with exit status 2, and
the help texts say what each command does."""

from __future__ import annotations

import os
import subprocess
import sys
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
from tokcore.pooling.train import load_checkpoint, load_model, save_checkpoint

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

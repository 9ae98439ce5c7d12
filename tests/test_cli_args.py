"""The command line rejects bad option values with one argparse-style line,
``tokcore <command>: error: ...`` and exit status 2, never a traceback, and warns about
options it ignores. Every error case here fails before any training starts."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tokcore import cli
from tokcore.errors import UsageError
from tokcore.pooling.lm import ByteLM, ByteLMConfig
from tokcore.pooling.train import load_checkpoint, save_checkpoint

TEXT = b"def f(x):\n    return x + 1  # a comment with words in it\n" * 40

# a tiny hierarchical model, so that the few runs that do train take a second
TINY = ["--size", "tiny", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--d-local", "16",
        "--seq-len", "32", "--batch-size", "2", "--eval-windows", "2"]


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of the CLI run in this process; parser.error exits
    with SystemExit(2), errors found while running return 2."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_usage_error(argv, capsys, *needles):
    rc, out, err = run_cli(argv, capsys)
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err
    assert f"tokcore {argv[0]}: error: " in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def files(tmp_path):
    d = {
        "text": tmp_path / "text.py",
        "bin": tmp_path / "bin.dat",
        "empty": tmp_path / "empty.txt",
        "tensor": tmp_path / "tensor.pt",
        "zip": tmp_path / "other.zip",
        "existing": tmp_path / "existing_file",
    }
    d["text"].write_bytes(TEXT)
    d["bin"].write_bytes(bytes(range(256)) * 4)
    d["empty"].write_bytes(b"")
    torch.save(torch.zeros(3), d["tensor"])
    with zipfile.ZipFile(d["zip"], "w") as z:
        z.writestr("a.txt", "not a checkpoint")
    d["existing"].write_text("hi\n")
    d["tmp"] = tmp_path
    return d


def train_argv(files, *extra):
    return ["train", "--data", files["text"], "--steps", "1", "--no-progress", "--device", "cpu", *TINY, *extra]


@pytest.mark.parametrize("extra, option", [
    (["--max-word-bytes", "3"], "--max-word-bytes"),
    (["--max-word-bytes", "-1"], "--max-word-bytes"),
    (["--max-word-bytes", "257"], "--max-word-bytes"),  # memory grows with it: bounded
    (["--device", "cpu:1"], "--device"),                 # torch has one CPU device
    (["--d-model", "7", "--n-heads", "3"], "--n-heads"),
    (["--d-model", "6", "--n-heads", "2"], "--n-heads"),   # 3 per head: rotary needs even
    (["--d-local", "30"], "--d-local"),                    # tiny preset: 2 byte-level heads -> 15, odd
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "-1"], "--lr"),
    (["--time-budget", "nan"], "--time-budget"),
    (["--time-budget", "inf"], "--time-budget"),
    (["--save-every", "nan"], "--save-every"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:99"], "--device"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--grad-clip", "nan"], "--grad-clip"),
    (["--min-lr-ratio", "-1"], "--min-lr-ratio"),
    (["--min-lr-ratio", "1.5"], "--min-lr-ratio"),
    (["--warmup", "-5"], "--warmup"),
    (["--n-enc-layers", "-1"], "--n-enc-layers"),
    (["--n-dec-layers", "-1"], "--n-dec-layers"),
    (["--sample", "-5"], "--sample"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--seed", "-1"], "--seed"),
    (["--holdout-every", "1"], "--holdout-every"),
    (["--size", "huge"], "--size"),
    (["--steps", "abc"], "--steps"),
    (["--resume"], "--resume"),                           # no path and no --out
    (["--precision", "fp16"], "--precision"),
    # past anything a run could use: were an overflow deep inside, or modules built until killed
    (["--threads", str(10**20)], "--threads"),
    (["--n-layers", "100000"], "--n-layers"),
    (["--d-model", str(10**20)], "--d-model"),
    (["--n-enc-layers", "5000"], "--n-enc-layers"),
    (["--steps", str(10**400)], "--steps"),
    (["--time-budget", "1e308"], "--time-budget"),
])
def test_train_rejects_bad_values(files, capsys, extra, option):
    assert_usage_error(train_argv(files, *extra), capsys, f"argument {option}" if option != "--n-heads"
                       else "--n-heads")


def test_train_rejects_bad_files(files, capsys):
    for key in ("bin", "empty"):
        assert_usage_error(train_argv(files, "--data", files[key]), capsys, "argument --data", str(files[key]))
    assert_usage_error(train_argv(files, "--out", files["existing"]), capsys, "argument --out", "not a folder")
    for key in ("text", "bin", "empty"):  # not a zip: caught before the corpus is read
        assert_usage_error(train_argv(files, "--resume", files[key]), capsys, "argument --resume",
                           "not a tokcore checkpoint")
    for key in ("zip", "tensor"):  # a zip, but not a checkpoint: caught when it is loaded
        assert_usage_error(train_argv(files, "--resume", files[key]), capsys, "not a tokcore checkpoint")
    assert_usage_error(train_argv(files, "--out", files["tmp"] / "run", "--resume"), capsys,
                       "argument --resume", "no checkpoint at")


def test_compare_rejects_unwritable_out(files, capsys):
    base = ["compare", "--data", files["text"], "--steps", "1", "--no-progress", "--device", "cpu", *TINY]
    assert_usage_error(base + ["--out", files["existing"] / "sub"], capsys, "argument --out")
    if Path("/proc").is_dir() and sys.platform.startswith("linux"):
        assert_usage_error(base + ["--out", "/proc/nope"], capsys, "argument --out", "/proc/nope")
    assert_usage_error(base + ["--out", files["tmp"] / "c", "--lr", "nan"], capsys, "argument --lr")
    assert_usage_error(base + ["--out", files["tmp"] / "c", "--d-local", "30"], capsys, "argument --d-local")


@pytest.mark.parametrize("extra, option", [
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-k", "0"], "--top-k"),
    (["--top-k", "-3"], "--top-k"),
    (["--device", "tpu"], "--device"),
    (["-n", "0"], "-n/--max-new-bytes"),
    (["--device", "cpu:1"], "--device"),
])
def test_generate_rejects_bad_values(files, capsys, extra, option):
    assert_usage_error(["generate", files["text"], *extra], capsys, f"argument {option}")


def test_generate_rejects_non_checkpoints(files, capsys):
    for key in ("text", "bin", "empty", "zip", "tensor"):
        assert_usage_error(["generate", files[key], "--device", "cpu"], capsys, str(files[key]),
                           "not a tokcore checkpoint")


def test_demo_and_bench_reject_bad_values(capsys):
    assert_usage_error(["demo", "--device", "tpu"], capsys, "argument --device")
    assert_usage_error(["demo", "--seconds", "nan"], capsys, "argument --seconds")
    assert_usage_error(["demo", "--only", "nosuch"], capsys, "argument --only", "nosuch")
    assert_usage_error(["bench", "--device", "tpu"], capsys, "argument --device")
    assert_usage_error(["demo", "--threads", str(10**20)], capsys, "argument --threads", "must be in [1, 65536]")


def test_valid_edge_values_are_accepted():
    p = cli.build_parser()
    a = p.parse_args(["train", "--grad-clip", "0", "--min-lr-ratio", "0", "--warmup", "0", "--n-enc-layers", "0",
                      "--n-dec-layers", "0", "--max-word-bytes", "4", "--sample", "0", "--weight-decay", "0"])
    assert (a.grad_clip, a.min_lr_ratio, a.warmup, a.n_enc_layers, a.max_word_bytes) == (0.0, 0.0, 0, 0, 4)
    assert p.parse_args(["train", "--min-lr-ratio", "1"]).min_lr_ratio == 1.0
    a = p.parse_args(["generate", "x", "--temperature", "0", "--top-k", "1"])
    assert (a.temperature, a.top_k) == (0.0, 1)


def test_ignored_options_warn(files, capsys):
    # --pattern with a single file, hier-only options with --model byte: a warning, and the run goes on
    rc, out, err = run_cli(train_argv(files, "--pattern", "*.md"), capsys)
    assert rc == 0 and "Traceback" not in err
    assert "tokcore train: warning: --pattern" in err and "held-out bits/byte" in out
    rc, out, err = run_cli(train_argv(files, "--model", "byte", "--pool", "max", "--max-word-bytes", "8"), capsys)
    assert rc == 0 and "Traceback" not in err
    assert "tokcore train: warning:" in err and "--pool" in err and "--max-word-bytes" in err


def test_load_checkpoint_raises_usage_error(files):
    # library callers get a UsageError (a ValueError) for a file that is not a checkpoint
    for key in ("text", "bin", "empty", "zip", "tensor"):
        with pytest.raises(UsageError, match="not a tokcore checkpoint"):
            load_checkpoint(files[key])


def test_cli_subprocess_has_no_traceback(files):
    r = subprocess.run([sys.executable, "-m", "tokcore.cli", "train", "--lr", "nan"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "tokcore train: error: argument --lr" in r.stderr and "Traceback" not in r.stderr


def test_runs_that_fail_end_in_a_message(files, capsys):
    # a diverging run and a batch that cannot be allocated: the reason and a hint, exit status 1
    rc, out, err = run_cli(train_argv(files, "--lr", "1e10", "--steps", "3", "--warmup", "0"), capsys)
    assert rc == 1 and "Traceback" not in err
    assert "tokcore train: error: loss is" in err and "diverged" in err and "--lr" in err
    rc, out, err = run_cli(train_argv(files, "--batch-size", str(10**12)), capsys)
    assert rc == 1 and "Traceback" not in err
    assert "tokcore train: error: out of memory" in err and "--batch-size" in err
    rc, out, err = run_cli(train_argv(files, "--seq-len", "100000"), capsys)  # before any model is built
    assert rc == 2 and "fewer than seq_len=100000" in err and "--seq-len" in err and "model hier" not in out


def test_prompts_need_not_be_utf8(files, capsys):
    # the shell passes bytes; argv holds an undecodable byte as a surrogate escape
    prompt = b"x\xff".decode("utf-8", "surrogateescape")
    run = files["tmp"] / "run"
    rc, out, err = run_cli(train_argv(files, "--out", run, "--sample", "3", "--prompt", prompt), capsys)
    assert rc == 0 and "Traceback" not in err and "sample:" in out
    rc, out, err = run_cli(["generate", run, "-n", "3", "--prompt", prompt, "--device", "cpu"], capsys)
    assert rc == 0 and "Traceback" not in err and out.startswith("x\ufffd")


def test_resume_warns_about_model_options(files, capsys):
    run = files["tmp"] / "run"
    assert run_cli(train_argv(files, "--out", run), capsys)[0] == 0
    rc, out, err = run_cli(train_argv(files, "--out", run, "--resume", "--steps", "2", "--size", "small",
                                      "--pool", "max"), capsys)
    assert rc == 0 and "Traceback" not in err
    assert "tokcore train: warning: ignoring" in err and "--size" in err and "--pool" in err
    assert "checkpoint's model" in err
    assert "--d-model" not in err and "--n-layers" not in err  # given as the run has them: not named
    rc, out, err = run_cli(train_argv(files, "--out", run, "--resume", "--steps", "3"), capsys)
    assert rc == 0 and "ignoring" not in err  # all the model options given, all as the run has them


# ------------------------------------------------------------------------------ options reach the run
@pytest.fixture
def byte_checkpoint(tmp_path):
    """An untrained tiny byte LM that emits printable ASCII only (so that stdout shows
    every generated byte), saved as a checkpoint: (path, model)."""
    torch.manual_seed(0)
    # a context of 9 positions: cached generation restarts it within a few bytes
    model = ByteLM(ByteLMConfig(d_model=32, n_layers=1, n_heads=2, max_context_bytes=9))
    with torch.no_grad():
        codes = torch.arange(256)
        model.head.bias[(codes < 32) | (codes > 126)] = -1e4
    return save_checkpoint(tmp_path / "byte.pt", model, None, {"counters": {}}), model.eval()


def test_generate_options_reach_the_model(byte_checkpoint, capsys):
    path, model = byte_checkpoint

    def cli_generate(*options):
        rc, out, err = run_cli(["generate", path, "--prompt", "ab", "--device", "cpu", *options], capsys)
        assert rc == 0 and "Traceback" not in err, err
        assert out.startswith("ab") and out.endswith("\n")
        return out[2:-1].encode()

    def library(n, temperature, top_k, seed, use_cache=True):
        return model.generate(b"ab", n, temperature, top_k, generator=torch.Generator().manual_seed(seed),
                              use_cache=use_cache)

    greedy = library(23, 0.0, None, 0)
    sampled = library(23, 1.5, 5, 3)
    assert len(greedy) == len(sampled) == 23 and greedy != sampled  # the options matter for this model
    assert cli_generate("-n", "23", "--temperature", "1.5", "--top-k", "5", "--seed", "3") == sampled
    assert cli_generate("--max-new-bytes", "23", "--temperature", "0") == greedy
    # top-1 sampling is greedy at any temperature
    assert cli_generate("-n", "23", "--temperature", "3", "--top-k", "1", "--seed", "5") == greedy
    assert library(23, 3.0, None, 5) != greedy and library(23, 0.8, None, 0) != greedy
    assert len(cli_generate("-n", "7")) == 7  # the byte LM never stops early
    uncached = library(23, 1.5, 5, 3, use_cache=False)
    assert uncached != sampled  # past the context's 9 positions the two paths' contexts differ
    assert cli_generate("-n", "23", "--temperature", "1.5", "--top-k", "5", "--seed", "3", "--no-cache") == uncached


def test_train_options_reach_the_checkpoint(files, capsys):
    run = files["tmp"] / "run"
    rc, out, err = run_cli(["train", "--data", files["text"], "--steps", "3", "--no-progress", "--device", "cpu",
                            "--out", run, "--size", "tiny", "--d-model", "32", "--n-layers", "1", "--n-heads", "2",
                            "--d-local", "16", "--n-enc-layers", "2", "--n-dec-layers", "2", "--max-word-bytes", "6",
                            "--pool", "max", "--seq-len", "32", "--batch-size", "2", "--eval-windows", "2",
                            "--lr", "3e-3", "--min-lr-ratio", "0.25", "--warmup", "3", "--schedule", "linear",
                            "--weight-decay", "0.05", "--grad-clip", "0.5", "--seed", "7", "--holdout-every", "5",
                            "--max-data-bytes", "1500", "--save-every", "100"], capsys)
    assert rc == 0 and "Traceback" not in err, err
    ckpt = load_checkpoint(run)
    mc = ckpt["model_config"]  # the model that trained (asdict of its config)
    assert {k: mc[k] for k in ("d_model", "n_layers", "n_heads", "d_local", "n_local_heads", "n_enc_layers",
                               "n_dec_layers", "max_word_bytes", "pool")} == dict(
        d_model=32, n_layers=1, n_heads=2, d_local=16, n_local_heads=2, n_enc_layers=2, n_dec_layers=2,
        max_word_bytes=6, pool="max")  # n_local_heads: the tiny preset's
    weights = ckpt["model"]
    assert weights["encoder.embed.weight"].shape == (256, 16) and weights["start"].shape == (32,)
    assert "encoder.local.blocks.1.ln1.weight" in weights and "encoder.local.blocks.2.ln1.weight" not in weights
    tc = ckpt["train_config"]
    assert {k: tc[k] for k in ("model", "size", "data", "steps", "seq_len", "batch_size", "eval_windows", "lr",
                               "min_lr_ratio", "warmup_steps", "schedule", "weight_decay", "grad_clip", "seed",
                               "holdout_every", "max_data_bytes", "save_every", "device", "progress")} == dict(
        model="hier", size="tiny", data=str(files["text"]), steps=3, seq_len=32, batch_size=2, eval_windows=2,
        lr=3e-3, min_lr_ratio=0.25, warmup_steps=3, schedule="linear", weight_decay=0.05, grad_clip=0.5, seed=7,
        holdout_every=5, max_data_bytes=1500, save_every=100.0, device="cpu", progress=False)
    # the optimizer that ran: decay 0.05 on one group; the last step's LR, linear from
    # 3e-3 towards 0.25 * 3e-3 at progress 2/3 (the cosine schedule would give 0.4375)
    groups = ckpt["optimizer"]["param_groups"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]
    assert [g["lr"] for g in groups] == pytest.approx([3e-3 * 0.5] * 2)
    assert ckpt["state"]["counters"]["step"] == 3
    # the byte model takes the model options that apply to it
    run = files["tmp"] / "byte"
    rc, out, err = run_cli(train_argv(files, "--model", "byte", "--d-model", "32", "--n-layers", "3", "--n-heads", "4",
                                      "--out", run), capsys)
    assert rc == 0 and "Traceback" not in err, err
    mc = load_checkpoint(run)["model_config"]
    assert (mc["d_model"], mc["n_layers"], mc["n_heads"]) == (32, 3, 4)


# ------------------------------------------------------------------------------ --version and info
def test_version_is_the_installed_packages(capsys):
    import importlib.metadata

    import tokcore

    rc, out, _ = run_cli(["--version"], capsys)
    assert rc == 0 and out.strip() == f"tokcore {tokcore.__version__}"
    # one version: the package's metadata (pyproject.toml) and tokcore.__version__ agree
    assert importlib.metadata.version("tokcore") == tokcore.__version__
    # and the package is marked as typed (PEP 561), so type checkers read its hints
    assert (Path(tokcore.__file__).parent / "py.typed").is_file()


def info_fields(capsys) -> dict[str, str]:
    rc, out, err = run_cli(["info"], capsys)
    assert rc == 0 and not err, err
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())  # "name   value"


def test_info_reports_the_build_and_settings_in_use(capsys, monkeypatch):
    import tokcore
    from tokcore._library import _SETTINGS

    for name in _SETTINGS:
        monkeypatch.delenv(name, raising=False)
    fields = info_fields(capsys)
    assert fields["tokcore"] == tokcore.__version__
    assert fields["library"] == str(tokcore.LIBRARY_PATH)
    assert fields["torch"].startswith(torch.__version__ + " (")
    assert fields["cpu kernels"] == f"{tokcore.cpu_isa()} (the widest this CPU runs; TOKCORE_CPU_ISA unset)"
    cuda = fields["cuda kernels"]
    if not tokcore.has_cuda_kernels():
        assert cuda.startswith("not built")
    elif torch.cuda.is_available():
        assert cuda == "built"
    else:
        assert cuda.startswith("built; unused here")
    assert ("cuda:0" in fields) == torch.cuda.is_available()
    assert fields["settings"] == "defaults (no TOKCORE_* variable set)"
    # the settings that are set, and one that the library ignores, by name
    monkeypatch.setenv("TOKCORE_CPU_STREAM_MIN_MB", "0")
    monkeypatch.setenv("TOKCORE_CPU_HUGE_PAGES", "2")
    assert info_fields(capsys)["settings"] == (
        "TOKCORE_CPU_STREAM_MIN_MB=0; TOKCORE_CPU_HUGE_PAGES=2 (not 0 or 1: the default is used)")

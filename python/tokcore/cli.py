"""The ``tokcore`` command line (``tokcore = tokcore.cli:main``; also ``python -m tokcore``).

Subcommands live in a registry: each one is a :class:`Command` with a function that adds
its arguments and a function that runs it. To add one, write the two functions and call
:func:`register` (see the end of this file). What only one command needs (the models,
training, the benchmarks) is imported inside its run function; the package itself loads
torch and the compiled ops on import.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .errors import NonFiniteLogitsError, OutputWriteError, UsageError

__all__ = ["Command", "COMMANDS", "register", "build_parser", "main"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    description: str | None = None
    # Cross-option checks after parsing, before `run`: call parser.error(...) on a bad value.
    check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = None


COMMANDS: dict[str, Command] = {}


def register(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], int | None], description: str | None = None,
             check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = None) -> Command:
    """Add a subcommand (name must be new). `check(parser, args)`, if given, runs after
    parsing and before `run`, for rules that involve several options (parser.error(...))."""
    if name in COMMANDS:
        raise ValueError(f"command {name!r} is already registered")
    cmd = Command(name, help, add_arguments, run, description, check)
    COMMANDS[name] = cmd
    return cmd


# ---------------------------------------------------------------------------- argument types
# argparse turns an ArgumentTypeError into "tokcore CMD: error: argument --OPT: MESSAGE".
def _parse_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {s}")
    return v


def _parse_int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def _positive_float(s: str) -> float:
    v = _parse_float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _nonnegative_float(s: str) -> float:
    v = _parse_float(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _fraction(s: str) -> float:
    v = _parse_float(s)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {s}")
    return v


def _int_at_least(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int >= lo (and <= hi, if given)."""
    def parse(s: str) -> int:
        v = _parse_int(s)
        if hi is None and v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {s}")
        if hi is not None and not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {s}")
        return v

    parse.__name__ = f"int_at_least_{lo}" if hi is None else f"int_in_{lo}_to_{hi}"
    return parse


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)
# Caps on what no run here could use, so that a typo (an extra digit or ten) is an error
# naming the option rather than an overflow deep inside, or modules built until the
# process is killed.
_thread_count = _int_at_least(1, 65536)
_model_width = _int_at_least(1, 65536)
_layer_count = _int_at_least(1, 1024)
_local_layer_count = _int_at_least(0, 1024)
_step_count = _int_at_least(1, 2**53)  # (TrainConfig.check's caps: steps are counted in floats too)


def _time_budget(s: str) -> float:
    v = _positive_float(s)
    if v > 1e9:  # 31 years
        raise argparse.ArgumentTypeError(f"must be at most 1e9 seconds, got {s}")
    return v


# The largest --max-word-bytes: the model packs every word into max_word_bytes slots,
# so memory grows with it; past this, words are cut anyway in any text we train on.
MAX_WORD_BYTES_OPTION = 256


def _seed(s: str) -> int:
    v = _parse_int(s)
    if not 0 <= v < 2**64:  # numpy's default_rng needs >= 0; torch.manual_seed takes 64 bits
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {s}")
    return v


def _prompt_bytes(prompt: str) -> bytes:
    """--prompt as the bytes the shell passed: undecodable bytes (argv's surrogate
    escapes) come back as they were, so a prompt need not be valid UTF-8."""
    return os.fsencode(prompt)


def _warn(command: str, message: str) -> None:
    print(f"tokcore {command}: warning: {message}", file=sys.stderr)


def _check_device(parser: argparse.ArgumentParser, device: str, allow_auto: bool = True) -> None:
    """--device: auto (if allowed), cpu, cuda or cuda:N, the CUDA ones only where CUDA is available."""
    if allow_auto and device == "auto":
        return
    import torch

    choices = ("auto, " if allow_auto else "") + "cpu, cuda or cuda:N"
    try:
        dev = torch.device(device)
    except RuntimeError:
        parser.error(f"argument --device: unknown device {device!r}; use {choices}")
    if dev.type == "cpu":
        if dev.index not in (None, 0):
            parser.error(f"argument --device: {device!r}: torch has one CPU device (cpu or cpu:0)")
        return
    if dev.type != "cuda":
        parser.error(f"argument --device: {device!r} is not supported; use {choices}")
    if not torch.cuda.is_available():
        parser.error(f"argument --device: {device!r} requested but CUDA is not available "
                     "(torch.cuda.is_available() is False)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        parser.error(f"argument --device: {device!r} requested but there are only "
                     f"{torch.cuda.device_count()} CUDA device(s)")


def _check_out_dir(parser: argparse.ArgumentParser, path: str) -> None:
    """--out: an existing writable folder, or one that can be created (tried, then
    removed again). Not kept here: the run makes it when it starts, so that a command
    refused later leaves no empty folder behind."""
    if not path:
        parser.error("argument --out: an empty path")
    p = Path(path)
    if p.exists() and not p.is_dir():
        parser.error(f"argument --out: {p} exists and is not a folder")
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            parser.error(f"argument --out: folder {p} is not writable")
        return
    missing = [p.absolute()]  # the folders to make, deepest first
    while not missing[-1].parent.exists():
        missing.append(missing[-1].parent)
    try:  # made and removed again: only trying tells (root may write anywhere, but not into /proc)
        for folder in reversed(missing):
            folder.mkdir()
    except OSError as e:
        parser.error(f"argument --out: cannot create folder {p}: {e.strerror or e}")
    finally:
        for folder in missing:
            with contextlib.suppress(OSError):
                folder.rmdir()


def _set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


# ---------------------------------------------------------------------------- demo
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", nargs="+", metavar="FAMILY", help="run only these demos (default: all)")
    p.add_argument("--list", action="store_true", help="list the demos and exit")
    p.add_argument("--seconds", type=_positive_float, default=45.0,
                   help="training time of demos that train a model (default: 45)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=_thread_count, help="torch CPU threads")


def _demo_check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from .demo import DEMOS

    unknown = [n for n in (args.only or []) if n not in {d.name for d in DEMOS}]
    if unknown:
        parser.error(f"argument --only: unknown demo(s) {', '.join(unknown)}; "
                     f"available: {', '.join(d.name for d in DEMOS)}")
    if not args.list:
        _check_device(parser, args.device)


def _demo_run(args: argparse.Namespace) -> int:
    from .demo import DEMOS, DemoOptions, run_demos

    if args.list:
        for d in DEMOS:
            print(f"{d.name:12s} {d.description}")
        return 0
    _set_threads(args)
    run_demos(args.only, DemoOptions(device=args.device, seconds=args.seconds, seed=args.seed,
                                     progress=not args.no_progress))
    return 0


# ---------------------------------------------------------------------------- train / compare
def _common_train_args(p: argparse.ArgumentParser, budget_help: tuple[str, str]) -> None:
    """budget_help: the command's own help for --steps and --time-budget."""
    g = p.add_argument_group("budget")
    g.add_argument("--steps", type=_step_count, help=budget_help[0])
    g.add_argument("--time-budget", type=_time_budget, metavar="SECONDS", help=budget_help[1])
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="PATH",
                   help="a folder or a file (default: the Python standard library's *.py files)")
    g.add_argument("--pattern", help="file name pattern under --data (default: * ; *.py for the stdlib)")
    g.add_argument("--holdout-every", type=_int_at_least(2), default=20, metavar="N",
                   help="hold out every N-th file; a single --data file holds out its last 1/N, and so do "
                        "fewer than N files, together (default: 20)")
    g.add_argument("--max-data-bytes", type=_positive_int,
                   help="stop reading files once this many bytes are read (whole files: a little more is read; "
                        "a single --data file is cut to this)")
    g.add_argument("--seq-len", type=_positive_int, default=512, help="bytes per training window (default: 512)")
    g.add_argument("--batch-size", type=_positive_int, default=16, help="windows per step (default: 16)")
    g.add_argument("--eval-windows", type=_positive_int, default=64,
                   help="fixed held-out windows for the final bits/byte (default: 64)")
    g = p.add_argument_group("model")
    g.add_argument("--size", help="size preset: tiny | small | base (default: small)")
    g.add_argument("--d-model", type=_model_width, help="backbone width")
    g.add_argument("--n-layers", type=_layer_count, help="backbone layers")
    g.add_argument("--n-heads", type=_model_width, help="backbone heads")
    g.add_argument("--d-local", type=_model_width, help="hier: byte encoder/decoder width")
    g.add_argument("--n-enc-layers", type=_local_layer_count, help="hier: byte encoder layers")
    g.add_argument("--n-dec-layers", type=_local_layer_count, help="hier: byte decoder layers")
    g.add_argument("--max-word-bytes", type=_int_at_least(4, MAX_WORD_BYTES_OPTION),
                   help=f"hier: longest word in bytes, 4..{MAX_WORD_BYTES_OPTION}; longer words are cut (default 16; "
                        "the encoder and decoder hold words x max_word_bytes byte slots)")
    g.add_argument("--pool", choices=["mean", "max", "attention"], help="hier: byte->word pooling (default mean)")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=_positive_float, default=2e-3, help="peak learning rate (default: 2e-3)")
    g.add_argument("--min-lr-ratio", type=_fraction, default=0.1, help="final LR / peak LR, in [0, 1] (default: 0.1)")
    g.add_argument("--warmup", type=_nonnegative_int, default=20,
                   help="warmup steps, at most a tenth of the run's (default: 20)")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine",
                   help="learning-rate decay over the run's steps, to --min-lr-ratio (default: cosine)")
    g.add_argument("--weight-decay", type=_nonnegative_float, default=0.1,
                   help="AdamW weight decay of the weight matrices, not the embeddings (default: 0.1)")
    g.add_argument("--grad-clip", type=_nonnegative_float, default=1.0,
                   help="max grad norm; 0 disables (default: 1.0)")
    g.add_argument("--seed", type=_seed, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    g.add_argument("--threads", type=_thread_count, help="torch CPU threads")
    g.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: each training step's forward pass under bfloat16 autocast, with weights, "
                        "gradients and optimizer state in fp32 (faster on GPUs from sm_80 and CPUs with "
                        "AVX512-BF16 or AMX); evaluation stays fp32 (default: fp32)")
    g.add_argument("--save-every", type=_positive_float, default=300.0,
                   help="seconds of training between checkpoints (default: 300)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


DEFAULT_SIZE = "small"
_MODEL_OPTS = ("d_model", "n_layers", "n_heads", "d_local", "n_enc_layers", "n_dec_layers", "max_word_bytes", "pool")
_HIER_ONLY_OPTS = ("d_local", "n_enc_layers", "n_dec_layers", "max_word_bytes", "pool")


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_out_holds_no_run(parser: argparse.ArgumentParser, out: str, names: Sequence[str], what: str,
                            hint: str) -> None:
    """--out must not hold the files of an earlier run (one of `names`), which the run
    would overwrite, unless --overwrite says so; `what` and `hint` go into the message.
    (train() and compare() check again, with hints that name their own arguments.)"""
    from .pooling.train import check_holds_no_run

    try:
        check_holds_no_run(out, names, what, hint)
    except UsageError as e:
        parser.error(f"argument --out: {e}")


def _check_heads(parser: argparse.ArgumentParser, options: str, width: str, heads: str) -> None:
    # attention needs width % heads == 0 and an even head size (rotary embeddings);
    # width and heads are "name value" strings for the message
    w, h = int(width.split()[-1]), int(heads.split()[-1])
    if w % h:
        parser.error(f"argument {options}: {width} is not divisible by {heads}")
    if (w // h) % 2:
        parser.error(f"argument {options}: {width} / {heads} = {w // h} per head, which must be even "
                     "(rotary embeddings)")


def _check_common_train_args(parser: argparse.ArgumentParser, args: argparse.Namespace, hier: bool) -> None:
    """Checks shared by train and compare; hier: the hierarchical model is trained."""
    from .data import _looks_binary
    from .pooling.lm import SIZES

    _check_device(parser, args.device)
    if args.data == "":
        parser.error("argument --data: an empty path")
    if args.precision == "bf16":
        from .pooling.train import check_precision, resolve_device

        try:
            check_precision(args.precision, resolve_device(args.device))
        except UsageError as e:
            parser.error(f"argument --precision: {e}")
    size = args.size or DEFAULT_SIZE
    if size not in SIZES:
        parser.error(f"argument --size: unknown size {size!r}; choose from {', '.join(SIZES)}")
    preset = SIZES[size]
    _check_heads(parser, "--d-model/--n-heads", f"d_model {args.d_model or preset['d_model']}",
                 f"n_heads {args.n_heads or preset['n_heads']}")
    if hier:
        _check_heads(parser, "--d-local", f"d_local {args.d_local or preset['d_local']}",
                     f"the {size} preset's n_local_heads {preset['n_local_heads']}")
    if args.data is not None and Path(args.data).is_file():
        try:
            with open(args.data, "rb") as f:
                head = f.read(4096)
        except OSError as e:
            parser.error(f"argument --data: cannot read {args.data}: {e.strerror or e}")
        if not head:
            parser.error(f"argument --data: {args.data} is empty")
        if _looks_binary(head):
            parser.error(f"argument --data: {args.data} looks binary (it has NUL bytes); "
                         "give a text file or a folder of text files")
        if args.pattern is not None:
            _warn(args.command, f"--pattern {args.pattern!r} is ignored: --data {args.data} is a single file")


def _train_config(args: argparse.Namespace, model: str):
    from .pooling.train import TrainConfig

    steps, budget = args.steps, args.time_budget
    if not steps and not budget and not getattr(args, "resume", False):  # (a resumed run keeps its own)
        budget = 300.0
    return TrainConfig(
        model=model, size=args.size or DEFAULT_SIZE,
        model_config={k: getattr(args, k) for k in _MODEL_OPTS if getattr(args, k) is not None},
        data=args.data, data_pattern=args.pattern, max_data_bytes=args.max_data_bytes,
        holdout_every=args.holdout_every, seq_len=args.seq_len, batch_size=args.batch_size,
        steps=steps, time_budget=budget, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup,
        schedule=args.schedule, weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
        device=args.device, precision=args.precision, out=getattr(args, "out", None), save_every=args.save_every,
        eval_windows=args.eval_windows, progress=not args.no_progress,
    )


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=["hier", "byte"],
                   help="hier: HierarchicalByteLM; byte: plain byte transformer (default: hier; with --resume, "
                        "the checkpoint's)")
    p.add_argument("--out", metavar="DIR",
                   help="run folder: checkpoint.pt (periodic and final) and report.json (without it nothing is saved); "
                        "a folder that holds a run needs --resume or --overwrite")
    once = p.add_mutually_exclusive_group()
    once.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                      help="resume from --out's checkpoint, or from the given checkpoint file / run folder; the "
                           "run keeps its model, training settings and, without --steps or --time-budget, its budget")
    once.add_argument("--overwrite", action="store_true",
                      help="start a new run even if --out holds one (its checkpoint and report are replaced)")
    p.add_argument("--sample", type=_nonnegative_int, default=0, metavar="N",
                   help="generate N bytes at the end (temperature 0.8, top-k 40; `tokcore generate` takes both)")
    p.add_argument("--prompt", default="def ", help="prompt for --sample (default: 'def ')")
    _common_train_args(p, ("optimizer steps (with --resume: in total, across resumes)",
                           "seconds of training (with --resume: in total, across resumes); "
                           "default 300 when --steps is not given (with --resume: the run's own). A few steps "
                           "are timed first and the run trains as many as fit, on a schedule by step, so that "
                           "it repeats"))


def _train_check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from .pooling.train import CHECKPOINT_NAME, _same_checkpoint, load_checkpoint

    if args.resume is True and not args.out:
        parser.error("argument --resume: --resume without a path needs --out")
    if args.resume:
        source = args.out if args.resume is True else args.resume
        try:
            ckpt = load_checkpoint(source)  # checks the file too
        except UsageError as e:
            parser.error(f"argument --resume: {e}")
        kind = ckpt["kind"]
        # what the run has, to warn only about options given otherwise
        has = dict(ckpt.get("model_config") or {}, size=(ckpt.get("train_config") or {}).get("size"))
        del ckpt
        if args.model is not None and args.model != kind:
            parser.error(f"argument --model: the checkpoint holds a {kind!r} model; pass --model {kind}, or "
                         "leave --model out")
        args.model = kind
    args.model = args.model or "hier"
    _check_common_train_args(parser, args, hier=args.model == "hier")
    if args.model == "byte":
        ignored = [_opt(k) for k in _HIER_ONLY_OPTS if getattr(args, k) is not None]
        if ignored:
            _warn("train", f"ignoring {', '.join(ignored)}: options of the hier model, not of --model byte")
    if args.resume:
        given = [_opt(k) for k in ("size",) + _MODEL_OPTS
                 if getattr(args, k) is not None and getattr(args, k) != has.get(k)]
        if given:
            _warn("train", f"ignoring {', '.join(given)}: a resumed run keeps its checkpoint's model")
    if args.resume and not args.out:
        _warn("train", "--resume without --out: the resumed run is not saved; pass --out DIR to keep it")
    if args.out is not None:
        _check_out_dir(parser, args.out)
        if not args.resume and not args.overwrite:  # a new run would replace the checkpoint
            _check_out_holds_no_run(parser, args.out, [CHECKPOINT_NAME], "a run",
                                    "pass --resume to continue it, --overwrite to start over, or another --out")
        elif args.resume and not _same_checkpoint(args.resume, args.out):  # so would another run's
            _check_out_holds_no_run(parser, args.out, [CHECKPOINT_NAME], "a run of its own",
                                    f"resuming {args.resume} there would replace it: give another --out, or "
                                    "--resume alone to continue that run")


def _train_run(args: argparse.Namespace) -> int:
    _set_threads(args)
    import torch

    import tokcore  # noqa: F401
    from .pooling.train import format_report, train

    cfg = _train_config(args, args.model)
    report = train(cfg, resume=args.resume, overwrite=args.overwrite)
    model = report.pop("_model")
    print(format_report(report))
    if cfg.out:
        print(f"checkpoint and report in {cfg.out}")
    if args.sample:
        gen = torch.Generator().manual_seed(args.seed)
        prompt = _prompt_bytes(args.prompt)
        text = model.generate(prompt, args.sample, temperature=0.8, top_k=40, generator=gen)
        print("\nsample:\n" + (prompt + text).decode("utf-8", errors="replace"))
    return 0


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", default="tokcore-compare",
                   help="folder for compare.json, compare.md, compare.svg (learning curves) and each model's run "
                        "(default: ./tokcore-compare); one that holds a compare's results needs --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier compare in --out")
    _common_train_args(p, ("optimizer steps per model",
                           "seconds of training per model; default 300 when --steps is not given. Each "
                           "model's steps are timed first and it trains as many as fit, so that runs repeat"))


def _compare_check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from .pooling.train import compare_run_files

    _check_common_train_args(parser, args, hier=True)
    _check_out_dir(parser, args.out)
    if not args.overwrite:
        _check_out_holds_no_run(parser, args.out, compare_run_files(), "the results of a compare",
                                "pass --overwrite to replace them, or another --out")


def _compare_run(args: argparse.Namespace) -> int:
    _set_threads(args)
    import tokcore  # noqa: F401
    from .pooling.train import compare

    compare(_train_config(args, "hier"), out=args.out, overwrite=args.overwrite)
    return 0


# ---------------------------------------------------------------------------- generate
def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint file or run folder (from train --out)")
    p.add_argument("--prompt", default="def ", help="text to continue (default: 'def ')")
    p.add_argument("-n", "--max-new-bytes", type=_positive_int, default=200, help="bytes to generate (default: 200)")
    p.add_argument("--temperature", type=_nonnegative_float, default=0.8, help="0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=_positive_int, help="sample among the K most likely symbols (default: all)")
    p.add_argument("--seed", type=_seed, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--no-cache", action="store_true",
                   help="run the whole context again for each byte, without the cache of keys and values "
                        "(much slower; the context is then always the last bytes that fit)")


def _generate_check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _check_device(parser, args.device)


def _generate_run(args: argparse.Namespace) -> int:
    import torch

    import tokcore  # noqa: F401
    from .pooling.train import load_model

    model = load_model(args.checkpoint, args.device)
    gen = torch.Generator().manual_seed(args.seed)
    prompt = _prompt_bytes(args.prompt)
    # streamed as made, through a decoder that holds back a character's first bytes
    # until it is whole: the text printed is (prompt + output).decode(errors="replace")
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def show(byte: int) -> None:
        sys.stdout.write(text.decode(bytes((byte,))))
        sys.stdout.flush()

    sys.stdout.write(text.decode(prompt))
    try:
        model.generate(prompt, args.max_new_bytes, args.temperature, args.top_k, generator=gen,
                       use_cache=not args.no_cache, on_byte=show)
    except BrokenPipeError:  # the reader left: nothing more to write
        raise
    except BaseException:  # Ctrl-C or an error: end the text's line before the message
        sys.stdout.write(text.decode(b"", final=True) + "\n")
        raise
    sys.stdout.write(text.decode(b"", final=True) + "\n")
    return 0


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", default="all", help="which family's benchmark (default: all)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    p.add_argument("--no-save", action="store_true", help="do not append to bench/results/")
    p.add_argument("--repo", default=None,
                   help="the tokcore checkout holding bench/ (default: the current directory or its parents)")


def _bench_check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _check_device(parser, args.device, allow_auto=False)


def _find_bench_dir(repo: str | None) -> Path | None:
    # The benchmarks live in the repository (bench/), not in the installed wheel.
    starts = [Path(repo)] if repo else [Path.cwd(), *Path.cwd().parents]
    for root in starts:
        if (root / "bench" / "harness.py").is_file():
            return root / "bench"
    return None


def _bench_run(args: argparse.Namespace) -> int:
    import runpy

    bench_dir = _find_bench_dir(args.repo)
    if bench_dir is None and args.repo:
        raise UsageError(f"--repo {args.repo}: no bench/harness.py there; give the root of a tokcore checkout")
    if bench_dir is None:
        raise UsageError("no bench/ folder in the current directory or its parents; run it from a tokcore "
                         "checkout or pass --repo")
    scripts = sorted(bench_dir.glob("bench_*.py"))
    if args.family != "all":
        scripts = [s for s in scripts if s.stem == f"bench_{args.family}"]
        if not scripts:
            raise UsageError(f"--family: no benchmark for family {args.family!r} in {bench_dir}")
    argv = ["--device", args.device] + (["--quick"] if args.quick else []) + (["--no-save"] if args.no_save else [])
    status = 0
    for script in scripts:
        module = runpy.run_path(str(script), run_name="tokcore_bench")
        status |= int(module["main"](argv) or 0)
    return status


# ---------------------------------------------------------------------------- info
def _info_args(p: argparse.ArgumentParser) -> None:
    pass


def _info_lines() -> list[tuple[str, str]]:
    import platform

    import torch

    import tokcore
    from tokcore._library import settings

    cuda_torch = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    lines = [
        ("tokcore", tokcore.__version__),
        ("library", str(tokcore.LIBRARY_PATH)),
        ("torch", f"{torch.__version__} ({cuda_torch})"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("cpu", f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"),
        ("cpu kernels", tokcore.cpu_isa() + ("" if os.environ.get("TOKCORE_CPU_ISA")
                                             else " (the widest this CPU runs; TOKCORE_CPU_ISA unset)")),
    ]
    if not tokcore.has_cuda_kernels():
        cuda = "not built (a CPU-only build of tokcore)"
    elif not torch.cuda.is_available():
        cuda = "built; unused here: " + ("no GPU visible" if torch.version.cuda else "torch is a CPU-only build")
    else:
        cuda = "built"
    lines.append(("cuda kernels", cuda))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append((f"cuda:{i}", f"{props.name}, sm_{props.major}{props.minor}, "
                                       f"{props.total_memory / 2**30:.0f} GiB"))
    found = settings()
    lines.append(("settings", "; ".join(
        f"{name}={value}" + ("" if valid is None else f" (not {valid}: the default is used)")
        for name, (value, valid) in found.items()) or "defaults (no TOKCORE_* variable set)"))
    return lines


def _info_run(args: argparse.Namespace) -> int:
    lines = _info_lines()
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        print(f"{name:<{width}}  {value}")
    return 0


# ---------------------------------------------------------------------------- registry
register("demo", "run every op family's end-to-end demo (quick on CPU)", _demo_args, _demo_run,
         check=_demo_check)
register("train", "train a byte-level LM (hierarchical or plain) and report held-out bits/byte",
         _train_args, _train_run, check=_train_check)
register("compare", "train the hierarchical and the byte LM for the same budget, in turns; side-by-side table",
         _compare_args, _compare_run, check=_compare_check)
register("generate", "sample from a trained checkpoint (printed as UTF-8: bytes that do not decode show as U+FFFD)",
         _generate_args, _generate_run, check=_generate_check)
register("bench", "run the benchmarks (tokcore against its peers) from a tokcore checkout",
         _bench_args, _bench_run, check=_bench_check)
register("info", "print the versions, build and settings in use (for bug reports)", _info_args, _info_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokcore",
        description="tokcore: fast token-level kernels for tokenizer-free and adaptive-token models.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"tokcore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run, _check=cmd.check, _parser=p)
    return parser


def _is_out_of_memory(e: BaseException) -> bool:
    """numpy's and Python's MemoryError, torch's OutOfMemoryError (CUDA), torch's CPU
    allocator failing (a RuntimeError) and a tokcore op that could not allocate its output."""
    message = str(e)
    return (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or "could not allocate" in message or "can't allocate memory" in message
            or "DefaultCPUAllocator" in message)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        if args._check is not None:
            args._check(args._parser, args)  # parser.error(...): usage, the message, exit status 2
        status = int(args._run(args) or 0)
        sys.stdout.flush()  # here, so that a closed pipe is caught below, not at exit
        return status
    except UsageError as e:  # a bad path or option: the message, not a traceback
        print(f"tokcore {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OutputWriteError as e:  # a full disk, a folder without write permission
        print(f"tokcore {args.command}: error: {e.strerror}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `tokcore info | head -1`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (Python's final flush would fail again)
        return 141  # 128 + SIGPIPE, as a shell reports a command a closed pipe stopped
    except NonFiniteLogitsError as e:  # generating from a diverged checkpoint
        print(f"tokcore {args.command}: error: {e}", file=sys.stderr)
        return 1
    except FloatingPointError as e:  # the training loss became NaN or infinite
        print(f"tokcore {args.command}: error: {e}: the run diverged; start it again (--overwrite) with a lower "
              "--lr (a resumed run keeps its own)", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        if not _is_out_of_memory(e):
            raise
        print(f"tokcore {args.command}: error: out of memory ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
              "try a smaller --batch-size (also the final evaluation's), --seq-len or --size", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C; or SIGTERM, SIGHUP in training (train.Stopped)
        signum = getattr(e, "signum", signal.SIGINT)
        print("interrupted" if signum == signal.SIGINT else f"stopped ({signal.Signals(signum).name})",
              file=sys.stderr)
        return 128 + int(signum)  # as a shell reports a command the signal stopped


if __name__ == "__main__":
    raise SystemExit(main())

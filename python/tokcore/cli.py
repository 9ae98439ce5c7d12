"""The ``tokcore`` command line (``tokcore = tokcore.cli:main``; also ``python -m tokcore``).

Subcommands live in a registry: each one is a :class:`Command` with a function that adds
its arguments and a function that runs it. To add one, write the two functions and call
:func:`register` (see the end of this file). Heavy imports (torch, the compiled ops)
happen inside the run functions, so ``tokcore --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .errors import UsageError

__all__ = ["Command", "COMMANDS", "register", "build_parser", "main"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    description: str | None = None


COMMANDS: dict[str, Command] = {}


def register(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], int | None], description: str | None = None) -> Command:
    """Add a subcommand (name must be new)."""
    if name in COMMANDS:
        raise ValueError(f"command {name!r} is already registered")
    cmd = Command(name, help, add_arguments, run, description)
    COMMANDS[name] = cmd
    return cmd


def _positive_float(s: str) -> float:
    v = float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads")


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
def _common_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budget")
    g.add_argument("--steps", type=_positive_int, help="optimizer steps (total, across resumes)")
    g.add_argument("--time-budget", type=_positive_float, metavar="SECONDS",
                   help="seconds of training (total, across resumes); default 300 when --steps is not given")
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="PATH",
                   help="a folder or a file (default: the Python standard library's *.py files)")
    g.add_argument("--pattern", help="file name pattern under --data (default: * ; *.py for the stdlib)")
    g.add_argument("--holdout-every", type=int, default=20, help="hold out every N-th file (default: 20)")
    g.add_argument("--max-data-bytes", type=_positive_int, help="read at most about this many bytes of files")
    g.add_argument("--seq-len", type=_positive_int, default=512, help="bytes per training window (default: 512)")
    g.add_argument("--batch-size", type=_positive_int, default=16, help="windows per step (default: 16)")
    g.add_argument("--eval-windows", type=_positive_int, default=64,
                   help="fixed held-out windows for the final bits/byte (default: 64)")
    g = p.add_argument_group("model")
    g.add_argument("--size", default="small", help="size preset: tiny | small | base (default: small)")
    g.add_argument("--d-model", type=_positive_int, help="backbone width")
    g.add_argument("--n-layers", type=_positive_int, help="backbone layers")
    g.add_argument("--n-heads", type=_positive_int, help="backbone heads")
    g.add_argument("--d-local", type=_positive_int, help="hier: byte encoder/decoder width")
    g.add_argument("--n-enc-layers", type=int, help="hier: byte encoder layers")
    g.add_argument("--n-dec-layers", type=int, help="hier: byte decoder layers")
    g.add_argument("--max-word-bytes", type=int, help="hier: longest word in bytes (default 16)")
    g.add_argument("--pool", choices=["mean", "max", "attention"], help="hier: byte->word pooling (default mean)")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=_positive_float, default=2e-3, help="peak learning rate (default: 2e-3)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR / peak LR (default: 0.1)")
    g.add_argument("--warmup", type=int, default=20, help="warmup steps (default: 20)")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm; 0 disables (default: 1.0)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    g.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    g.add_argument("--save-every", type=_positive_float, default=300.0,
                   help="seconds of training between checkpoints (default: 300)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


_MODEL_OPTS = ("d_model", "n_layers", "n_heads", "d_local", "n_enc_layers", "n_dec_layers", "max_word_bytes", "pool")


def _train_config(args: argparse.Namespace, model: str):
    from .pooling.train import TrainConfig

    steps, budget = args.steps, args.time_budget
    if not steps and not budget:
        budget = 300.0
    return TrainConfig(
        model=model, size=args.size,
        model_config={k: getattr(args, k) for k in _MODEL_OPTS if getattr(args, k) is not None},
        data=args.data, data_pattern=args.pattern, max_data_bytes=args.max_data_bytes,
        holdout_every=args.holdout_every, seq_len=args.seq_len, batch_size=args.batch_size,
        steps=steps, time_budget=budget, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup,
        schedule=args.schedule, weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
        device=args.device, out=getattr(args, "out", None), save_every=args.save_every,
        eval_windows=args.eval_windows, progress=not args.no_progress,
    )


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=["hier", "byte"], default="hier",
                   help="hier: HierarchicalByteLM; byte: plain byte transformer (default: hier)")
    p.add_argument("--out", metavar="DIR", help="run folder: checkpoint.pt (periodic and final) and report.json")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="resume from --out's checkpoint, or from the given checkpoint file / run folder")
    p.add_argument("--sample", type=int, default=0, metavar="N", help="generate N bytes at the end")
    p.add_argument("--prompt", default="def ", help="prompt for --sample (default: 'def ')")
    _common_train_args(p)


def _train_run(args: argparse.Namespace) -> int:
    _set_threads(args)
    import torch

    import tokcore  # noqa: F401
    from .pooling.train import format_report, train

    cfg = _train_config(args, args.model)
    if args.resume is True and not cfg.out:
        raise UsageError("--resume without a path needs --out")
    report = train(cfg, resume=args.resume)
    model = report.pop("_model")
    print(format_report(report))
    if cfg.out:
        print(f"checkpoint and report in {cfg.out}")
    if args.sample:
        gen = torch.Generator().manual_seed(args.seed)
        text = model.generate(args.prompt.encode(), args.sample, temperature=0.8, top_k=40, generator=gen)
        print("\nsample:\n" + (args.prompt.encode() + text).decode("utf-8", errors="replace"))
    return 0


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", default="tokcore-compare",
                   help="folder for compare.json, compare.md and each model's run (default: ./tokcore-compare)")
    _common_train_args(p)


def _compare_run(args: argparse.Namespace) -> int:
    _set_threads(args)
    import tokcore  # noqa: F401
    from .pooling.train import compare

    compare(_train_config(args, "hier"), out=args.out)
    return 0


# ---------------------------------------------------------------------------- generate
def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint file or run folder (from train --out)")
    p.add_argument("--prompt", default="def ")
    p.add_argument("-n", "--max-new-bytes", type=_positive_int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def _generate_run(args: argparse.Namespace) -> int:
    import torch

    import tokcore  # noqa: F401
    from .pooling.train import load_model

    model = load_model(args.checkpoint, args.device)
    gen = torch.Generator().manual_seed(args.seed)
    out = model.generate(args.prompt.encode(), args.max_new_bytes, args.temperature, args.top_k, generator=gen)
    sys.stdout.write((args.prompt.encode() + out).decode("utf-8", errors="replace") + "\n")
    return 0


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", default="all", help="which family's benchmark (default: all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    p.add_argument("--no-save", action="store_true", help="do not append to bench/results/")
    p.add_argument("--repo", default=None,
                   help="the tokcore checkout holding bench/ (default: the current directory or its parents)")


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
    if bench_dir is None:
        print("tokcore bench: no bench/ folder found; run it from a tokcore checkout or pass --repo",
              file=sys.stderr)
        return 2
    scripts = sorted(bench_dir.glob("bench_*.py"))
    if args.family != "all":
        scripts = [s for s in scripts if s.stem == f"bench_{args.family}"]
        if not scripts:
            print(f"tokcore bench: no benchmark for family {args.family!r} in {bench_dir}", file=sys.stderr)
            return 2
    argv = ["--device", args.device] + (["--quick"] if args.quick else []) + (["--no-save"] if args.no_save else [])
    status = 0
    for script in scripts:
        module = runpy.run_path(str(script), run_name="tokcore_bench")
        status |= int(module["main"](argv) or 0)
    return status


# ---------------------------------------------------------------------------- registry
register("demo", "run every op family's end-to-end demo (quick on CPU)", _demo_args, _demo_run)
register("train", "train a byte-level LM (hierarchical or plain) and report held-out bits/byte",
         _train_args, _train_run)
register("compare", "train the hierarchical and the byte LM for the same budget; side-by-side table",
         _compare_args, _compare_run)
register("generate", "sample from a trained checkpoint", _generate_args, _generate_run)
register("bench", "run the benchmarks (tokcore against its peers) from a tokcore checkout",
         _bench_args, _bench_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokcore",
        description="tokcore: fast token-level kernels for tokenizer-free and adaptive-token models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UsageError as e:  # a bad path or option: the message, not a traceback
        print(f"tokcore {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

"""Training loop, evaluation, checkpoints, report and model comparison for the
byte-level LMs of :mod:`tokcore.pooling.lm`.

Budgets (``steps`` and/or ``time_budget``) count the whole run, across resumes. A time
budget becomes a step count before training: a few steps are timed on copies of the
model and optimizer, and the run plans as many steps as fit the budget (`plan_steps`).
The learning-rate schedule then follows the step, so a budgeted run repeats: with the
same seed and the same plan it gives the same bits, like a run of ``steps`` = the plan.
(Following the clock instead made each step's learning rate depend on the VM's speed at
that moment, and the held-out bits/byte of 240 s byte-level runs of the same code moved
by 0.3 between runs.) The result still depends on the plan where the model learns fast:
the byte-level model, at 105-121 steps in 240 s, gains 0.02 bits/byte a step. A run whose
steps turn out slower than timed stops at `OVERRUN_LIMIT` times its budget. `compare`
has its models time and train in turns, a step at a time: on a shared VM whose speed moves
by 20% within minutes, models that ran one after the other got unequal machines (in one
240 s compare, one model ran 291 s against its plan's 240 and the other 211 s).
``train_time`` counts training steps only (batch sampling, forward, backward,
optimizer), not the timing, evaluation or checkpoints.

``precision="bf16"`` runs the training steps' forward passes under bfloat16 autocast
(`PRECISIONS`); weights, gradients, optimizer state and the held-out evaluation stay fp32.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import pickle
import signal
import sys
import threading
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..data import Corpus, batched, heldout_windows, load_corpus, sample_batch
from ..errors import InputNotFoundError, OutputWriteError, UsageError
from .lm import (
    SIZES,
    ByteLMConfig,
    HierConfig,
    build_model,
    count_parameters,
    matched_byte_config,
)
from ..plot import line_chart_svg
from .ops import word_boundaries

__all__ = [
    "TrainConfig",
    "resolve_device",
    "resolve_model_config",
    "lr_at",
    "plan_steps",
    "seconds_per_step",
    "evaluate",
    "train",
    "compare",
    "format_report",
    "format_compare",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
]

LN2 = math.log(2.0)
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
# Timing the steps of a time-budgeted run (`seconds_per_step`): after one untimed step
# (lazy set-up), at least this many steps and this fraction of the budget, at most
# PLAN_MAX_TIMED_STEPS steps.
PLAN_MIN_TIMED_STEPS = 5
PLAN_MIN_BUDGET_FRACTION = 0.02
PLAN_MAX_TIMED_STEPS = 50
OVERRUN_LIMIT = 1.25  # a budgeted run stops at this multiple of its budget, planned steps done or not


def check_holds_no_run(out: str | os.PathLike, names: list[str] | tuple[str, ...], what: str, hint: str) -> None:
    """Raises UsageError if folder `out` holds one of `names`: files of an earlier run
    that a new run would replace. `what` and `hint` go into the message."""
    found = [n for n in names if (Path(out) / n).exists()]
    if found:
        raise UsageError(f"{out} already holds {what} ({found[0]}); {hint}")


def compare_run_files(models: tuple[str, ...] = ("hier", "byte")) -> list[str]:
    """What a compare writes into its folder that a later compare would replace: its
    results, or a model's run of a compare that stopped early."""
    return ["compare.json", *(f"{m}/{CHECKPOINT_NAME}" for m in models)]


@dataclass
class TrainConfig:
    model: str = "hier"                 # hier | byte
    size: str = "small"                 # preset in lm.SIZES (the byte LM is matched to the hier preset)
    model_config: dict[str, Any] = field(default_factory=dict)  # overrides on top of the preset
    data: str | None = None             # None: the Python stdlib's *.py files
    data_pattern: str | None = None
    max_data_bytes: int | None = None
    holdout_every: int = 20
    seq_len: int = 512
    batch_size: int = 16
    steps: int | None = None
    time_budget: float | None = None    # seconds of training, made a step count by timing steps (plan_steps)
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"            # cosine | linear | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"             # fp32 | bf16 (PRECISIONS)
    out: str | None = None
    save_every: float = 300.0           # seconds of training between checkpoints
    eval_windows: int = 64
    eval_batch_size: int = 16
    progress: bool = True
    count_words_mwb: int = 16           # max_word_bytes used to count words for the byte LM's words/s

    def check(self) -> None:
        """Raises UsageError naming the first setting that training cannot use. The command
        line's options are checked by their types; this holds the Python API to the same
        rules (a negative grad_clip, say, would turn every gradient around)."""
        def fail(name: str, rule: str) -> None:
            option = "" if name in ("eval_batch_size", "beta1", "beta2", "count_words_mwb") else (  # (no option)
                " (--" + {"warmup_steps": "warmup"}.get(name, name).replace("_", "-") + ")")
            raise UsageError(f"{name}{option} must be {rule}, got {getattr(self, name)!r}")

        def whole(name: str, low: int, high: float = math.inf, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                fail(name, f"an int >= {low}" + (f" and <= {high:g}" if high < math.inf else "")
                     + (" (or None)" if optional else ""))

        def real(name: str, low: float, high: float, low_open: bool = False, high_open: bool = False,
                 optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  and (v > low if low_open else v >= low) and (v < high if high_open else v <= high))
            if not ok:
                fail(name, f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                     + (" (or None)" if optional else ""))

        for name in ("holdout_every", "seq_len", "batch_size", "eval_windows", "eval_batch_size"):
            whole(name, 1, 2**40)  # (past that, no machine could hold the windows)
        whole("max_data_bytes", 1, optional=True)
        whole("steps", 1, 2**53, optional=True)  # (tqdm and the plan count steps in floats)
        whole("warmup_steps", 0)
        whole("seed", 0, 2**64 - 1)
        whole("count_words_mwb", 4)
        real("time_budget", 0, 1e9, low_open=True, optional=True)  # (1e9 s: 31 years)
        real("lr", 0, math.inf, low_open=True, high_open=True)
        real("min_lr_ratio", 0, 1)
        real("weight_decay", 0, math.inf, high_open=True)
        real("beta1", 0, 1, high_open=True)
        real("beta2", 0, 1, high_open=True)
        real("grad_clip", 0, math.inf, high_open=True)  # 0: no clipping
        if not (isinstance(self.save_every, (int, float)) and self.save_every >= 0):  # (NaN fails this)
            fail("save_every", "a number of seconds >= 0 (0: after every step; inf: at the end only)")
        if self.schedule not in ("cosine", "linear", "constant"):
            fail("schedule", "one of cosine, linear, constant")


# fp32: everything in float32. bf16: the training steps' forward passes run under
# torch.autocast with bfloat16 (matrix products and attention in bf16; losses, norms and
# softmax in fp32), while the weights, gradients and optimizer state stay float32; the
# held-out evaluation and generation stay fp32, so runs of either precision are scored
# alike. Fast where the hardware multiplies bf16 natively (CUDA GPUs from sm_80, CPUs with
# AVX512-BF16 or AMX).
PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose from {list(PRECISIONS)}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UsageError(f"precision 'bf16' needs a GPU with bfloat16 support (sm_80 or newer); {device} has "
                         f"compute capability {torch.cuda.get_device_capability(device)}")


def _autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but torch.cuda.is_available() is False")
    return dev


def _known(cls, overrides: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in overrides.items() if k in names and v is not None}


def resolve_model_config(kind: str, size: str = "small", overrides: dict[str, Any] | None = None):
    """Model config for `kind` from a size preset plus overrides.

    hier: the preset with the overrides applied. byte: the byte LM whose width and
    parameter count match the hierarchical preset (`matched_byte_config`), then the
    overrides that name ByteLMConfig fields."""
    if size not in SIZES:
        raise UsageError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    overrides = dict(overrides or {})
    if kind == "hier":
        unknown = set(k for k, v in overrides.items() if v is not None) - {f.name for f in dataclasses.fields(HierConfig)}
        if unknown:
            raise UsageError(f"options {sorted(unknown)} do not apply to the hier model")
        return HierConfig(**{**SIZES[size], **_known(HierConfig, overrides)})
    if kind == "byte":
        base = matched_byte_config(HierConfig(**SIZES[size]))
        return dataclasses.replace(base, **_known(ByteLMConfig, overrides))
    raise UsageError(f"unknown model kind {kind!r}; choose from ['byte', 'hier']")


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate of 0-based `step` in a run of `total_steps` steps: linear warmup over
    `warmup_steps` (at most a tenth of the run), then decay by step / total_steps to
    `min_lr_ratio` of `lr`."""
    # The warmup used to end by 5% of the run too. For the byte-level model's
    # ~110-120 steps in 240 s that was 6 steps, and its held-out bits/byte then jumped
    # between runs a few steps apart (109 steps 3.92, 113 3.44, 117 3.40); over a tenth
    # of the run it fell steadily (3.47, 3.31, 3.30) and runs of 200+ steps are unchanged.
    total = max(1, total_steps)
    warm = max(1, min(cfg.warmup_steps, total // 10))
    p = min(max(step / total, 0.0), 1.0)
    scale = min(1.0, (step + 1) / warm)
    lo = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p))
    elif cfg.schedule == "linear":
        decay = 1 - (1 - lo) * p
    elif cfg.schedule == "constant":
        decay = 1.0
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    return cfg.lr * scale * decay


def plan_steps(cfg: TrainConfig, done_steps: int, train_time: float, seconds_per_step: float) -> int:
    """Total steps of a time-budgeted run that has trained `done_steps` steps in
    `train_time` seconds: the ones done, and as many more as fit the rest of the budget at
    `seconds_per_step` (at least one while time is left), capped by ``cfg.steps``."""
    left = cfg.time_budget - train_time
    more = max(1, round(left / seconds_per_step)) if left > 0 else 0
    total = done_steps + more
    return min(total, cfg.steps) if cfg.steps else total


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, data: np.ndarray,
                rng: np.random.Generator, device: torch.device):
    """One optimizer step on a batch drawn from `data` with `rng`. Returns the model's
    output, the loss as a float (which waits for the device: the step is done), the batch
    and the step's seconds."""
    t0 = time.perf_counter()
    b, cu = sample_batch(data, cfg.batch_size, cfg.seq_len, rng, device)
    with _autocast(cfg, device):  # the forward only: backward runs in the forward's dtypes anyway
        out = model(b, cu)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    loss = float(out["loss"].detach())
    return out, loss, (b, cu), time.perf_counter() - t0


class _RandomState:
    """A torch random state of its own (the CPU generator's, and the CUDA device's on a
    GPU), swapped in around the code that draws from it: runs that take turns (`compare`)
    then draw what each would draw alone."""

    def __init__(self, device: torch.device):
        self.cuda_index = (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else None
        self.cpu, self.cuda = self._get()

    def make_global(self) -> None:
        """Sets torch's random state to this one (the code after a run draws on from it)."""
        self._set(self.cpu, self.cuda)

    def _get(self):
        cuda = torch.cuda.get_rng_state(self.cuda_index) if self.cuda_index is not None else None
        return torch.get_rng_state(), cuda

    def _set(self, cpu, cuda) -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.cuda_index)

    @contextlib.contextmanager
    def active(self):
        outside = self._get()
        self._set(self.cpu, self.cuda)
        try:
            yield
        finally:
            self.cpu, self.cuda = self._get()
            self._set(*outside)


class _StepTimer:
    """Times training steps of `model` under `cfg`, one per `step()`, on a copy of the
    model with a fresh optimizer, batches of a random stream of its own and torch's random
    state forked from the current one: the run's model, optimizer and random streams are
    left as they were. One untimed step first (lazy set-up), then at least
    PLAN_MIN_TIMED_STEPS steps and PLAN_MIN_BUDGET_FRACTION of the budget, at most
    PLAN_MAX_TIMED_STEPS; fewer once the steps left (`steps_left`: cfg.steps' cap) clearly
    fit the budget left (`budget_left`), since the cap then is the plan."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, data: np.ndarray, device: torch.device,
                 steps_left: int | None = None, budget_left: float | None = None):
        self.steps_left, self.budget_left = steps_left, budget_left
        self.probe = copy.deepcopy(model)
        self.opt = _make_optimizer(self.probe, cfg)
        self.rng = np.random.default_rng([cfg.seed, 1])  # the run draws from default_rng(cfg.seed)
        self.torch_rng = _RandomState(device)
        self.cfg, self.data, self.device = cfg, data, device
        self.times: list[float] | None = None  # None until the untimed step

    def done(self) -> bool:
        t = self.times
        if t is None or len(t) < PLAN_MIN_TIMED_STEPS:
            return False
        if self.steps_left is not None and self.budget_left is not None:  # the cap binds: 2x room
            if 2 * float(np.median(t)) * self.steps_left <= self.budget_left:
                return True
        return len(t) >= PLAN_MAX_TIMED_STEPS or sum(t) >= PLAN_MIN_BUDGET_FRACTION * self.cfg.time_budget

    def step(self) -> None:
        with self.torch_rng.active():
            dt = _train_step(self.probe, self.opt, self.cfg, self.data, self.rng, self.device)[3]
        if self.times is None:
            self.times = []
        else:
            self.times.append(dt)

    def result(self) -> tuple[float, int]:
        """Median seconds of a step, and how many steps were timed."""
        return float(np.median(self.times)), len(self.times)


def seconds_per_step(model: nn.Module, cfg: TrainConfig, data: np.ndarray,
                     device: torch.device) -> tuple[float, int]:
    """Median seconds of a training step of `model` under `cfg`, and how many steps were
    timed (`_StepTimer`): the run's model, optimizer and random streams are as they were."""
    timer = _StepTimer(model, cfg, data, device)
    _time_in_turns([timer])
    return timer.result()


def _time_in_turns(timers: list[_StepTimer]) -> None:
    """Steps the timers in turn until each has timed enough."""
    while not all(timer.done() for timer in timers):
        for timer in timers:
            if not timer.done():
                timer.step()


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict[str, Any], cfg: TrainConfig | None = None) -> Path:
    """Atomically write {model kind + config + state dict, optimizer, counters, rng} to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "kind": model.kind,
        "model_config": asdict(model.config),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "state": state,
        "train_config": asdict(cfg) if cfg is not None else None,
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        # through a Python file, so that a failed write raises the OSError that says why
        # (torch.save given a path reports a full disk as "unexpected pos 64 vs 0")
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputWriteError(e.errno, f"cannot write checkpoint {path}: {e.strerror or e}") from e
    return path


def write_text(path: str | os.PathLike, text: str) -> None:
    """Path(path).write_text(text), raising OutputWriteError (which names the file) when
    the file cannot be written."""
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise OutputWriteError(e.errno, f"cannot write {path}: {e.strerror or e}") from e


def _checkpoint_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / CHECKPOINT_NAME if p.is_dir() else p


def _checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint file of `path` (a file or a run folder), after a cheap check that it
    exists and is an undamaged torch.save archive (a zip file whose members match their
    CRCs); UsageError otherwise."""
    p = _checkpoint_path(path)
    if not p.exists():
        raise InputNotFoundError(f"no checkpoint at {p}")
    if not p.is_file():  # opening a FIFO or a device could block forever
        raise UsageError(f"{p} is not a regular file (give a checkpoint file or a run folder)")
    try:  # (is_zipfile says False for a file it cannot read: ask first)
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UsageError(f"cannot read {p}: {e.strerror or e}") from e
    if not zipfile.is_zipfile(p):
        if magic == b"PK\x03\x04":  # a zip archive's start without its end: cut short
            raise UsageError(f"{p} is damaged (truncated: a zip archive without its end)")
        raise UsageError(f"{p} is not a tokcore checkpoint (not a file written by torch.save)")
    # torch.load does not check the CRCs: flipped bytes would load as wrong weights.
    # One pass over the file, cheap next to loading it.
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except OSError as e:
        raise UsageError(f"cannot read {p}: {e.strerror or e}") from e
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
        raise UsageError(f"{p} is damaged (a broken zip archive: {e})") from e
    if bad is not None:
        raise UsageError(f"{p} is damaged: its member {bad!r} does not match its CRC (the file changed after "
                         "it was written)")
    return p


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file (or the checkpoint in a run folder)."""
    p = _checkpoint_file(path)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except torch.OutOfMemoryError:
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError) as e:
        # a zip file that torch cannot read, or one holding objects a checkpoint never
        # has; not a device problem (CUDA tensors and no CUDA), which is not the file's
        if isinstance(e, RuntimeError) and "device" in str(e).lower():
            raise
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise UsageError(f"{p} is not a tokcore checkpoint ({type(e).__name__}: {reason})") from e
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise UsageError(f"{p} is not a tokcore checkpoint (a torch.save file of something else)")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise UsageError(f"{p}: unknown checkpoint format {ckpt['format']!r}")
    missing = {"kind", "model_config", "model"} - ckpt.keys()
    if missing:
        raise UsageError(f"{p}: checkpoint lacks {sorted(missing)}")
    return ckpt


# What building a model from a checkpoint's config, or loading its state, raises when the
# checkpoint does not match (unknown config keys, missing keys, other shapes, ...).
_MISMATCH_ERRORS = (ValueError, TypeError, KeyError, AttributeError, RuntimeError)


def _mismatch(path: str | os.PathLike, e: BaseException,
              what: str = "checkpoint does not match its model") -> UsageError:
    """UsageError "<file>: <what>: <the first lines of e, shortened>" (load_state_dict's
    message starts with a header line, then lists every key)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip() and not x.startswith("Error(s) in loading")]
    reason = "; ".join(x if len(x) <= 150 else x[:150] + " ..." for x in lines[:2]) or type(e).__name__
    return UsageError(f"{_checkpoint_path(path)}: {what}: {reason}")


def _model_from_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> nn.Module:
    """The checkpoint's model with its weights; UsageError if config and weights do not fit."""
    try:
        model = build_model(ckpt["kind"], ckpt["model_config"])
        model.load_state_dict(ckpt["model"])
    except torch.OutOfMemoryError:  # a memory problem, not the file's
        raise
    except _MISMATCH_ERRORS as e:
        raise _mismatch(path, e) from e
    return model


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a checkpoint (file or run folder), in eval mode."""
    device = resolve_device(device)
    ckpt = load_checkpoint(path, map_location=device)
    return _model_from_checkpoint(ckpt, path).to(device).eval()


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model: nn.Module, windows: list[np.ndarray], batch_size: int = 16,
             device: str | torch.device = "cpu") -> dict[str, float]:
    """Bits per byte over fixed windows: total NLL in bits (for the hier model: bytes and
    end-of-word symbols) / number of bytes."""
    was_training = model.training
    model.eval()
    nll = 0.0
    n_bytes = n_symbols = 0
    for b, cu in batched(windows, batch_size, device):
        out = model(b, cu)
        nll += float(out["nll"])
        n_bytes += int(out["n_bytes"])
        n_symbols += int(out["n_symbols"])
    model.train(was_training)
    nan = float("nan")  # no bytes scored: no score (0.0 would read as a perfect one)
    return {
        "bpb": nll / LN2 / n_bytes if n_bytes else nan,
        "nll_per_symbol": nll / n_symbols if n_symbols else nan,
        "bytes": n_bytes,
        "windows": len(windows),
    }


# ------------------------------------------------------------------ training
def _make_bar(cfg: TrainConfig, step0: int, total: int, position: int = 0):
    from tqdm.auto import tqdm

    # In a log file (no terminal) every refresh is a new line's worth of text:
    # refresh every 10 s there instead of 10 times a second.
    return tqdm(total=total, initial=step0, unit="step", disable=not cfg.progress, desc=f"train {cfg.model}",
                dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0, position=position)


# What a run was trained with, beside its model: a resumed run keeps them (they are in
# its checkpoint), so that it goes on as it began and its report tells what it ran with.
# The budget (steps, time_budget), device, out, saving, evaluation and progress may change.
RUN_SETTINGS = ("data", "data_pattern", "max_data_bytes", "holdout_every", "seq_len", "batch_size", "lr",
                "min_lr_ratio", "warmup_steps", "schedule", "weight_decay", "beta1", "beta2", "grad_clip", "seed",
                "precision", "count_words_mwb")


def _same_checkpoint(resume: bool | str | os.PathLike, out: str | os.PathLike) -> bool:
    """Whether `resume` (True: out's own checkpoint) names the checkpoint in folder `out`."""
    if resume is True:
        return True
    return _checkpoint_path(resume).resolve() == (Path(out) / CHECKPOINT_NAME).resolve()


def _resumed_data(saved: str, given: str | None, log: Callable[[str], None]) -> str:
    """The corpus of a resumed run: its own (runs store its absolute path; older ones the
    path as typed, taken from the working directory), or, where that is gone, `given`
    (cfg.data: the command line's --data) in its place."""
    if Path(saved).exists():
        return os.path.abspath(saved)
    if given is None:
        raise UsageError(f"the run's corpus {saved} is not there any more: give its new place "
                         "(cfg.data: the command line's --data)")
    log(f"the run's corpus {saved} is not there any more: using {os.path.abspath(given)} in its place")
    return os.path.abspath(given)


def _resumed_config(cfg: TrainConfig, saved: dict[str, Any] | None, log: Callable[[str], None]) -> TrainConfig:
    """cfg with the RUN_SETTINGS of the run being resumed (`saved`: its checkpoint's
    train_config), and its budget when cfg gives none. A setting that cfg sets to other
    than its default and that the run had otherwise is named in the log: it is not used."""
    if not saved:  # a checkpoint written without its training settings: cfg's apply
        return cfg
    defaults = TrainConfig()
    kept = {k: saved[k] for k in RUN_SETTINGS if k in saved}
    if kept.get("data") is not None:
        kept["data"] = _resumed_data(kept["data"], cfg.data, log)
    ignored = [f"{k}={kept[k]!r} (not {getattr(cfg, k)!r})" for k in kept
               if getattr(cfg, k) != kept[k] and getattr(cfg, k) != getattr(defaults, k)
               and not (k == "data" and os.path.abspath(cfg.data) == kept[k])]
    if ignored:
        log(f"a resumed run keeps its training settings: {', '.join(ignored)}")
    # and its model, which comes from the checkpoint: its checkpoints and report say so too
    kept.update({k: saved[k] for k in ("size", "model_config") if k in saved})
    if not cfg.steps and not cfg.time_budget:  # no budget given: the run's own
        kept.update(steps=saved.get("steps"), time_budget=saved.get("time_budget"))
        budget = [f"{k}={kept[k]}" for k in ("steps", "time_budget") if kept[k]]
        log(f"a resumed run without a budget keeps its own: {', '.join(budget) or 'none'}")
    return dataclasses.replace(cfg, **kept)


def log_corpus(corpus: Corpus, log: Callable[[str], None]) -> None:
    log(f"corpus: {corpus.describe()}")
    for note in corpus.notes:
        log(f"corpus: {note}")


class _Run:
    """One model's training run, taken a step at a time, so that `compare` can have two
    runs take turns (`_take_turns`); `train` runs one alone. Each run draws from random
    streams of its own (numpy's for batches, torch's for initialisation and dropout), so a
    run's steps are the same whether it runs alone or takes turns."""

    def __init__(self, cfg: TrainConfig, corpus: Corpus | None, resume: bool | str | os.PathLike,
                 log: Callable[[str], None], overwrite: bool):
        if resume and overwrite:
            raise UsageError("resume and overwrite exclude each other: continue the run in cfg.out, or replace it")
        if cfg.out is not None and not str(cfg.out):
            raise UsageError("cfg.out is an empty path (None saves nothing)")
        if cfg.out and Path(cfg.out).exists() and not Path(cfg.out).is_dir():
            raise UsageError(f"{cfg.out} exists and is not a folder (cfg.out: the run's folder)")
        if cfg.out and not overwrite and (not resume or not _same_checkpoint(resume, cfg.out)):
            # a new run, or one resumed from elsewhere, would replace the run in cfg.out
            check_holds_no_run(cfg.out, [CHECKPOINT_NAME], "a run",
                               "pass resume=True to continue it, overwrite=True to start over, or another cfg.out"
                               if not resume else f"resuming {resume} there would replace it: give another cfg.out")
        ckpt = None
        if resume:
            src = cfg.out if resume is True else resume
            if src is None:
                raise UsageError("resume=True needs cfg.out")
            # first, so that a wrong checkpoint fails before the corpus loads
            ckpt = load_checkpoint(src, map_location="cpu")
            if ckpt["kind"] != cfg.model:
                raise UsageError(f"{_checkpoint_path(src)} holds a {ckpt['kind']!r} model, not {cfg.model!r} "
                                 f"(cfg.model; the command line's --model)")
            cfg = _resumed_config(cfg, ckpt.get("train_config"), log)
        if not cfg.steps and not cfg.time_budget:
            raise UsageError("give steps and/or time_budget")
        cfg.check()
        if cfg.data is not None:  # saved absolute, so that the run resumes from any folder
            cfg = dataclasses.replace(cfg, data=os.path.abspath(cfg.data))
        self.cfg, self.log = cfg, log
        device = self.device = resolve_device(cfg.device)
        check_precision(cfg.precision, device)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        if corpus is None:
            corpus = load_corpus(cfg.data, cfg.holdout_every, cfg.data_pattern, cfg.max_data_bytes)
            log_corpus(corpus, log)
        if len(corpus.heldout) == 0:  # else the report's held-out bits/byte would mean nothing
            raise UsageError(f"the held-out split of {corpus.source} is empty: give more data "
                             f"(a single file holds out its last 1/holdout_every = 1/{cfg.holdout_every})")
        if len(corpus.train) < cfg.seq_len:  # checked before a model is built
            raise UsageError(f"the training split of {corpus.source} has {len(corpus.train)} bytes, fewer than "
                             f"seq_len={cfg.seq_len} (one window): give more data or a shorter --seq-len")
        self.corpus = corpus

        if ckpt is not None:
            model = _model_from_checkpoint(ckpt, src)
        else:
            model_config = resolve_model_config(cfg.model, cfg.size, cfg.model_config)
            if cfg.model_config.get("max_context_bytes") is None:
                # generation then stays within the positions training showed the model
                model_config = dataclasses.replace(model_config, max_context_bytes=cfg.seq_len)
            model = build_model(cfg.model, asdict(model_config))
        model.to(device).train()
        self.model = model
        self.opt = _make_optimizer(model, cfg)
        # counters, saved in checkpoints (the EMAs too, so a resumed run's curve goes on smoothly)
        # planned_steps: the step count that the time budget plan_budget = [time_budget, steps] became
        self.state = {"step": 0, "train_time": 0.0, "bytes": 0, "words": 0, "backbone_tokens": 0, "seqs": 0,
                      "ema_loss": None, "ema_bpb": None, "planned_steps": None, "plan_budget": None}
        self.curve: list[tuple[float, float]] = []  # (seconds trained, train bits/byte EMA) per step
        if ckpt is not None:
            try:  # the optimizer's state and the counters must fit the model and this loop
                if ckpt.get("optimizer") is not None:
                    self.opt.load_state_dict(ckpt["optimizer"])
                self.state.update(ckpt["state"].get("counters", {}))
                self.curve = [tuple(p) for p in ckpt["state"].get("curve", [])]
                if "numpy_rng" in ckpt["state"]:
                    self.rng.bit_generator.state = ckpt["state"]["numpy_rng"]
                if "torch_rng" in ckpt["state"]:
                    torch.set_rng_state(ckpt["state"]["torch_rng"].cpu())
            except _MISMATCH_ERRORS as e:
                raise _mismatch(src, e, "checkpoint's training state does not fit its model") from e
            log(f"resumed from step {self.state['step']} ({self.state['train_time']:.0f}s trained)")
            if cfg.steps and self.state["step"] >= cfg.steps:
                log(f"the run already has {self.state['step']} steps (steps={cfg.steps}): nothing more to train")
        self.torch_rng = _RandomState(device)  # from here on, this run's draws come from its own state
        self.n_params = count_parameters(model)
        log(f"model {cfg.model}: {self.n_params / 1e6:.2f}M parameters on {device} ({cfg.precision}); "
            f"{cfg.batch_size} x {cfg.seq_len} bytes per step")
        self.ckpt_path = Path(cfg.out) / CHECKPOINT_NAME if cfg.out else None
        if cfg.out:
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
        self.last_save = self.state["train_time"]
        self.saved_step = self.state["step"] if ckpt is not None else None  # the step in cfg.out's checkpoint
        self.bar = None

    @property
    def total(self) -> int:
        """The steps this run trains: its plan under a time budget, else ``cfg.steps``."""
        return self.state["planned_steps"] if self.cfg.time_budget else self.cfg.steps

    # ---- the plan of a time budget
    def step_timer(self) -> _StepTimer | None:
        """A timer of this run's steps if its time budget needs a plan, else None (the plan
        is set: by steps alone, kept from the checkpoint, or the budget is spent)."""
        cfg, state = self.cfg, self.state
        if not cfg.time_budget:
            return None
        # a resumed run keeps its plan, unless it was made for another budget
        if state["planned_steps"] is not None and state["plan_budget"] == [cfg.time_budget, cfg.steps]:
            return None
        if state["train_time"] >= cfg.time_budget:  # nothing to time: no more steps
            self._set_plan(state["step"], "the budget is spent")
            return None
        with self.torch_rng.active():  # the timer forks this run's torch state
            return _StepTimer(self.model, cfg, self.corpus.train, self.device,
                              steps_left=cfg.steps - state["step"] if cfg.steps else None,
                              budget_left=cfg.time_budget - state["train_time"])

    def plan(self, timer: _StepTimer) -> None:
        per_step, timed = timer.result()
        self._set_plan(plan_steps(self.cfg, self.state["step"], self.state["train_time"], per_step),
                       f"{per_step:.3g}s per step, the median of {timed} timed steps")

    def _set_plan(self, steps: int, how: str) -> None:
        self.state["planned_steps"] = steps
        self.state["plan_budget"] = [self.cfg.time_budget, self.cfg.steps]
        self.log(f"planned {steps} steps for the {self.cfg.time_budget:g}s budget ({how})")

    # ---- training
    def progress(self) -> float:
        """The fraction of the planned steps done."""
        return self.state["step"] / max(self.total, 1)

    def done(self) -> bool:
        state, cfg = self.state, self.cfg
        return state["step"] >= self.total or bool(
            cfg.time_budget and state["train_time"] >= OVERRUN_LIMIT * cfg.time_budget)

    def _checkpoint_state(self) -> dict[str, Any]:
        return {"counters": dict(self.state), "curve": _thin(self.curve, 2000),
                "numpy_rng": self.rng.bit_generator.state, "torch_rng": self.torch_rng.cpu}

    def step(self) -> None:
        cfg, state = self.cfg, self.state
        if self.bar is None:
            raise RuntimeError("open_bar() first")
        lr = lr_at(cfg, state["step"], self.total)
        for g in self.opt.param_groups:
            g["lr"] = lr
        with self.torch_rng.active():
            out, loss, (b, cu), dt = _train_step(self.model, self.opt, cfg, self.corpus.train, self.rng, self.device)
        bpb = float(out["nll"].detach()) / LN2 / out["n_bytes"]
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {state['step']}")
        n_words = out["n_words"]
        if n_words is None:  # byte LM: count the words of the same text, for words/s
            n_words = word_boundaries(b, cu, cfg.count_words_mwb, "space")[0].numel() - 1
        state["step"] += 1
        state["train_time"] += dt
        state["bytes"] += int(out["n_bytes"])
        state["words"] += int(n_words)
        state["backbone_tokens"] += int(out["backbone_tokens"])
        state["seqs"] += int(out["n_seqs"])
        ema_loss = state["ema_loss"] = loss if state["ema_loss"] is None else 0.95 * state["ema_loss"] + 0.05 * loss
        ema_bpb = state["ema_bpb"] = bpb if state["ema_bpb"] is None else 0.95 * state["ema_bpb"] + 0.05 * bpb
        self.curve.append((state["train_time"], ema_bpb))
        self.bar.update(1)
        self.bar.set_postfix({"loss": f"{ema_loss:.3f}", "bpb": f"{ema_bpb:.3f}",
                              "B/s": f"{state['bytes'] / state['train_time']:.0f}", "lr": f"{lr:.1e}"},
                             refresh=False)
        if self.ckpt_path and state["train_time"] - self.last_save >= cfg.save_every:
            self._save()
            self.last_save = state["train_time"]

    def _save(self) -> None:
        save_checkpoint(self.ckpt_path, self.model, self.opt, self._checkpoint_state(), self.cfg)
        self.saved_step = self.state["step"]

    def save_interrupted(self) -> None:
        """After an interrupt between steps: save the steps done (if cfg.out), and say so."""
        step = self.state["step"]
        if not self.ckpt_path:
            self.log(f"interrupted at step {step}: nothing saved (no out folder)")
            return
        if self.saved_step != step:
            self._save()
        self.log(f"interrupted at step {step}: saved in {self.ckpt_path}; resume continues from there")

    def open_bar(self, position: int = 0) -> None:
        self.bar = _make_bar(self.cfg, self.state["step"], self.total, position)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    # ---- the end
    def finish(self) -> dict[str, Any]:
        """Saves the final checkpoint, evaluates on the held-out windows and returns the
        report; torch's random state is left where this run's draws brought it."""
        cfg, state, model = self.cfg, self.state, self.model
        if state["step"] < self.total:
            self.log(f"stopped at step {state['step']} of the {self.total} planned: the steps ran slower than "
                     f"timed, and {state['train_time']:.0f}s is {OVERRUN_LIMIT:g}x the {cfg.time_budget:g}s budget")
        write_error = None  # a checkpoint or report that cannot be written: raised after the report is logged
        if self.ckpt_path:
            try:
                self._save()
            except OutputWriteError as e:
                write_error = e
        self.torch_rng.make_global()
        windows = heldout_windows(self.corpus.heldout, cfg.eval_windows, cfg.seq_len)
        # (no more windows at once than a training step holds: a run whose batch was
        # lowered to fit memory must not run out of it in its final evaluation)
        ev = evaluate(model, windows, min(cfg.eval_batch_size, cfg.batch_size), self.device)
        tt = max(state["train_time"], 1e-9)
        report = {
            "model": cfg.model,
            "params": self.n_params,
            "heldout_bpb": ev["bpb"],
            "heldout_windows": ev["windows"],
            "heldout_bytes": ev["bytes"],
            "train_bpb_ema": state["ema_bpb"],
            "train_loss_ema": state["ema_loss"],
            "steps": state["step"],
            "planned_steps": state["planned_steps"],
            "train_time_s": state["train_time"],
            "train_bytes": state["bytes"],
            "bytes_per_s": state["bytes"] / tt,
            "words_per_s": state["words"] / tt,
            "bytes_per_word": state["bytes"] / max(state["words"], 1),
            "backbone_seq_len": state["backbone_tokens"] / max(state["seqs"], 1),
            "seq_len": cfg.seq_len,
            "batch_size": cfg.batch_size,
            "device": str(self.device),
            "precision": cfg.precision,
            "torch_threads": torch.get_num_threads(),
            "model_config": asdict(model.config),
            "corpus": self.corpus.describe(),
            "curve": _thin(self.curve, 200),
        }
        if cfg.out and write_error is None:
            try:
                write_text(Path(cfg.out) / "report.json", json.dumps(report, indent=2) + "\n")
            except OutputWriteError as e:
                write_error = e
        if write_error is not None:  # the run's result is not lost with its files
            self.log(format_report(report))
            raise write_error
        report["_model"] = model  # for callers in the same process (not serialized)
        return report


class Stopped(KeyboardInterrupt):
    """A run stopped by SIGTERM or SIGHUP (a job scheduler's stop or time limit, `timeout`,
    a closed terminal) and saved, as Ctrl-C stops it; `signum` is the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Stopped(signum)


# The signals held during a step, each with the handler it must have for us to take it
# over (one that the program or `nohup` set is left alone).
_HELD_SIGNALS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
if hasattr(signal, "SIGHUP"):
    _HELD_SIGNALS[signal.SIGHUP] = signal.SIG_DFL


class _HeldInterrupts:
    """Holds a Ctrl-C (SIGINT), SIGTERM or SIGHUP that comes during a training step until
    the step is done (`pending`: the signal's number), so that the run can save whole
    steps: stopped inside the optimizer's step, a model would be half updated. A second
    signal interrupts at once. Only where the default handler is in place, in the main
    thread (where signals arrive)."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "_HeldInterrupts":
        if threading.current_thread() is threading.main_thread():
            for signum, default in _HELD_SIGNALS.items():
                if signal.getsignal(signum) == default:
                    self.previous[signum] = signal.signal(signum, self._hold)
        return self

    def _hold(self, signum, frame) -> None:
        if self.pending is not None:
            raise _interrupt(signum)
        self.pending = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _take_turns(runs: list[_Run], save_on_interrupt: bool = False) -> None:
    """Plans and trains `runs` taking turns, a step at a time: first their timed steps in
    turn, then their training steps, always the run with the smallest fraction of its plan
    done. So the runs share the machine's speed changes (on a shared VM they move step
    times by 20% within minutes) instead of one meeting a fast machine and the next a
    slow one; a plan made from the first steps can still miss for all of them. Alone, a
    run just plans and trains. Ctrl-C, SIGTERM or SIGHUP stops the runs after the step in
    progress (and, with save_on_interrupt, saves each one's checkpoint), then raises
    KeyboardInterrupt (Stopped, a subclass, for SIGTERM and SIGHUP)."""
    timers = [(run, run.step_timer()) for run in runs]
    timers = [(run, timer) for run, timer in timers if timer is not None]
    try:
        _time_in_turns([timer for _, timer in timers])
    except KeyboardInterrupt:  # (the timed steps are thrown away anyway: no new step to save)
        for run, _ in timers:
            run.log(f"interrupted while timing steps, before training step {run.state['step'] + 1}: "
                    "no new step to save")
        raise
    for run, timer in timers:
        run.plan(timer)
    del timers  # the timers' model copies
    interrupted = None  # the signal that stopped the runs
    try:
        for position, run in enumerate(runs):
            run.open_bar(position)
        with _HeldInterrupts() as held:
            while True:
                left = [run for run in runs if not run.done()]
                if not left:
                    break
                min(left, key=_Run.progress).step()
                if held.pending is not None:
                    interrupted = held.pending
                    break
    finally:
        for run in runs:
            run.close_bar()
    if interrupted is not None:
        if save_on_interrupt:
            for run in runs:
                run.save_interrupted()
        raise _interrupt(interrupted)


def train(cfg: TrainConfig, corpus: Corpus | None = None, resume: bool | str | os.PathLike = False,
          log: Callable[[str], None] = print, overwrite: bool = False) -> dict[str, Any]:
    """Train one model; returns the report dict (see `format_report`).

    resume: False; True (the checkpoint in `cfg.out`); or a checkpoint file / run folder.
    A resumed run keeps its training settings (`RUN_SETTINGS`, from its checkpoint; the
    log names any that cfg sets otherwise) and, when cfg gives no steps or time_budget,
    its budget. Resuming another run's checkpoint into a `cfg.out` that holds a run of
    its own raises UsageError (it would replace that run).
    overwrite: start a new run even if `cfg.out` holds one (its checkpoint and report are
    replaced); without it, or resume, such a folder raises UsageError before any work.
    Ctrl-C (SIGTERM, SIGHUP) stops after the step in progress, saves a checkpoint of the
    steps done (in `cfg.out`) and raises KeyboardInterrupt (Stopped for SIGTERM and
    SIGHUP). A checkpoint or report that cannot be written raises OutputWriteError
    (after logging the report).
    """
    run = _Run(cfg, corpus, resume, log, overwrite)
    _take_turns([run], save_on_interrupt=True)
    return run.finish()


def _thin(points: list, n: int) -> list:
    """At most n points, evenly spaced by index, the first and last included."""
    if len(points) <= n:
        return list(points)
    return [points[round(i * (len(points) - 1) / (n - 1))] for i in range(n)]


def format_report(r: dict[str, Any]) -> str:
    unit = "words" if r["model"] == "hier" else "bytes"
    lines = [
        f"model                 {r['model']}",
        f"parameters            {r['params'] / 1e6:.2f}M",
        f"held-out bits/byte    {r['heldout_bpb']:.4f}  ({r['heldout_windows']} windows, {r['heldout_bytes']} bytes)",
        f"train bits/byte (ema) {r['train_bpb_ema']:.4f}" if r.get("train_bpb_ema") is not None else None,
        f"steps                 {r['steps']}  ({r['train_time_s']:.1f}s, {r['train_bytes'] / 1e6:.2f} MB)",
        f"throughput            {r['bytes_per_s']:.0f} bytes/s, {r['words_per_s']:.0f} words/s",
        f"backbone seq length   {r['backbone_seq_len']:.1f} {unit} per sequence ({r['seq_len']} bytes)",
        f"device                {r['device']} ({r.get('precision', 'fp32')})",
    ]
    return "\n".join(x for x in lines if x is not None)


# ------------------------------------------------------------------ comparison
_COMPARE_ROWS = [
    ("held-out bits/byte", lambda r: f"{r['heldout_bpb']:.4f}"),
    ("train bytes/s", lambda r: f"{r['bytes_per_s']:.0f}"),
    ("train words/s", lambda r: f"{r['words_per_s']:.0f}"),
    ("parameters", lambda r: f"{r['params'] / 1e6:.2f}M"),
    ("backbone seq length", lambda r: f"{r['backbone_seq_len']:.1f} {'words' if r['model'] == 'hier' else 'bytes'}"),
    ("steps", lambda r: f"{r['steps']}"),
    ("train time", lambda r: f"{r['train_time_s']:.0f}s"),
    ("bytes trained", lambda r: f"{r['train_bytes'] / 1e6:.2f} MB"),
]


def format_compare(reports: list[dict[str, Any]], markdown: bool = False) -> str:
    head = ["metric"] + [r["model"] for r in reports]
    rows = [[name] + [fn(r) for r in reports] for name, fn in _COMPARE_ROWS]
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(out)
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def compare_chart(reports: list[dict[str, Any]], budget: str = "same time budget") -> str:
    """SVG learning curves: each model's training bits/byte (EMA) against seconds trained,
    and its held-out bits/byte as a dot at the end. `budget` names what the runs shared."""
    series = {f"{r['model']} (train, EMA)": r.get("curve", []) for r in reports}
    points = {f"{r['model']} held-out": (r["train_time_s"], r["heldout_bpb"]) for r in reports}
    return line_chart_svg(series, points=points, title=f"hierarchical vs byte-level LM, {budget}",
                          x_label="seconds trained", y_label="bits per byte")


def compare(base: TrainConfig, out: str | os.PathLike | None = None, log: Callable[[str], None] = print,
            models: tuple[str, ...] = ("hier", "byte"), overwrite: bool = False) -> dict[str, Any]:
    """Train each model of `models` with the same data, budget and settings; print and
    write (`out`/compare.json, compare.md, compare.svg) a side-by-side table and learning
    curves. The byte LM is sized to the hierarchical model's parameter count. The models
    time their steps and train in turns, a step at a time (`_take_turns`), so that a time
    budget means the same machine for each; each model's result is that of its run alone.

    overwrite: replace the results of an earlier compare in `out`; without it such a
    folder raises UsageError before any training."""
    if out and not overwrite:
        check_holds_no_run(out, compare_run_files(models), "the results of a compare",
                           "pass overwrite=True to replace them, or another out")
    for kind in models:  # each model's run goes into a folder of that name
        if out and (Path(out) / kind).exists() and not (Path(out) / kind).is_dir():
            raise UsageError(f"{Path(out) / kind} exists and is not a folder (out holds each model's run in one)")
    corpus = load_corpus(base.data, base.holdout_every, base.data_pattern, base.max_data_bytes)
    log_corpus(corpus, log)
    hier_cfg = resolve_model_config("hier", base.size, base.model_config)
    runs = []
    for kind in models:
        mc = asdict(hier_cfg) if kind == "hier" else asdict(matched_byte_config(hier_cfg))
        if base.model_config.get("max_context_bytes") is None:
            del mc["max_context_bytes"]  # unset: the run gives it its window length
        # count_words_mwb: the byte model's words are counted as the hierarchical model's
        cfg = dataclasses.replace(base, model=kind, model_config=mc, count_words_mwb=hier_cfg.max_word_bytes,
                                  out=str(Path(out) / kind) if out else None)
        runs.append(_Run(cfg, corpus, False, lambda line, kind=kind: log(f"[{kind}] {line}"),
                         overwrite=True))  # (checked above for the whole compare)
    # the models take turns, a step at a time, so that the machine's speed changes
    # reach both alike: each one's steps are still what they would be alone
    log(f"timing, then training, {' and '.join(models)} in turns, a step at a time")
    _take_turns(runs, save_on_interrupt=True)  # (Ctrl-C: each model's run is kept, and can go on alone)
    reports = []
    for kind, run in zip(models, runs):
        r = run.finish()
        r.pop("_model", None)
        log(f"\n== {kind} ==")
        log(format_report(r))
        reports.append(r)
    table = format_compare(reports)
    log("\n" + table)
    result = {"reports": reports, "table": table,
              "settings": {k: v for k, v in asdict(base).items() if k not in ("model", "out")}}
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "compare.json", json.dumps(result, indent=2, default=str) + "\n")
        # each model trains until the first of its limits is reached
        limits = [f"{base.time_budget:g}s"] if base.time_budget else []
        limits += [f"{base.steps} step{'s' * (base.steps != 1)}"] if base.steps else []
        md = [f"# tokcore compare (budget {' or '.join(limits)} per model, "
              f"{base.batch_size} x {base.seq_len} bytes/step, device {reports[0]['device']}, "
              f"{base.precision})", "",
              format_compare(reports, markdown=True), "", f"corpus: {corpus.describe()}", ""]
        budget = ("same time budget" if not base.steps else "same steps" if not base.time_budget
                  else "same budget (steps or time)")
        write_text(out / "compare.svg", compare_chart(reports, budget))
        md[2:2] = ["![held-out and training bits/byte against training time](compare.svg)", ""]
        write_text(out / "compare.md", "\n".join(md))
        log(f"wrote {out / 'compare.json'}, {out / 'compare.md'} and {out / 'compare.svg'} (learning curves)")
    return result

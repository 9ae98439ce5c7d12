"""End-to-end demos, one per op family, quick on a CPU.

Each family registers a function with :func:`register_demo`; ``tokcore demo`` runs them
all in order (or the ones named with ``--only``). A demo function takes a
:class:`DemoOptions` and prints what it shows.

To add a family's demo::

    @register_demo("chunking", "H-Net dynamic chunking on a sentence")
    def demo_chunking(opts: DemoOptions) -> None:
        ...
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

__all__ = ["DemoOptions", "Demo", "DEMOS", "register_demo", "run_demos"]


@dataclass
class DemoOptions:
    device: str = "auto"
    seconds: float = 45.0   # training time budget of demos that train something
    seed: int = 0
    progress: bool = True


@dataclass(frozen=True)
class Demo:
    name: str
    description: str
    run: Callable[[DemoOptions], None]


DEMOS: list[Demo] = []


def register_demo(name: str, description: str) -> Callable[[Callable[[DemoOptions], None]], Callable[[DemoOptions], None]]:
    def deco(fn: Callable[[DemoOptions], None]) -> Callable[[DemoOptions], None]:
        if any(d.name == name for d in DEMOS):
            raise ValueError(f"demo {name!r} is already registered")
        DEMOS.append(Demo(name, description, fn))
        return fn

    return deco


def _header(text: str) -> None:
    print(f"\n{'=' * 72}\n{text}\n{'=' * 72}")


# ---------------------------------------------------------------------------- pooling
@register_demo("pooling", "word boundaries on a sentence; train a tiny hierarchical byte LM; sample from it")
def demo_pooling(opts: DemoOptions) -> None:
    import torch

    import tokcore  # noqa: F401  (loads the ops)
    from tokcore.data import load_corpus
    from tokcore.pooling.ops import segment_reduce, word_boundaries
    from tokcore.pooling.train import TrainConfig, format_report, train

    text = "Hello, world! Tokenizer-free models pool bytes into words: naïve café, 東京タワー, x_1+=y2."
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)
    cu = torch.tensor([0, data.numel()], dtype=torch.int64)
    offsets, word_cu = word_boundaries(data, cu, 8, "space")
    bounds = offsets.tolist()
    words = [bytes(data[a:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]
    print(f"sentence: {text!r}  ({data.numel()} bytes)")
    print(f"word_boundaries(max_word_bytes=8, mode='space') -> {len(words)} words:")
    print("  " + " | ".join(repr(w.decode("utf-8", errors="backslashreplace")) for w in words))
    print(f"  word_offsets = {bounds}")
    lengths = segment_reduce(torch.ones(data.numel(), 1), offsets, "sum").squeeze(1)
    print(f"  segment_reduce(ones, word_offsets, 'sum') = bytes per word {lengths.int().tolist()}")

    cfg = TrainConfig(model="hier", size="tiny", time_budget=opts.seconds, seq_len=256, batch_size=16,
                      lr=3e-3, warmup_steps=10, eval_windows=32, device=opts.device, seed=opts.seed,
                      progress=opts.progress)
    print(f"\ntraining a tiny HierarchicalByteLM for {opts.seconds:.0f}s on the Python stdlib's source:")
    corpus = load_corpus()
    print(f"corpus: {corpus.describe()}")
    report = train(cfg, corpus)
    model = report.pop("_model")
    print(format_report(report))
    prompt = b"def __init__(self"
    gen = torch.Generator().manual_seed(opts.seed)
    sample = model.generate(prompt, max_new_bytes=160, temperature=0.7, top_k=20, generator=gen)
    print("\nsample (temperature 0.7, top-k 20):")
    print((prompt + sample).decode("utf-8", errors="replace"))


# ---------------------------------------------------------------------------- runner
def run_demos(names: list[str] | None = None, opts: DemoOptions | None = None) -> None:
    opts = opts or DemoOptions()
    known = {d.name: d for d in DEMOS}
    unknown = [n for n in (names or []) if n not in known]
    if unknown:
        raise SystemExit(f"unknown demo(s) {unknown}; available: {sorted(known)}")
    for demo in ([known[n] for n in dict.fromkeys(names)] if names else DEMOS):  # (each named demo once)
        _header(f"demo {demo.name}: {demo.description}")
        t0 = time.perf_counter()
        demo.run(opts)
        print(f"\n[demo {demo.name} took {time.perf_counter() - t0:.0f}s]")

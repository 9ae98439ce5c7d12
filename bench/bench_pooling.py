"""pooling benchmarks: tokcore against torch's own segment ops, side by side.

  python bench/bench_pooling.py                 # CPU: the issue's workload
  python bench/bench_pooling.py --device cuda   # GPU: T = 2^21, D = 512 bf16
  python bench/bench_pooling.py --quick         # tiny sizes (CI smoke run)

A second table times each op with a run-time switch on and off: streaming stores
on the CPU, the offsets check on CUDA; a third, the models' generation with the
cache of keys and values against without it.

Each row times tokcore and a peer on the same inputs in this process and prints
peer time / tokcore time, plus achieved GB/s against a large copy timed in the
same rounds (the copy ceiling measured at the start is noted too).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import tokcore  # noqa: E402
from tokcore.data import list_files, sample_batch, stdlib_dir  # noqa: E402
from tokcore.pooling.lm import build_model  # noqa: E402
from tokcore.pooling.train import resolve_model_config  # noqa: E402
from tokcore.pooling import segment_expand, segment_pack, segment_reduce, segment_unpack, word_boundaries  # noqa: E402,E501


def warmup_seconds(device: torch.device, quick: bool) -> float:
    """Seconds each timed call is warmed up for (harness.time_fn then waits for steady
    times as well): the CPU VMs here need seconds before large outputs stop faulting;
    a GPU settles within a few calls, and the GPU check has minutes in all."""
    return 0.0 if quick else 1.0 if device.type == "cuda" else 3.0


def offsets_of_lengths(lengths: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """Offsets of segments of these lengths, the last one cut (or the list ended) at total."""
    cum = torch.cumsum(lengths, 0)
    cum = cum[cum < total]
    return torch.cat([torch.zeros(1, dtype=torch.int64), cum, torch.tensor([total])]).to(device)


def random_offsets(total: int, low: int, high: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return offsets_of_lengths(torch.randint(low, high + 1, (total // low + 1,), generator=g), total, device)


LONG_ROWS, LONG_EVERY = 2048, 1000
WORDS_AND_LONG = f"words + every {LONG_EVERY}th segment {LONG_ROWS} rows"


def words_and_long_offsets(total: int, device: torch.device) -> torch.Tensor:
    """Words of 1..9 rows, every LONG_EVERY-th segment (the first included) LONG_ROWS
    rows instead: long segments (sentences, documents) among many short ones, which
    CUDA reduces in blocks and the words with a thread each."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 10, (total // 5 + 1,), generator=g)
    lengths[::LONG_EVERY] = LONG_ROWS
    return offsets_of_lengths(lengths, total, device)


# How far a peer's result may be from tokcore's, as a share of the largest |value| of
# tokcore's: the two sum in different orders, and torch's CPU segment_reduce sums bf16
# in bf16 (a few roundings apart on words; far apart on segments of 10^5 rows).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -8}


def _chunks(t: torch.Tensor, n: int = 1 << 24):
    flat = t.detach().reshape(-1)
    return (flat[i:i + n].float() for i in range(0, flat.numel(), n))  # no full-size float copies


def difference(expected: object, got: object, dtype: torch.dtype) -> str | None:
    """None if a peer's result (a tensor, or a tuple as autograd.grad returns) equals
    tokcore's within TOLERANCE, else how it differs."""
    expected, got = ([r] if isinstance(r, torch.Tensor) else list(r) for r in (expected, got))
    for e, g in zip(expected, got, strict=True):
        if e.shape != g.shape:
            return f"shape {tuple(g.shape)}, not {tuple(e.shape)}"
        scales, diffs = [], []
        for a, b in zip(_chunks(e), _chunks(g.to(e.device))):  # one pass: each chunk made float once
            scales.append(a.abs().max().item())
            diffs.append((a - b).abs().max().item())
        scale = max(scales, default=0.0)
        diff = float("nan") if any(d != d for d in diffs) else max(diffs, default=0.0)  # (max() drops a late NaN)
        if not diff <= TOLERANCE[dtype] * scale:  # (NaN: differs)
            return f"largest difference {diff:.3g}, largest value {scale:.3g}"  # (no '|': a table cell)
    return None


def untied(x: torch.Tensor, offsets: torch.Tensor) -> Callable[[object], object]:
    """For comparing max backwards: the gradient with the rows that tie for their
    segment's maximum zeroed. tokcore gives the gradient to the first; torch's
    segment_reduce splits it among them, or (seen on CPU, f32) gives all of it to
    each; a few ties occur in 2^28 random f32 values, many in bf16."""
    x = x.detach()
    at_max = x == segment_expand(segment_reduce(x, offsets, "max"), offsets, x.shape[0])
    alone = segment_expand(segment_reduce(at_max.to(x.dtype), offsets, "sum"), offsets, x.shape[0]) == 1
    keep = ~at_max | alone
    return lambda r: (r if isinstance(r, torch.Tensor) else r[0]) * keep


def checked_peers(tok: Callable[[], object], peers: dict[str, Callable[[], object]], dtype: torch.dtype,
                  same: Callable[[object], object] = lambda r: r) -> dict[str, str]:
    """Each peer's name as the table shows it: marked where its result differs from
    tokcore's (compared through `same`, once, before timing), since then the two do
    not do the same work and the ratio says little."""
    expected = same(tok())
    labels = {}
    for peer, fn in peers.items():
        why = difference(expected, same(fn()), dtype)
        labels[peer] = peer if why is None else f"{peer} (RESULT DIFFERS: {why})"
        if why is not None:
            print(f"bench_pooling: {peer} differs from tokcore: {why}", file=sys.stderr)
    return labels


def bench_segment_reduce(T: int, D: int, dtype: torch.dtype, device: torch.device, copy: harness.CopyProbe,
                         table: harness.Table, quick: bool) -> None:
    offsets = random_offsets(T, 1, 9, device)
    S = offsets.numel() - 1
    lengths = offsets.diff()
    segment_ids = torch.repeat_interleave(torch.arange(S, device=device), lengths)
    x = torch.randn(T, D, dtype=dtype, device=device, requires_grad=True)
    fwd_bytes = (T + S) * D * x.element_size()
    timing = dict(rounds=2 if quick else 7, warmup_seconds=warmup_seconds(device, quick))
    name = str(dtype).replace("torch.", "")

    def add_rows(workload: str, tok: Callable[[], object], peers: dict[str, Callable[[], object]],
                 nbytes: int = fwd_bytes, same: Callable[[object], object] = lambda r: r) -> None:
        labels = checked_peers(tok, peers, dtype, same)
        # tokcore, its peers and the copy take turns call by call (see
        # harness.time_interleaved), so all see the same memory bandwidth
        times = harness.time_interleaved({"tokcore": tok, **peers, COPY: copy.call}, device, **timing)
        t_tok, copy_rate = times.pop("tokcore"), copy.nbytes / times.pop(COPY)
        for peer, t_peer in times.items():
            table.add(f"{workload} {name}", labels[peer], t_tok * 1e3, t_peer * 1e3, t_peer / t_tok,
                      harness.gbps(nbytes, t_tok), copy_rate / 1e9, f"{100 * nbytes / t_tok / copy_rate:.0f}%")

    def tok():
        return segment_reduce(x, offsets, "mean")

    # The peers called the fastest way measured: in place into a fresh zeros output
    # (the out-of-place scatter_reduce/index_reduce clone it first: 1.5-1.8x slower
    # on the CPU). tokcore returns a fresh output too (from its CPU output cache),
    # so the "reused buffer" row adds the peer at its strongest: writing into one
    # buffer that the caller keeps, with no allocation at all.
    scatter_index = segment_ids[:, None].expand(T, D)
    peers = {
        "torch.segment_reduce": lambda: torch.segment_reduce(x, "mean", lengths=lengths, axis=0),
        "index_reduce_": lambda: torch.zeros(S, D, dtype=dtype, device=device).index_reduce_(
            0, segment_ids, x, "mean", include_self=False),
        "scatter_reduce_": lambda: torch.zeros(S, D, dtype=dtype, device=device).scatter_reduce_(
            0, scatter_index, x, "mean", include_self=False),
    }
    if device.type == "cuda":  # the GPU target is stated against torch.segment_reduce only
        peers = {"torch.segment_reduce": peers["torch.segment_reduce"]}
    reused = torch.empty(S, D, dtype=dtype, device=device)
    forward_only_peers = {} if device.type == "cuda" else {
        "scatter_reduce_ into a reused buffer": lambda: reused.zero_().scatter_reduce_(
            0, scatter_index, x, "mean", include_self=False),
    }
    with torch.no_grad():
        add_rows("segment_reduce mean fwd", tok, {**peers, **forward_only_peers})

    # A few long segments (8 sequences: pooling each into one vector), which the GPU
    # reduces in blocks of rows. Equal lengths, so torch's own mean over a view is a peer.
    seqs = 8
    seq_offsets = torch.arange(0, T + 1, T // seqs, device=device)
    seq_lengths = seq_offsets.diff()
    with torch.no_grad():
        add_rows(f"segment_reduce mean fwd, {seqs} segments", lambda: segment_reduce(x, seq_offsets, "mean"), {
            "torch.segment_reduce": lambda: torch.segment_reduce(x, "mean", lengths=seq_lengths, axis=0),
            "x.view(8, T / 8, D).mean(1)": lambda: x.view(seqs, T // seqs, D).mean(1),
        }, nbytes=(T + seqs) * D * x.element_size())

    # Long segments among words: on CUDA the offsets check measures the longest
    # segment, and only the segments longer than a block go to the blocks.
    mixed = words_and_long_offsets(T, device)
    mixed_lengths = mixed.diff()
    with torch.no_grad():
        add_rows(f"segment_reduce mean fwd, {WORDS_AND_LONG}", lambda: segment_reduce(x, mixed, "mean"), {
            "torch.segment_reduce": lambda: torch.segment_reduce(x, "mean", lengths=mixed_lengths, axis=0),
        }, nbytes=(T + mixed.numel() - 1) * D * x.element_size())

    # vmap over groups of features that share the offsets (heads, say): tokcore's vmap
    # rule folds the groups back into the features, one call; torch's segment_reduce
    # under vmap, and a loop of calls over the groups, are the peers.
    groups = 8
    x_groups = x.detach().view(T, groups, D // groups)
    with torch.no_grad():
        add_rows(f"segment_reduce mean fwd, vmap over {groups} feature groups",
                 lambda: torch.vmap(lambda t: segment_reduce(t, offsets, "mean"), in_dims=1)(x_groups), {
                     "torch.vmap(torch.segment_reduce)": lambda: torch.vmap(
                         lambda t: torch.segment_reduce(t, "mean", lengths=lengths, axis=0), in_dims=1)(x_groups),
                     "loop over the groups (tokcore)": lambda: torch.stack(
                         [segment_reduce(x_groups[:, g], offsets, "mean") for g in range(groups)]),
                 })

    # backward: the gradient through each op's own autograd graph, built once
    grad = torch.randn(S, D, dtype=dtype, device=device)

    def backward_of(y_graph: torch.Tensor) -> Callable[[], object]:
        return lambda: torch.autograd.grad(y_graph, x, grad, retain_graph=True)

    add_rows("segment_reduce mean bwd", backward_of(tok()), {peer: backward_of(fn()) for peer, fn in peers.items()})
    # max: the gradient goes to the first row attaining each feature's maximum, so
    # the backward reads x and the result too
    add_rows("segment_reduce max bwd", backward_of(segment_reduce(x, offsets, "max")), {
        "torch.segment_reduce": backward_of(torch.segment_reduce(x, "max", lengths=lengths, axis=0))},
        nbytes=2 * fwd_bytes, same=untied(x, offsets))

    # segment_expand: each row gets its segment's row; the torch peer is a gather.
    y = torch.randn(S, D, dtype=dtype, device=device)
    expanded = torch.empty(T, D, dtype=dtype, device=device)
    with torch.no_grad():
        add_rows("segment_expand fwd", lambda: segment_expand(y, offsets, T), {
            "index_select": lambda: y.index_select(0, segment_ids),
            "index_select into a reused buffer": lambda: torch.index_select(y, 0, segment_ids, out=expanded),
        })

    # One segment (a whole sequence): on the CPU its rows are shared out over all
    # threads in pieces, on CUDA over row parts; torch's own broadcast copy and max
    # over dim 0 are the peers.
    whole = torch.tensor([0, T], device=device)
    with torch.no_grad():
        add_rows("segment_expand fwd, 1 segment", lambda: segment_expand(y[:1], whole, T), {
            "y.expand(T, D).contiguous()": lambda: y[:1].expand(T, D).contiguous()},
            nbytes=(T + 1) * D * x.element_size())
    # (on CUDA the max backward of a few long segments runs in two passes over row parts)
    grad_one = grad[:1]

    def backward_one(y_graph: torch.Tensor) -> Callable[[], object]:
        return lambda: torch.autograd.grad(y_graph, x, grad_one, retain_graph=True)

    add_rows("segment_reduce max bwd, 1 segment", backward_one(segment_reduce(x, whole, "max")),
             {"x.max(0) backward": backward_one(x.max(0, keepdim=True).values)},
             nbytes=2 * (T + 1) * D * x.element_size(), same=untied(x, whole))


def pooling_workloads(T: int, D: int, dtype: torch.dtype, device: torch.device) -> dict[str, tuple]:
    """Each pooling op once, for the on/off tables: name -> (call, bytes read + written)."""
    offsets = random_offsets(T, 1, 9, device)
    S = offsets.numel() - 1
    x = torch.randn(T, D, dtype=dtype, device=device)
    y = torch.randn(S, D, dtype=dtype, device=device)
    packed = segment_pack(x, offsets, 8)
    mixed = words_and_long_offsets(T, device)
    name, size = str(dtype).replace("torch.", ""), x.element_size()
    ops = torch.ops.tokcore
    return {
        f"segment_reduce mean fwd {name}": (lambda: ops.segment_reduce(x, offsets, "mean"), (T + S) * D * size),
        f"segment_reduce mean fwd, {WORDS_AND_LONG} {name}": (
            lambda: ops.segment_reduce(x, mixed, "mean"), (T + mixed.numel() - 1) * D * size),
        f"segment_reduce mean bwd {name}": (
            lambda: ops.segment_reduce_backward(y, offsets, T, "mean", x, y), (T + S) * D * size),
        f"segment_expand fwd {name}": (lambda: segment_expand(y, offsets, T), (T + S) * D * size),
        f"segment_pack fwd {name} (max_len 8)": (lambda: segment_pack(x, offsets, 8), (T + 8 * S) * D * size),
        f"segment_unpack fwd {name} (max_len 8)": (lambda: segment_unpack(packed, offsets, T), 2 * T * D * size),
    }


def lm_train_step_workload(device: torch.device, quick: bool) -> dict[str, tuple]:
    """One training step of HierarchicalByteLM like those of `tokcore train` (forward,
    backward, AdamW step, loss read back; no gradient clipping), on stdlib text: what a
    switch costs a whole step, syncs and small launches included. Bytes moved are not
    counted (None)."""
    size, batch, seq_len = ("tiny", 2, 64) if quick else ("small", 16, 512)
    model = build_model("hier", asdict(resolve_model_config("hier", size))).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    text = np.frombuffer(stdlib_text(max(4 * batch * seq_len, 1 << 20)), dtype=np.uint8)
    rng = np.random.default_rng(0)
    batches = [sample_batch(text, batch, seq_len, rng, device) for _ in range(8)]
    step_count = [0]

    def step():
        b, cu = batches[step_count[0] % len(batches)]
        step_count[0] += 1
        out = model(b, cu)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        return float(out["loss"].detach())

    return {f"HierarchicalByteLM train step ({size}, {batch} x {seq_len} bytes, f32)": (step, None)}


def bench_generation(device: torch.device, table: harness.Table, quick: bool) -> None:
    """`generate` of both models (untrained, the same sizes as `tokcore compare`'s) with
    the cache of keys and values and without it (the whole context run again for each
    byte), calls taking turns. The prompt of stdlib text and the new bytes just fill
    the context of max_context_bytes (the training window), so that neither path
    drops any of it: the two make the same bytes from the same contexts (the cached
    path would restart from half of a full context)."""
    size, context, new_bytes = ("tiny", 64, 8) if quick else ("small", 512, 64)
    hier_config = asdict(resolve_model_config("hier", size))
    models = {"hier": build_model("hier", {**hier_config, "max_context_bytes": context}),
              "byte": build_model("byte", {**asdict(resolve_model_config("byte", size)),
                                           "max_context_bytes": context})}
    # the byte model's positions: BOS + prompt + the new bytes but the last (whose
    # successor is not asked for); the hierarchical model's words: prompt + new bytes,
    # with a byte of room
    prompt = stdlib_text(context - 1 - new_bytes)
    for kind, model in models.items():
        model.to(device).eval()

        def run(use_cache: bool, model=model) -> bytes:
            return model.generate(prompt, new_bytes, temperature=0, use_cache=use_cache)

        run(True), run(False)  # warm-up: caches of rotary tables, the allocator, kernels
        times = harness.time_interleaved({"cached": lambda: run(True), "uncached": lambda: run(False)}, device,
                                         rounds=1 if quick else 3, warmup_seconds=0.0)
        table.add(f"{type(model).__name__}.generate ({size}, {new_bytes} bytes, context {context} bytes)",
                  "use_cache=False", times["cached"] * 1e3, times["uncached"] * 1e3,
                  times["uncached"] / times["cached"], new_bytes / times["cached"], new_bytes / times["uncached"])


def row_width_workloads(T: int, device: torch.device) -> dict[str, tuple]:
    """The reduce forward and max backward on narrow rows, where the widest CPU
    variant would leave much of each row to scalar code: name -> (call, bytes)."""
    offsets = random_offsets(T, 1, 9, device)
    S = offsets.numel() - 1
    ops = torch.ops.tokcore
    workloads = {}
    for dtype, D in ((torch.float32, 8), (torch.float32, 40), (torch.bfloat16, 24), (torch.float16, 24)):
        x = torch.randn(T, D, dtype=dtype, device=device)
        grad_y = torch.randn(S, D, dtype=dtype, device=device)
        y = ops.segment_reduce(x, offsets, "max")
        name, size = f"{str(dtype).replace('torch.', '')}, D={D}", x.element_size()
        workloads[f"segment_reduce mean fwd {name}"] = (
            lambda x=x: ops.segment_reduce(x, offsets, "mean"), (T + S) * D * size)
        workloads[f"segment_reduce max bwd {name}"] = (
            lambda x=x, y=y, g=grad_y: ops.segment_reduce_backward(g, offsets, T, "max", x, y), 2 * (T + S) * D * size)
    return workloads


def bench_narrow_rows(T: int, device: torch.device, table: harness.Table, quick: bool) -> None:
    """Per-word scalars and small vectors expanded to every row of their word, the
    mean backward, which writes the same rows, the forward (per-byte scores pooled
    into words) and, for rows of at most 16 bytes, the max backward: rows of a few
    bytes, where a segment's bytes cost less than stepping from one segment to the next."""
    offsets = random_offsets(T, 1, 9, device)
    S = offsets.numel() - 1
    lengths = offsets.diff()
    segment_ids = torch.repeat_interleave(torch.arange(S, device=device), lengths)
    ops = torch.ops.tokcore
    timing = dict(rounds=2 if quick else 9, warmup_seconds=warmup_seconds(device, quick))
    for dtype, D in ((torch.float32, 1), (torch.float32, 4), (torch.float32, 8), (torch.bfloat16, 1),
                     (torch.bfloat16, 4), (torch.bfloat16, 8), (torch.bfloat16, 16)):
        name, size = f"{str(dtype).replace('torch.', '')}, D={D}", dtype.itemsize
        y = torch.randn(S, D, dtype=dtype, device=device)
        reused = torch.empty(T, D, dtype=dtype, device=device)
        x = torch.randn(T, D, dtype=dtype, device=device, requires_grad=True)
        pooled = torch.segment_reduce(x, "mean", lengths=lengths, axis=0)
        nbytes = (T + S) * D * size
        rows = [
            ("segment_reduce mean fwd", lambda x=x: ops.segment_reduce(x.detach(), offsets, "mean"), {
                "torch.segment_reduce": lambda x=x: torch.segment_reduce(x.detach(), "mean", lengths=lengths, axis=0)},
             nbytes),
            ("segment_expand fwd", lambda y=y: ops.segment_expand(y, offsets, T), {
                "index_select": lambda y=y: y.index_select(0, segment_ids),
                "index_select into a reused buffer":
                    lambda y=y, out=reused: torch.index_select(y, 0, segment_ids, out=out)}, nbytes),
            ("segment_reduce mean bwd", lambda y=y: ops.segment_reduce_backward(y, offsets, T, "mean"), {
                "torch.segment_reduce": lambda y=y, p=pooled, x=x: torch.autograd.grad(p, x, y, retain_graph=True)},
             nbytes),
        ]
        if D * size <= 16:  # the rows whose max backward AVX-512 CPUs take 16 elements at a time
            result = ops.segment_reduce(x.detach(), offsets, "max")
            pooled_max = torch.segment_reduce(x, "max", lengths=lengths, axis=0)
            rows.append(("segment_reduce max bwd",
                         lambda y=y, x=x, r=result: ops.segment_reduce_backward(y, offsets, T, "max", x.detach(), r), {
                             "torch.segment_reduce":
                                 lambda y=y, p=pooled_max, x=x: torch.autograd.grad(p, x, y, retain_graph=True)},
                         2 * nbytes))  # reads x, y and grad_y, writes grad_x
        for workload, tok, peers, moved in rows:
            labels = checked_peers(tok, peers, dtype, untied(x, offsets) if "max" in workload else lambda r: r)
            times = harness.time_interleaved({"tokcore": tok, **peers}, device, **timing)
            t_tok = times.pop("tokcore")
            for peer, t_peer in times.items():
                table.add(f"{workload} {name}", labels[peer], t_tok * 1e3, t_peer * 1e3, t_peer / t_tok,
                          harness.gbps(moved, t_tok))


def bench_setting_on_off(variable: str, on: str | None, off: str, workloads: dict[str, tuple],
                         device: torch.device, table: harness.Table, quick: bool) -> None:
    """Each workload with the environment variable set to `on` (None: unset) and to
    `off` (tokcore.reload_settings() before each call), calls taking turns so that
    both see the same memory bandwidth; the ratio is off time / on time."""
    def with_setting(value: str | None, fn: Callable[[], object]) -> Callable[[], object]:
        def call():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value
            tokcore.reload_settings()
            return fn()
        return call

    saved = os.environ.get(variable)
    try:
        for workload, (fn, nbytes) in workloads.items():
            times = harness.time_interleaved({"on": with_setting(on, fn), "off": with_setting(off, fn)}, device,
                                             rounds=3 if quick else 15, warmup_seconds=0.0 if quick else 1.0)
            rates = [harness.gbps(nbytes, times[k]) if nbytes else "-" for k in ("on", "off")]
            table.add(workload, f"{variable}={off}", times["on"] * 1e3, times["off"] * 1e3,
                      times["off"] / times["on"], *rates)
    finally:
        if saved is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = saved
        tokcore.reload_settings()


def stdlib_text(nbytes: int) -> bytes:
    """The Python standard library's own sources, repeated up to nbytes."""
    chunks, size = [], 0
    for path in list_files(stdlib_dir(), "*.py"):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= nbytes:
            break
    text = b"".join(chunks)
    return (text * (nbytes // max(len(text), 1) + 1))[:nbytes]


WORD_RE = re.compile(rb"[ \t\n\r\v\f]*[^ \t\n\r\v\f]*")  # a rough regex splitter, for scale only


def unbroken_text(nbytes: int) -> bytes:
    """One word of nbytes: random A, C, G, T, as in an unwrapped DNA sequence. No byte
    after the first starts a word, so the op only cuts it every max_word_bytes, and the
    word spans every work chunk of the CPU kernel (64 KB) and of the CUDA one."""
    g = torch.Generator().manual_seed(0)
    return bytes(torch.tensor(list(b"ACGT"), dtype=torch.uint8)[torch.randint(0, 4, (nbytes,), generator=g)].numpy())


def bench_word_boundaries(text: bytes, label: str, device: torch.device, table: harness.Table, quick: bool) -> None:
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(device)
    cu = torch.tensor([0, len(text)], dtype=torch.int64, device=device)
    runs = dict(min_runs=2 if quick else 3, min_seconds=0.0, warmup_seconds=warmup_seconds(device, quick))
    t_tok = harness.time_fn(lambda: word_boundaries(data, cu, 16, "space"), device, **runs)
    sample = text[: min(len(text), 10_000_000)]
    t_re = harness.time_fn(lambda: sum(1 for _ in WORD_RE.finditer(sample)), torch.device("cpu"), warmup=0,
                           min_runs=1, min_seconds=0.0)
    mbps_tok = len(text) / t_tok / 1e6
    mbps_re = len(sample) / t_re / 1e6
    table.add(f"word_boundaries {len(text) / 1e6:.0f} MB {label}", "re.finditer (whitespace split)",
              t_tok * 1e3, t_re * 1e3 * len(text) / len(sample), mbps_tok / mbps_re, f"{mbps_tok:.0f} MB/s", "-",
              "-")


# The run-time switch that each device's second table turns on and off:
# ((variable, on value, off value), what it is, (name of on, name of off), note).
ON_OFF_TABLES = {
    "cpu": (("TOKCORE_CPU_STREAM_MIN_MB", "0", "1000000"), "CPU streaming stores for large outputs",
            ("streamed", "plain"), "same op, same inputs; TOKCORE_CPU_STREAM_MIN_MB=0 (streamed) against 1000000 "
            "(plain stores: no output is that large), calls alternating; unpack never streams (a control)"),
    "cuda": (("TOKCORE_CUDA_CHECK_OFFSETS", "1", "0"), "CUDA offsets check (a small kernel and a host sync per call)",
             ("checked", "unchecked"), "same op, same inputs; the default (offsets validated) against "
             "TOKCORE_CUDA_CHECK_OFFSETS=0, calls alternating; unchecked, the reduce does not know the longest "
             "segment, so a thread walks each long one among the words"),
}


# The GPU targets (H200, T = 2^21, D = 512 bf16): share of the device-copy
# bandwidth measured in the same rounds.
COPY = "copy"  # the copy's name among the calls timed together
SHARE_COLUMN = "tokcore of copy"
GPU_TARGETS = {"segment_reduce mean fwd": 0.85, "segment_reduce mean bwd": 0.80, "segment_expand fwd": 0.80}


def target_notes(table: harness.Table, targets: dict[str, float], unchecked: harness.Table | None = None,
                 ceiling: float = 0.0) -> list[str]:
    """One line per target: the workload's share of the copy bandwidth measured in
    the same rounds (as users call it: offsets checked), met or not; and, from the
    on/off table, the share of the kernels alone (TOKCORE_CUDA_CHECK_OFFSETS=0) of
    the copy ceiling measured at the start."""
    notes = []
    share_column = table.columns.index(SHARE_COLUMN)
    for prefix, goal in targets.items():
        shares = [float(row[share_column].rstrip("%")) / 100 for row in table.rows if row[0].startswith(prefix + " ")]
        if not shares:
            notes.append(f"target {prefix} >= {goal:.0%}: NOT MEASURED")
            continue
        share = min(shares)
        note = f"target {prefix} >= {goal:.0%} of copy: {share:.0%} {'met' if share >= goal else 'NOT MET'}"
        alone = [float(row[6]) * 1e9 / ceiling for row in (unchecked.rows if unchecked else [])
                 if row[0].startswith(prefix + " ") and ceiling > 0]
        if alone:
            note += f" (offsets check off: {min(alone):.0%})"
        notes.append(note)
    return notes


class _Stopped(Exception):
    """Raised in the main thread by SIGTERM, so that main can save what it measured."""


def _stop_on_sigterm(signum, frame):
    raise _Stopped()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--no-save", action="store_true", help="do not append to bench/results/")
    parser.add_argument("--only", action="append", default=None, metavar="NAME",
                        help="run only the steps whose name holds NAME (repeatable; names as in the progress "
                             "bar, e.g. 'generation', 'word_boundaries', 'segment ops bfloat16'); the copy "
                             "ceiling is measured all the same")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    if device.type == "cuda":
        T, D, dtypes, text_bytes = (1 << 21), 512, [torch.bfloat16], 100_000_000
    else:
        T, D, dtypes, text_bytes = (1 << 20), 256, [torch.float32, torch.bfloat16], 100_000_000
    if args.quick:
        T, D, text_bytes = 1 << 12, 32, 1 << 16

    # The copy: 1 GB on a GPU; 256 MB on a CPU, far past the caches, and small enough
    # that the CPU output cache keeps both its output and tokcore's largest (1 GB).
    copy_bytes = (1 << 22) if args.quick else (1 << 30) if device.type == "cuda" else (1 << 28)
    ceiling, copy = harness.copy_bandwidth(device, nbytes=copy_bytes,
                                           warmup_seconds=warmup_seconds(device, args.quick))
    table = harness.Table(
        f"pooling on {harness.machine_kind(device)} (T={T}, D={D}, word lengths 1..9)",
        ["workload", "peer", "tokcore ms", "peer ms", "speedup (peer/tokcore)", "tokcore GB/s or MB/s",
         "copy GB/s, same rounds", SHARE_COLUMN],
    )
    table.notes.append(f"copy: {copy.how}, {copy.nbytes / 2**20:.0f} MB read + written, timed in the same rounds "
                       f"as each row's calls; {ceiling / 1e9:.1f} GB/s at the start of the run")
    table.notes.append("GB/s counts bytes read + written once: fwd reads T*D and writes S*D; "
                       "mean bwd and expand the reverse; max bwd both")
    table.notes.append("each peer's result is compared with tokcore's before timing; one that differs is "
                       "marked RESULT DIFFERS (max backward: tied maxima aside)")
    if device.type == "cpu":
        # (a shortcut the peers lack, so said where the ratios are: measured, torch.segment_reduce's
        # mean backward takes 262k faults a call, 1 GB of fresh pages, tokcore's none)
        table.notes.append("tokcore's outputs of 16 MB or more come warm from its output cache; the peers' "
                           "come fresh from torch's allocator, page faults included, except in the rows "
                           "'into a reused buffer'")
        read = harness.read_bandwidth_cpu(nbytes=(1 << 30) if not args.quick else (1 << 22),
                                          warmup_seconds=0.0 if args.quick else 3.0)
        floors = ", ".join(f"{str(dt).replace('torch.', '')} {T * D * dt.itemsize / read * 1e3:.3g} ms"
                           for dt in dtypes)
        table.notes.append(f"read-only bandwidth measured at the start: {read / 1e9:.1f} GB/s, so reading the "
                           f"forward's input alone takes at least {floors}")
    steps = [(f"segment ops {dtype}".replace("torch.", ""),
              lambda dtype=dtype: bench_segment_reduce(T, D, dtype, device, copy, table, args.quick))
             for dtype in dtypes]
    steps.append(("word_boundaries", lambda: bench_word_boundaries(stdlib_text(text_bytes), "stdlib text", device,
                                                                   table, args.quick)))
    # (10 MB on CUDA, where one thread cuts the whole word: at an assumed worst of 100 ns
    # a byte, 100 MB would take the GPU check's whole benchmark budget)
    one_word_bytes = min(text_bytes, 10_000_000) if device.type == "cuda" else text_bytes
    steps.append(("word_boundaries, one word", lambda: bench_word_boundaries(
        unbroken_text(one_word_bytes), "of one word (ACGT...)", device, table, args.quick)))
    tables = [table]
    setting, what, (on_name, off_name), note = ON_OFF_TABLES[device.type]
    on_off = harness.Table(f"{what}, on and off (T={T}, D={D})",
                           ["workload", "compared with", f"{on_name} ms", f"{off_name} ms",
                            f"ratio ({off_name}/{on_name})", f"{on_name} GB/s", f"{off_name} GB/s"])
    on_off.notes.append(note)
    tables.append(on_off)
    steps += [(f"{setting[0]} on/off {dtype}".replace("torch.", ""),
               lambda dtype=dtype: bench_setting_on_off(*setting, pooling_workloads(T, D, dtype, device), device,
                                                        on_off, args.quick)) for dtype in dtypes]
    steps.append((f"{setting[0]} on/off, a training step",
                  lambda: bench_setting_on_off(*setting, lm_train_step_workload(device, args.quick), device, on_off,
                                               args.quick)))
    generation = harness.Table("generation with the cache of keys and values, and without it (greedy)",
                               ["workload", "compared with", "cached ms", "uncached ms", "ratio (uncached/cached)",
                                "cached bytes/s", "uncached bytes/s"])
    generation.notes.append("untrained models of `tokcore compare`'s size (their bytes are noise, their cost is "
                            "not); a prompt of stdlib text that, with the new bytes, just fills the context, so "
                            "that both paths see the same contexts, growing to the whole; without the cache the "
                            "byte-level model runs its whole context for every byte, the hierarchical model its "
                            "context's words for every word and the word's bytes for every byte")
    tables.append(generation)
    steps.append(("generation", lambda: bench_generation(device, generation, args.quick)))
    if device.type == "cpu" and tokcore.cpu_isa() == "avx512":
        # the reduce's variant chosen per row width (TOKCORE_CPU_ISA unset) against the
        # AVX-512 build forced for every width
        rows = (1 << 14) if args.quick else (1 << 22)
        by_width = harness.Table(f"CPU kernel variant chosen by row width, against AVX-512 forced (T={rows})",
                                 ["workload", "compared with", "chosen ms", "AVX-512 ms", "ratio (AVX-512/chosen)",
                                  "chosen GB/s", "AVX-512 GB/s"])
        by_width.notes.append("same op, same inputs; TOKCORE_CPU_ISA unset (the variant whose vectors fit the row: "
                              "AVX2 for f32 D=8 and 40 and f16 D=24, baseline for bf16 D=24) against "
                              "TOKCORE_CPU_ISA=avx512, calls alternating; same bits either way")
        tables.append(by_width)
        steps.append(("CPU variant by row width", lambda: bench_setting_on_off(
            "TOKCORE_CPU_ISA", None, "avx512", row_width_workloads(rows, device), device, by_width, args.quick)))
    if device.type == "cpu":
        rows = (1 << 14) if args.quick else (1 << 22)
        narrow = harness.Table(f"narrow rows: per-word scalars and small vectors (T={rows}, word lengths 1..9)",
                               ["workload", "peer", "tokcore ms", "peer ms", "speedup (peer/tokcore)", "tokcore GB/s"])
        narrow.notes.append("on AVX-512 CPUs the forward of 1, 2, 4 or 8 features of at most 16 bytes reduces 16 "
                            "words at a time through transposes of whole rows, and their max backward takes "
                            "16 elements of a word with one load, compare and store "
                            "(csrc/pooling/pooling_cpu_reduce.cpp); expand and the sum/mean backward write rows "
                            "of 2 to 32 bytes in runs of one segment's row repeated, spilling into "
                            "the next segment's rows (csrc/pooling/pooling_cpu_segments.h); GB/s counts T*D + S*D "
                            "for the forward, S*D read + T*D written for expand and the mean backward, twice that "
                            "for the max backward; tokcore's outputs under 16 MB (its output cache's threshold) and "
                            "index_select's come fresh from the allocator, page faults included; the reused-buffer "
                            "peer's do not")
        tables.append(narrow)
        steps.append(("narrow rows", lambda: bench_narrow_rows(rows, device, narrow, args.quick)))
    if args.only:
        names = [name for name, _ in steps]
        steps = [(name, run) for name, run in steps if any(part in name for part in args.only)]
        if not steps:
            parser.error(f"--only {' '.join(args.only)}: no step's name holds it; the steps: {', '.join(names)}")
    printed = [0] * len(tables)
    # A run stopped by SIGTERM (the GPU check's `timeout`) still prints and saves the
    # tables of the steps it finished, saying so.
    name = "(before the first)"
    previous_handler = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        with tqdm(steps, desc="bench pooling", unit="workload", disable=args.quick) as bar:
            for name, run in bar:
                bar.set_postfix_str(name)
                run()
                # each row as soon as it is measured, so that a run stopped early (the GPU
                # check's time limit) still leaves its numbers in the log
                for i, t in enumerate(tables):
                    for row in t.rows[printed[i]:]:
                        bar.write("| " + " | ".join(row) + " |")
                    printed[i] = len(t.rows)
                if device.type == "cuda" and name.startswith("segment ops"):  # the targets, as soon as known
                    for note in target_notes(table, GPU_TARGETS, None, ceiling):
                        bar.write(note)
    except _Stopped:
        table.notes.append(f"STOPPED EARLY (SIGTERM) during step '{name}': only the rows above were measured")
        print(f"\nbench_pooling: stopped (SIGTERM) during step '{name}'; printing what was measured",
              file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    if device.type == "cuda":
        table.notes.extend(target_notes(table, GPU_TARGETS, on_off, ceiling))
    tables = [t for t in tables if t.rows]  # --only: the tables of the steps that ran
    for t in tables:
        print(t.markdown())
    if not args.no_save and not args.quick:
        command = "python bench/bench_pooling.py" + (f" --device {args.device}" if device.type != "cpu" else "")
        command += "".join(f" --only '{part}'" for part in args.only or [])
        print("results appended to", harness.write_results(tables, device, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())

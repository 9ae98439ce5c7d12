"""Readable pure-PyTorch reference implementations of the pooling ops.

These follow DESIGN.md section 5 (pooling) and docs/pooling_api.md literally and are
written for clarity, not speed: Python loops over bytes and segments are fine here.
They are the ground truth that tests/test_pooling.py compares the compiled ops against.

Conventions:
- offsets are CSR-style int64 tensors: offsets[0] == 0, non-decreasing, offsets[-1] == T.
- feature ops accumulate in float32 (float64 for float64 inputs) and cast the result back
  to the input dtype.
- every function takes and returns tensors on the CPU or on any device (it moves data to
  the CPU to compute and moves results back to the input's device).
"""

from __future__ import annotations

import torch

# Whitespace per DESIGN.md: space, \t, \n, \r, \v, \f (and nothing else: not 0x1c-0x1f,
# not 0x85, not 0xa0, unlike Python's str.isspace).
WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")


def byte_class(b: int) -> str:
    """'space', 'word' or 'punct' for one byte value, per DESIGN.md."""
    if b in WHITESPACE:
        return "space"
    if (
        ord("a") <= b <= ord("z")
        or ord("A") <= b <= ord("Z")
        or ord("0") <= b <= ord("9")
        or b == ord("_")
        or b >= 0x80
    ):
        return "word"
    return "punct"


def is_utf8_char_start(b: int) -> bool:
    """True unless b is a UTF-8 continuation byte (10xxxxxx)."""
    return (b & 0xC0) != 0x80


def _offsets_list(offsets: torch.Tensor) -> list[int]:
    return [int(v) for v in offsets.detach().cpu().tolist()]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------
# word_boundaries
# ----------------------------------------------------------------------------------------


def split_words(data: bytes, max_word_bytes: int = 16, mode: str = "space") -> list[int]:
    """Word start positions (relative to data) of ONE sequence.

    Returns the sorted list of start positions; an empty sequence has no words.
    """
    n = len(data)
    if max_word_bytes < 4:  # in either mode, as the op checks it
        raise ValueError("max_word_bytes must be >= 4")
    if mode == "bytes":
        return list(range(n))
    if mode != "space":
        raise ValueError(f"unknown mode {mode!r}")

    # 1. word starts from the byte classes
    starts = []
    for i in range(n):
        if i == 0:
            starts.append(i)  # each sequence start
            continue
        here, prev = byte_class(data[i]), byte_class(data[i - 1])
        if here == "space" and prev != "space":
            starts.append(i)  # whitespace byte preceded by a non-whitespace byte
        elif here == "word" and prev == "punct":
            starts.append(i)  # word byte preceded by a punctuation byte

    # 2. cut every word longer than max_word_bytes greedily from the left
    result = []
    ends = starts[1:] + [n]
    for word_start, word_end in zip(starts, ends):
        piece_start = word_start
        result.append(piece_start)
        while word_end - piece_start > max_word_bytes:
            limit = piece_start + max_word_bytes
            # the LAST character start strictly after the piece's first byte and at or
            # before the limit; the limit itself if there is none (invalid UTF-8)
            cut = limit
            for c in range(limit, piece_start, -1):
                if is_utf8_char_start(data[c]):
                    cut = c
                    break
            piece_start = cut
            result.append(piece_start)
    return result


def word_boundaries(
    bytes_: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_word_bytes: int = 16,
    mode: str = "space",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for tokcore.pooling.word_boundaries.

    bytes_ uint8 [T], cu_seqlens int64 [B+1] -> (word_offsets int64 [W+1] into the flat
    stream, word_cu_seqlens int64 [B+1] cumulative word counts per sequence).
    """
    device = bytes_.device
    data = bytes(bytes_.detach().cpu().tolist())
    cu = _offsets_list(cu_seqlens)
    word_offsets: list[int] = []
    word_cu = [0]
    for b in range(len(cu) - 1):
        lo, hi = cu[b], cu[b + 1]
        starts = split_words(data[lo:hi], max_word_bytes, mode)
        word_offsets.extend(lo + s for s in starts)
        word_cu.append(word_cu[-1] + len(starts))
    word_offsets.append(len(data))
    return (
        torch.tensor(word_offsets, dtype=torch.int64, device=device),
        torch.tensor(word_cu, dtype=torch.int64, device=device),
    )


def split_into_words(data: bytes, cu: list[int], max_word_bytes: int = 16,
                     mode: str = "space") -> list[list[bytes]]:
    """Convenience for readable tests: the words of each sequence as bytes objects."""
    out = []
    for b in range(len(cu) - 1):
        seq = data[cu[b]:cu[b + 1]]
        starts = split_words(seq, max_word_bytes, mode)
        ends = starts[1:] + [len(seq)]
        out.append([seq[s:e] for s, e in zip(starts, ends)])
    return out


# ----------------------------------------------------------------------------------------
# segment_reduce (+ its backward)
# ----------------------------------------------------------------------------------------

REDUCES = ("sum", "mean", "max", "min")


def _segment_max_or_min(seg: torch.Tensor, reduce: str) -> torch.Tensor:
    """Per-feature max/min of seg [n, D] (n >= 1) where NaN wins."""
    out = seg.amax(0) if reduce == "max" else seg.amin(0)
    # amax/amin already propagate NaN; spell it out so the rule is visible here
    return torch.where(seg.isnan().any(0), torch.full_like(out, float("nan")), out)


def segment_reduce(x: torch.Tensor, offsets: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Reference for segment_reduce: x [T, *feat] -> y [S, *feat]; empty segment gives 0."""
    if reduce not in REDUCES:
        raise ValueError(f"unknown reduce {reduce!r}")
    offs = _offsets_list(offsets)
    acc = _acc_dtype(x.dtype)
    xa = x.detach().to(acc)
    rows = []
    for s in range(len(offs) - 1):
        seg = xa[offs[s]:offs[s + 1]]
        n = seg.shape[0]
        if n == 0:
            rows.append(torch.zeros(x.shape[1:], dtype=acc, device=x.device))
        elif reduce == "sum":
            rows.append(seg.sum(0))
        elif reduce == "mean":
            rows.append(seg.sum(0) / n)
        else:
            rows.append(_segment_max_or_min(seg, reduce))
    if not rows:
        return torch.zeros((0,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    return torch.stack(rows).to(x.dtype)


def first_attaining_index(seg: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Per feature, the first row of seg [n, D] equal to value [D] (NaN matches NaN)."""
    hits = (seg == value) | (seg.isnan() & value.isnan())
    # argmax over a bool->int tensor gives the first maximal (i.e. first True) index
    return hits.to(torch.int64).argmax(0)


def segment_reduce_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    offsets: torch.Tensor,
    reduce: str,
) -> torch.Tensor:
    """Reference gradient of segment_reduce with respect to x.

    sum:  every position gets its segment's grad_y row.
    mean: every position gets grad_y / len.
    max/min: the FIRST position of the segment that attains the result (per feature)
             gets grad_y; all others get 0.
    """
    offs = _offsets_list(offsets)
    acc = _acc_dtype(x.dtype)
    g = grad_y.detach().to(acc)
    xa = x.detach().to(acc)
    ya = y.detach().to(acc)
    grad_x = torch.zeros(x.shape, dtype=acc, device=x.device)
    for s in range(len(offs) - 1):
        lo, hi = offs[s], offs[s + 1]
        n = hi - lo
        if n == 0:
            continue
        if reduce == "sum":
            grad_x[lo:hi] = g[s]
        elif reduce == "mean":
            grad_x[lo:hi] = g[s] / n
        elif reduce in ("max", "min"):
            seg = xa[lo:hi].reshape(n, -1)
            first = first_attaining_index(seg, ya[s].reshape(-1))
            flat = torch.zeros_like(seg)
            flat[first, torch.arange(seg.shape[1])] = g[s].reshape(-1)
            grad_x[lo:hi] = flat.reshape((n,) + tuple(x.shape[1:]))
        else:
            raise ValueError(f"unknown reduce {reduce!r}")
    return grad_x.to(x.dtype)


# ----------------------------------------------------------------------------------------
# segment_expand, segment_pack, segment_unpack
# ----------------------------------------------------------------------------------------


def segment_expand(y: torch.Tensor, offsets: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Reference: y [S, *feat] -> x [T, *feat], x[t] = y[segment of t]."""
    offs = _offsets_list(offsets)
    T = offs[-1] if total is None else total
    x = torch.zeros((T,) + tuple(y.shape[1:]), dtype=y.dtype, device=y.device)
    for s in range(len(offs) - 1):
        x[offs[s]:offs[s + 1]] = y[s].detach()
    return x


def segment_expand_backward(grad_x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Gradient of segment_expand w.r.t. y: a segment sum of grad_x."""
    return segment_reduce(grad_x, offsets, "sum")


def segment_pack(x: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    """Reference: x [T, *feat] -> packed [S, max_len, *feat].

    packed[s, i] = x[offsets[s] + i] for i < min(len_s, max_len), zeros elsewhere.
    """
    offs = _offsets_list(offsets)
    S = len(offs) - 1
    packed = torch.zeros((S, max_len) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    for s in range(S):
        n = min(offs[s + 1] - offs[s], max_len)
        packed[s, :n] = x[offs[s]:offs[s] + n].detach()
    return packed


def segment_unpack(packed: torch.Tensor, offsets: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Reference: packed [S, L, *feat] -> x [T, *feat].

    x[offsets[s] + i] = packed[s, i] for i < min(len_s, L); zeros at positions i >= L.
    """
    offs = _offsets_list(offsets)
    T = offs[-1] if total is None else total
    L = packed.shape[1]
    x = torch.zeros((T,) + tuple(packed.shape[2:]), dtype=packed.dtype, device=packed.device)
    for s in range(len(offs) - 1):
        n = min(offs[s + 1] - offs[s], L)
        x[offs[s]:offs[s] + n] = packed[s, :n].detach()
    return x

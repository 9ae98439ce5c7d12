"""Python wrappers, fake kernels and autograd of the pooling ops.

The kernels are ``torch.ops.tokcore.<name>`` (C++/CUDA, csrc/pooling/). Offsets are
CSR-style int64 tensors: ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == T``.
Features may be float32, float64, bfloat16 or float16; results keep the input
dtype and are accumulated in float32 (float64 for float64). Every op is
deterministic (no atomics). Every op validates its offsets fully and raises
an error that names them. On CUDA that check is a small kernel and a host sync;
it is skipped while a CUDA graph is being captured (no sync is allowed there) and
when the environment variable ``TOKCORE_CUDA_CHECK_OFFSETS=0`` is set, for
callers whose offsets are known good and who want no sync. Unchecked invalid
offsets give unspecified values, but the kernels never read or write out of
bounds.
"""

from __future__ import annotations

import math

import torch

_ops = torch.ops.tokcore


def word_boundaries(
    data: torch.Tensor | bytes | bytearray | str,
    cu_seqlens: torch.Tensor | None = None,
    max_word_bytes: int = 16,
    mode: str = "space",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split UTF-8 byte streams into words.

    Args:
        data: uint8 [T], the sequences concatenated (``bytes``, or ``str`` encoded as
            UTF-8, are accepted too).
        cu_seqlens: int64 [B+1] sequence offsets into ``data``; None means one sequence.
        max_word_bytes: words longer than this (>= 4) are cut greedily from the left
            at the last UTF-8 character start within the limit.
        mode: ``"space"``: a word starts at each sequence start, at each whitespace
            byte after a non-whitespace byte and at each word byte (letter, digit,
            ``_``, any byte >= 0x80) after a punctuation byte ("Hello, world!" ->
            "Hello," + " world!"). ``"bytes"``: every byte is a word.

    Returns:
        (word_offsets int64 [W+1] into ``data``, word_cu_seqlens int64 [B+1]: the
        number of words before each sequence). Words never cross sequences.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    if isinstance(data, (bytes, bytearray)):
        data = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, data.numel()], dtype=torch.int64, device=data.device)
    return _ops.word_boundaries(data, cu_seqlens, max_word_bytes, mode)


def _as_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """[T, *F] -> [T, prod(F)] (no -1: it is ambiguous for tensors with no elements)."""
    if x.dim() < 1:
        raise ValueError(f"tokcore: {name} must have at least 1 dimension (rows), got a scalar")
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def segment_reduce(x: torch.Tensor, offsets: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Reduce the rows of each segment: x [T, *F] -> [S, *F].

    reduce is sum, mean, max or min; an empty segment gives 0. max/min propagate
    NaN, and their gradient goes to the first row that attains the result.
    Differentiable in x.

    On CUDA each thread reduces one segment's rows, in order, for 16 bytes of
    features: the same summation order as on the CPU, so the results match bit
    for bit. The forward is therefore fast when segments are many (words:
    S * D * itemsize / 16 threads or more fill the GPU); a few long segments (one
    per sequence) leave most of the GPU idle. The sum/mean backward splits long
    segments' rows over more threads.
    """
    y = _ops.segment_reduce(_as_rows(x, "x"), offsets, reduce)
    return y.reshape((y.shape[0],) + tuple(x.shape[1:]))


def segment_expand(y: torch.Tensor, offsets: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Give each row its segment's row: y [S, *F] -> [T, *F].

    ``total`` (= T = offsets[-1]) spares reading offsets[-1] back to the host
    (on CUDA a sync; with the offsets check off, none is left).
    Causal shifts (each byte sees the previous word) are done on y before
    expanding. Differentiable in y (the backward is a segment sum).
    """
    x = _ops.segment_expand(_as_rows(y, "y"), offsets, total)
    return x.reshape((x.shape[0],) + tuple(y.shape[1:]))


def segment_pack(x: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    """Pack segments into a padded batch: x [T, *F] -> [S, max_len, *F].

    Rows past a segment's length are zero; rows past max_len are dropped.
    Differentiable in x (the backward is segment_unpack).
    """
    packed = _ops.segment_pack(_as_rows(x, "x"), offsets, max_len)
    return packed.reshape(tuple(packed.shape[:2]) + tuple(x.shape[1:]))


def segment_unpack(packed: torch.Tensor, offsets: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Inverse of segment_pack: packed [S, L, *F] -> [T, *F].

    Rows of a segment past L (dropped by packing) come back as zeros.
    Differentiable in packed (the backward is segment_pack).
    """
    if packed.dim() < 2:
        raise ValueError(f"tokcore: packed must have at least 2 dimensions [S, L, ...], got {packed.dim()}")
    flat = packed.reshape(packed.shape[0], packed.shape[1], math.prod(packed.shape[2:]))
    x = _ops.segment_unpack(flat, offsets, total)
    return x.reshape((x.shape[0],) + tuple(packed.shape[2:]))


# ---------------------------------------------------------------- fake kernels


@torch.library.register_fake("tokcore::word_boundaries")
def _word_boundaries_fake(data, cu_seqlens, max_word_bytes, mode):
    # The output length W + 1 itself is the unbacked size (>= 1): compile cannot
    # return a size expression (u0 + 1) whose symbol it never sees bare.
    num_offsets = torch.library.get_ctx().new_dynamic_size(min=1)
    return (
        data.new_empty(num_offsets, dtype=torch.int64),
        data.new_empty(cu_seqlens.shape[0], dtype=torch.int64),
    )


@torch.library.register_fake("tokcore::segment_reduce")
def _segment_reduce_fake(x, offsets, reduce):
    return x.new_empty(offsets.shape[0] - 1, x.shape[1])


@torch.library.register_fake("tokcore::segment_reduce_backward")
def _segment_reduce_backward_fake(grad_y, offsets, total, reduce, x=None, y=None):
    return grad_y.new_empty(total, grad_y.shape[1])


def _rows_fake(total):
    return torch.library.get_ctx().new_dynamic_size() if total is None else total


@torch.library.register_fake("tokcore::segment_expand")
def _segment_expand_fake(y, offsets, total=None):
    return y.new_empty(_rows_fake(total), y.shape[1])


@torch.library.register_fake("tokcore::segment_pack")
def _segment_pack_fake(x, offsets, max_len):
    return x.new_empty(offsets.shape[0] - 1, max_len, x.shape[1])


@torch.library.register_fake("tokcore::segment_unpack")
def _segment_unpack_fake(packed, offsets, total=None):
    return packed.new_empty(_rows_fake(total), packed.shape[2])


# ---------------------------------------------------------------- autograd


def _segment_reduce_setup(ctx, inputs, output):
    x, offsets, reduce = inputs
    ctx.reduce = reduce
    ctx.total = x.shape[0]
    if reduce in ("max", "min"):
        ctx.save_for_backward(offsets, x, output)
    else:  # sum/mean need only the offsets: do not keep x alive
        ctx.save_for_backward(offsets)


def _segment_reduce_backward(ctx, grad):
    offsets, *values = ctx.saved_tensors
    x, y = values if values else (None, None)
    grad_x = _ops.segment_reduce_backward(grad, offsets, ctx.total, ctx.reduce, x, y)
    return grad_x, None, None


torch.library.register_autograd(
    "tokcore::segment_reduce", _segment_reduce_backward, setup_context=_segment_reduce_setup
)


def _segment_expand_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _segment_expand_backward(ctx, grad):
    (offsets,) = ctx.saved_tensors
    return _ops.segment_reduce(grad, offsets, "sum"), None, None


torch.library.register_autograd(
    "tokcore::segment_expand", _segment_expand_backward, setup_context=_segment_expand_setup
)


def _segment_pack_setup(ctx, inputs, output):
    x, offsets, _ = inputs
    ctx.total = x.shape[0]
    ctx.save_for_backward(offsets)


def _segment_pack_backward(ctx, grad):
    (offsets,) = ctx.saved_tensors
    return _ops.segment_unpack(grad, offsets, ctx.total), None, None


torch.library.register_autograd("tokcore::segment_pack", _segment_pack_backward, setup_context=_segment_pack_setup)


def _segment_unpack_setup(ctx, inputs, output):
    packed, offsets, _ = inputs
    ctx.max_len = packed.shape[1]
    ctx.save_for_backward(offsets)


def _segment_unpack_backward(ctx, grad):
    (offsets,) = ctx.saved_tensors
    return _ops.segment_pack(grad, offsets, ctx.max_len), None, None


torch.library.register_autograd(
    "tokcore::segment_unpack", _segment_unpack_backward, setup_context=_segment_unpack_setup
)

"""Python wrappers, fake kernels and autograd of the pooling ops.

The kernels are ``torch.ops.tokcore.<name>`` (C++/CUDA, csrc/pooling/). Offsets are
CSR-style int64 tensors: ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == T``.
Features may be float32, float64, bfloat16 or float16; results keep the input
dtype and are accumulated in float32 (float64 for float64). Every op is
deterministic (no float atomics). Every op validates its offsets fully and raises
an error that names them. On CUDA that check is a small kernel and a host sync;
it is skipped while a CUDA graph is being captured (no sync is allowed there) and
when the environment variable ``TOKCORE_CUDA_CHECK_OFFSETS=0`` is set (read when
tokcore is imported and by ``tokcore.reload_settings()``, not by each call), for
callers whose offsets are known good and who want no sync. One call skips it
with ``check_offsets=False``; the backward passes do so, since they reuse offsets
that their forward checked (autograd's version counter refuses offsets changed in
place since). Unchecked invalid offsets give unspecified values, but the kernels
never read or write out of bounds. CPU offsets are always checked: there the
check costs no sync.
"""

from __future__ import annotations

import builtins
import math
import numbers

import torch
from torch.autograd import forward_ad

_ops = torch.ops.tokcore


def _through_function(t: torch.Tensor, op: str) -> bool:
    """Whether a wrapper calls its autograd.Function (end of this file) rather than
    the raw op: where a derivative may be taken in eager mode (t requires grad, a
    forward-mode dual level or a torch.func transform is active). Elsewhere the raw op
    spares the Function's cost (about 15 us a call). Under torch.compile, which cannot
    trace a Function with a jvp, always the raw op and its registered autograd: that
    has no forward-mode formula (torch.library has no jvp registration for custom
    ops) and would drop a tangent silently, and tangents are not visible while
    tracing, so a dual level is refused there."""
    if torch.compiler.is_compiling():
        if forward_ad._current_level >= 0:
            raise NotImplementedError(f"tokcore.{op}: forward-mode AD is not supported under torch.compile "
                                      "(called inside forward_ad.dual_level()); run it eagerly, or use reverse mode")
        return False
    return ((t.requires_grad and torch.is_grad_enabled()) or forward_ad._current_level >= 0
            or torch._C._are_functorch_transforms_active())


def word_boundaries(
    bytes: torch.Tensor | builtins.bytes | bytearray | str,  # noqa: A002 (the op's own name, DESIGN.md §2)
    cu_seqlens: torch.Tensor | None = None,
    max_word_bytes: int = 16,
    mode: str = "space",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split UTF-8 byte streams into words.

    Args:
        bytes: uint8 [T], the sequences concatenated (Python ``bytes``, or ``str``
            encoded as UTF-8, are accepted too).
        cu_seqlens: int64 [B+1] sequence offsets into ``bytes``; None means one sequence.
        max_word_bytes: words longer than this (>= 4, checked in either mode) are cut
            greedily from the left: each cut at the last UTF-8 character start after
            the piece's first byte and at or before the limit (at the limit itself
            where there is none, as in invalid UTF-8).
        mode: ``"space"``: whitespace bytes are space, \\t, \\n, \\r, \\v and \\f; word
            bytes are ASCII letters and digits, ``_`` and every byte >= 0x80; all other
            bytes are punctuation. A word starts at each sequence start, at each
            whitespace byte after a non-whitespace byte and at each word byte after a
            punctuation byte ("Hello, world!" -> "Hello," + " world!").
            ``"bytes"``: every byte is a word. Any byte sequence is valid input.

    Returns:
        (word_offsets int64 [W+1] into ``bytes``, word_cu_seqlens int64 [B+1]: the
        number of words before each sequence). Words never cross sequences.

    The number of words sizes the output, so on CUDA it is read back to the host (a
    sync, which also validates cu_seqlens), and the op raises under CUDA graph capture.

    The stream is cut into chunks, and the worker of the chunk where a word starts
    walks that word to its end and cuts it, since each cut depends on the one before.
    Known CUDA limit (not yet measured on a GPU): a very long word (a stretch of
    megabytes without a word start, such as an unwrapped DNA sequence) is walked by
    one GPU thread. The CPU walks it 64 bytes at a time (2.8 GB/s on one 100 MB word).
    """
    data = bytes
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not isinstance(data, (torch.Tensor, builtins.bytes, bytearray)):
        raise TypeError(f"tokcore.word_boundaries: bytes must be a uint8 tensor, Python bytes or str, got "
                        f"{type(data).__name__}")
    if isinstance(data, (builtins.bytes, bytearray)):
        if torch.compiler.is_compiling():  # torch.compile cannot trace frombuffer; the text is a constant there
            data = torch.tensor(list(data), dtype=torch.uint8)
        else:
            data = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, data.numel()], dtype=torch.int64, device=data.device)
    _check_arg_types("word_boundaries", cu_seqlens=cu_seqlens, max_word_bytes=max_word_bytes, mode=mode)
    return _ops.word_boundaries(data, cu_seqlens, max_word_bytes, mode)


def _check_arg_types(op: str, **args) -> None:
    """TypeError naming the argument for a Python value of the wrong kind (the
    dispatcher's own message is a RuntimeError about the schema): offsets-like
    arguments must be tensors, reduce/mode strings, sizes ints (or SymInts under
    torch.compile), `total` an int or None."""
    kinds = {"offsets": torch.Tensor, "cu_seqlens": torch.Tensor, "reduce": str, "mode": str,
             "max_len": (numbers.Integral, torch.SymInt), "max_word_bytes": (numbers.Integral, torch.SymInt),
             "total": (numbers.Integral, torch.SymInt, type(None))}
    for name, value in args.items():
        kind = kinds[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            wanted = {"offsets": "an int64 torch.Tensor", "cu_seqlens": "an int64 torch.Tensor", "reduce": "a str",
                      "mode": "a str", "max_len": "an int", "max_word_bytes": "an int",
                      "total": "an int or None"}[name]
            raise TypeError(f"tokcore.{op}: {name} must be {wanted}, got {type(value).__name__}")
        # the schema's int is int64: a larger Python int would fail in the dispatcher
        # with "expected type 'int' but found type 'int'"
        if isinstance(value, numbers.Integral) and not -2**63 <= value < 2**63:
            raise ValueError(f"tokcore.{op}: {name} must fit in int64, got {value}")


def _as_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """[T, *F] -> [T, prod(F)] (no -1: it is ambiguous for tensors with no elements)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"tokcore: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"tokcore: {name} must have at least 1 dimension (rows), got a scalar")
    if x.dim() == 2:  # the ops' own layout: no reshape (see _unflatten)
        return x
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def _unflatten(out: torch.Tensor, leading: int, features: tuple) -> torch.Tensor:
    """out [*lead, F] -> [*lead, *features]. With one feature dimension nothing is
    reshaped: under torch.compile with dynamic shapes, reshaping a tensor with no
    elements can fail inside torch (segment_pack with max_len 0, which builds its
    result instead where there are more)."""
    if len(features) == 1:
        return out
    return out.reshape(tuple(out.shape[:leading]) + tuple(features))


def segment_reduce(x: torch.Tensor, offsets: torch.Tensor, reduce: str = "mean", *,
                   check_offsets: bool = True) -> torch.Tensor:
    """Reduce the rows of each segment: x [T, *F] -> [S, *F].

    reduce is sum, mean, max or min; an empty segment gives 0. max/min propagate
    NaN, and their gradient goes to the first row that attains the result.
    Differentiable in x.

    Every device forms the result in the same order: a segment's rows in blocks
    of 256, each block row by row, then the block results in order (a word is one
    block), so CPU and CUDA results match bit for bit. On CUDA a thread reduces
    one segment for 16 bytes of features, which fills the GPU when segments are
    many (words); long segments get a thread per block of 256 rows instead, then
    one per segment to combine the blocks: every segment when there are a few long
    ones (one per sequence), and those longer than a block when they are among
    many short ones (which the offsets check finds). The sum/mean backward splits
    the rows of a few long segments over more threads. On the CPU each thread
    takes whole segments, and a segment too long for one thread (over half a
    thread's share of the rows) is shared out over all threads, forward and
    backward. Known CUDA limit: the backward walks a long segment among many
    short ones with one thread per vector, and so does the forward with
    ``check_offsets=False`` (no check, so the longest segment is not known).

    ``check_offsets=False`` skips the CUDA offsets check and its host sync, for
    offsets known to be valid (see the module docstring).
    """
    _check_arg_types("segment_reduce", offsets=offsets, reduce=reduce)
    rows = _as_rows(x, "x")
    y = _reduce(rows, offsets, reduce, check_offsets)
    return _unflatten(y, 1, tuple(x.shape[1:]))


def segment_expand(y: torch.Tensor, offsets: torch.Tensor, total: int | None = None, *,
                   check_offsets: bool = True) -> torch.Tensor:
    """Give each row its segment's row: y [S, *F] -> [T, *F].

    ``total`` (= T = offsets[-1]) spares reading offsets[-1] back to the host
    (on CUDA a sync; with the offsets check off, none is left).
    Causal shifts (each byte sees the previous word) are done on y before
    expanding. Differentiable in y (the backward is a segment sum).
    ``check_offsets=False`` skips the CUDA offsets check (see the module docstring).
    """
    _check_arg_types("segment_expand", offsets=offsets, total=total)
    rows = _as_rows(y, "y")
    x = _expand(rows, offsets, total, check_offsets)
    return _unflatten(x, 1, tuple(y.shape[1:]))


def segment_pack(x: torch.Tensor, offsets: torch.Tensor, max_len: int, *,
                 check_offsets: bool = True) -> torch.Tensor:
    """Pack segments into a padded batch: x [T, *F] -> [S, max_len, *F].

    Rows past a segment's length are zero; rows past max_len are dropped.
    Differentiable in x (the backward is segment_unpack).
    ``check_offsets=False`` skips the CUDA offsets check (see the module docstring).
    """
    _check_arg_types("segment_pack", offsets=offsets, max_len=max_len)
    rows = _as_rows(x, "x")
    packed = _pack(rows, offsets, max_len, check_offsets)
    if max_len == 0 and x.dim() > 2:
        # no slots: the result is built, not reshaped, since under torch.compile with
        # dynamic shapes torch fails to reshape it (see _unflatten); adding the empty
        # sum keeps it in the autograd graph
        return packed.new_zeros((packed.shape[0], 0, *x.shape[1:])) + packed.sum()
    return _unflatten(packed, 2, tuple(x.shape[1:]))


def segment_unpack(packed: torch.Tensor, offsets: torch.Tensor, total: int | None = None, *,
                   check_offsets: bool = True) -> torch.Tensor:
    """Inverse of segment_pack: packed [S, L, *F] -> [T, *F].

    Rows of a segment past L (dropped by packing) come back as zeros.
    Differentiable in packed (the backward is segment_pack).
    ``check_offsets=False`` skips the CUDA offsets check (see the module docstring).
    """
    _check_arg_types("segment_unpack", offsets=offsets, total=total)
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"tokcore: packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dim() < 2:
        raise ValueError(f"tokcore: packed must have at least 2 dimensions [S, L, ...], got {packed.dim()}")
    flat = packed if packed.dim() == 3 else packed.reshape(packed.shape[0], packed.shape[1],
                                                           math.prod(packed.shape[2:]))
    x = _unpack(flat, offsets, total, check_offsets)
    return _unflatten(x, 1, tuple(packed.shape[2:]))


# ---------------------------------------------------------------- fake kernels
#
# Fake kernels compute output shapes under torch.compile and on the meta device.
# They run the adapters' argument checks too (csrc/pooling/pooling_ops.cpp, same
# order and messages): without them, a call traced by torch.compile with a bad
# argument fails later with an IndexError, and a CPU tensor passed with meta
# offsets (dispatched here) would come back as an uninitialized CPU tensor.
# Checks that need the offsets' values stay in the real kernels.

_FEATURE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_REDUCES = ("sum", "mean", "max", "min")


def _fail(op: str, message: str):
    raise RuntimeError(f"tokcore.{op}: {message}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_dim(op: str, t: torch.Tensor, name: str, ndim: int) -> None:
    if t.dim() != ndim:
        _fail(op, f"{name} must have {ndim} dimension{'' if ndim == 1 else 's'}, got {t.dim()}")


def _check_same_device(op: str, t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        _fail(op, f"{name} must be on the same device as {ref_name}")


def _check_features_and_offsets(op: str, x: torch.Tensor, x_name: str, ndim: int, offsets: torch.Tensor) -> None:
    if x.dtype not in _FEATURE_DTYPES:
        _fail(op, f"{x_name} must be float32, float64, bfloat16 or float16, got {_dtype_name(x.dtype)}")
    _check_dim(op, x, x_name, ndim)
    _check_offsets_tensor(op, offsets, "offsets")
    _check_same_device(op, offsets, "offsets", x, x_name)


def _check_offsets_tensor(op: str, offsets: torch.Tensor, name: str) -> None:
    if offsets.dtype != torch.int64:
        _fail(op, f"{name} must be int64, got {_dtype_name(offsets.dtype)}")
    _check_dim(op, offsets, name, 1)
    torch._check(offsets.shape[0] >= 1, lambda: f"tokcore.{op}: {name} must have at least one entry ({name}[0] = 0)")


def _check_reduce(op: str, reduce: str) -> None:
    if reduce not in _REDUCES:
        _fail(op, f"reduce must be one of sum, mean, max, min, got '{reduce}'")


def _check_rows(op: str, t: torch.Tensor, name: str, rows, what: str) -> None:
    torch._check(t.shape[0] == rows, lambda: f"tokcore.{op}: {name} must have {what} = {rows} rows, got {t.shape[0]}")


@torch.library.register_fake("tokcore::word_boundaries")
def _word_boundaries_fake(data, cu_seqlens, max_word_bytes, mode):
    op = "word_boundaries"
    if data.dtype != torch.uint8:
        _fail(op, f"bytes must be uint8, got {_dtype_name(data.dtype)}")
    _check_dim(op, data, "bytes", 1)
    _check_offsets_tensor(op, cu_seqlens, "cu_seqlens")
    _check_same_device(op, cu_seqlens, "cu_seqlens", data, "bytes")
    if max_word_bytes < 4:
        _fail(op, f"max_word_bytes must be >= 4, got {max_word_bytes}")
    if mode not in ("space", "bytes"):
        _fail(op, f"mode must be 'space' or 'bytes', got '{mode}'")
    # The output length W + 1 itself is the unbacked size (>= 1): compile cannot
    # return a size expression (u0 + 1) whose symbol it never sees bare.
    num_offsets = torch.library.get_ctx().new_dynamic_size(min=1)
    return (
        data.new_empty(num_offsets, dtype=torch.int64),
        data.new_empty(cu_seqlens.shape[0], dtype=torch.int64),
    )


@torch.library.register_fake("tokcore::segment_reduce")
def _segment_reduce_fake(x, offsets, reduce, *, check_offsets=True):
    _check_features_and_offsets("segment_reduce", x, "x", 2, offsets)
    _check_reduce("segment_reduce", reduce)
    return x.new_empty(offsets.shape[0] - 1, x.shape[1])


@torch.library.register_fake("tokcore::segment_reduce_backward")
def _segment_reduce_backward_fake(grad_y, offsets, total, reduce, x=None, y=None, *, check_offsets=True):
    op = "segment_reduce_backward"
    _check_features_and_offsets(op, grad_y, "grad_y", 2, offsets)
    _check_reduce(op, reduce)
    _check_rows(op, grad_y, "grad_y", offsets.shape[0] - 1, "len(offsets) - 1")
    torch._check(total >= 0, lambda: f"tokcore.{op}: total must be >= 0, got {total}")
    if reduce in ("max", "min"):
        if x is None or y is None:
            _fail(op, f"x and y are required for reduce='{reduce}'")
        for t, name in ((x, "x"), (y, "y")):
            _check_dim(op, t, name, 2)
            _check_same_device(op, t, name, grad_y, "grad_y")
            if t.dtype != grad_y.dtype:
                _fail(op, f"{name} must have the dtype of grad_y")
            torch._check(t.shape[1] == grad_y.shape[1],
                         lambda: f"tokcore.{op}: {name} must have {grad_y.shape[1]} columns, got {t.shape[1]}")
        _check_rows(op, x, "x", total, "total")
        _check_rows(op, y, "y", offsets.shape[0] - 1, "len(offsets) - 1")
    return grad_y.new_empty(total, grad_y.shape[1])


def _rows_fake(op, total):
    if total is None:
        return torch.library.get_ctx().new_dynamic_size()
    torch._check(total >= 0, lambda: f"tokcore.{op}: total must be >= 0, got {total}")
    return total


@torch.library.register_fake("tokcore::segment_expand")
def _segment_expand_fake(y, offsets, total=None, *, check_offsets=True):
    _check_features_and_offsets("segment_expand", y, "y", 2, offsets)
    _check_rows("segment_expand", y, "y", offsets.shape[0] - 1, "len(offsets) - 1")
    return y.new_empty(_rows_fake("segment_expand", total), y.shape[1])


@torch.library.register_fake("tokcore::segment_pack")
def _segment_pack_fake(x, offsets, max_len, *, check_offsets=True):
    _check_features_and_offsets("segment_pack", x, "x", 2, offsets)
    torch._check(max_len >= 0, lambda: f"tokcore.segment_pack: max_len must be >= 0, got {max_len}")
    S, D = offsets.shape[0] - 1, x.shape[1]
    # sizes of 0 count as 1, as in torch's strides (the adapter's check)
    if all(isinstance(n, int) for n in (S, D, max_len)) and \
            max(S, 1) * max(max_len, 1) * max(D, 1) * x.element_size() >= 2**63:
        _fail("segment_pack", f"max_len = {max_len} is too large: the packed output [{S}, max_len, {D}] "
                              "would have sizes or strides past int64")
    return x.new_empty(S, max_len, D)


@torch.library.register_fake("tokcore::segment_unpack")
def _segment_unpack_fake(packed, offsets, total=None, *, check_offsets=True):
    _check_features_and_offsets("segment_unpack", packed, "packed", 3, offsets)
    torch._check(packed.shape[0] == offsets.shape[0] - 1,
                 lambda: f"tokcore.segment_unpack: packed must have len(offsets) - 1 = {offsets.shape[0] - 1} "
                         f"segments, got {packed.shape[0]}")
    return packed.new_empty(_rows_fake("segment_unpack", total), packed.shape[2])


# ---------------------------------------------------------------- autograd
#
# The backward passes call the ops with check_offsets=False: their offsets are
# the forward's, checked there, and saved with save_for_backward, whose version
# counter makes backward refuse offsets modified in place since. On CUDA this
# spares a host sync per backward op (CPU offsets are checked regardless).


def _segment_reduce_setup(ctx, inputs, keyword_only_inputs, output):
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
    grad_x = _ops.segment_reduce_backward(grad, offsets, ctx.total, ctx.reduce, x, y, check_offsets=False)
    return grad_x, None, None


torch.library.register_autograd(
    "tokcore::segment_reduce", _segment_reduce_backward, setup_context=_segment_reduce_setup
)


# The backward is itself differentiable (double backward: gradient penalties,
# Hessian-vector products). It is linear in grad_y: sum/mean spread grad_y[s] over
# the segment's rows (divided by its length for mean), so its adjoint is the segment
# sum/mean; max/min route grad_y[s] to the first attaining row, so the adjoint
# gathers the incoming gradient there. As a function of x and y it is piecewise
# constant: no gradient flows to them.
def _segment_reduce_backward_setup(ctx, inputs, keyword_only_inputs, output):
    grad_y, offsets, total, reduce, x, y = inputs
    ctx.reduce = reduce
    ctx.total = total
    ctx.save_for_backward(offsets, x, y)


def _segment_reduce_backward_backward(ctx, grad_grad_x):
    offsets, x, y = ctx.saved_tensors
    if ctx.reduce in ("sum", "mean"):
        grad_grad_y = _ops.segment_reduce(grad_grad_x, offsets, ctx.reduce, check_offsets=False)
    else:  # 1 at each segment's first attaining row (per feature), 0 elsewhere
        attaining = _ops.segment_reduce_backward(
            torch.ones(offsets.shape[0] - 1, grad_grad_x.shape[1], dtype=grad_grad_x.dtype,
                       device=grad_grad_x.device), offsets, ctx.total, ctx.reduce, x, y, check_offsets=False)
        grad_grad_y = _ops.segment_reduce(_at_attaining_rows(grad_grad_x, attaining), offsets, "sum",
                                          check_offsets=False)
    return grad_grad_y, None, None, None, None, None


torch.library.register_autograd(
    "tokcore::segment_reduce_backward", _segment_reduce_backward_backward,
    setup_context=_segment_reduce_backward_setup
)


def _segment_expand_setup(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(inputs[1])


def _segment_expand_backward(ctx, grad):
    (offsets,) = ctx.saved_tensors
    return _ops.segment_reduce(grad, offsets, "sum", check_offsets=False), None, None


torch.library.register_autograd(
    "tokcore::segment_expand", _segment_expand_backward, setup_context=_segment_expand_setup
)


def _segment_pack_setup(ctx, inputs, keyword_only_inputs, output):
    x, offsets, _ = inputs
    ctx.total = x.shape[0]
    ctx.save_for_backward(offsets)


def _segment_pack_backward(ctx, grad):
    (offsets,) = ctx.saved_tensors
    return _ops.segment_unpack(grad, offsets, ctx.total, check_offsets=False), None, None


torch.library.register_autograd("tokcore::segment_pack", _segment_pack_backward, setup_context=_segment_pack_setup)


def _segment_unpack_setup(ctx, inputs, keyword_only_inputs, output):
    packed, offsets, _ = inputs
    ctx.max_len = packed.shape[1]
    ctx.save_for_backward(offsets)


def _segment_unpack_backward(ctx, grad):
    (offsets,) = ctx.saved_tensors
    return _ops.segment_pack(grad, offsets, ctx.max_len, check_offsets=False), None, None


torch.library.register_autograd(
    "tokcore::segment_unpack", _segment_unpack_backward, setup_context=_segment_unpack_setup
)


# ---------------------------------------------------------------- torch.func and forward-mode AD
#
# In eager mode, where a derivative may be taken (_through_function), the wrappers
# call these autograd.Functions instead of the raw ops: torch.func (grad, vmap of
# grad for per-sample gradients, jacrev, jacfwd, hessian, jvp) refuses the Functions
# that torch.library.register_autograd generates (they lack setup_context:
# pytorch/pytorch#168393), and a custom op can register no forward-mode formula,
# which a Function can (jvp). The formulas are the registered ones above, and the
# derivatives call the ops through the same dispatch (_reduce, ...), so every order
# of derivative stays inside torch.func, and a plain backward calls the raw ops.
# Under torch.compile, which cannot trace a Function with a jvp, the wrappers call
# the raw ops (same formulas). Every op here is linear in its differentiable input,
# so each jvp is the op itself applied to the tangent, except max/min, whose tangent
# is the tangent's value at the first attaining row. generate_vmap_rule: under vmap
# a Function runs its formulas on batched tensors, which reach the raw ops' vmap
# rules (below).


def _call(function, op, t, *args, check_offsets):
    """`function` on (t, *args, check_offsets) where a derivative may be taken, else the
    raw op torch.ops.tokcore.<op>."""
    if _through_function(t, op):
        return function.apply(t, *args, check_offsets)
    return getattr(_ops, op)(t, *args, check_offsets=check_offsets)


def _reduce(x, offsets, reduce, check_offsets):
    return _call(_SegmentReduce, "segment_reduce", x, offsets, reduce, check_offsets=check_offsets)


def _reduce_backward(grad_y, offsets, total, reduce, x, y):
    # (offsets checked by the forward; its gradient in x and y is zero: see above)
    return _call(_SegmentReduceBackward, "segment_reduce_backward", grad_y, offsets, total, reduce, x, y,
                 check_offsets=False)


def _expand(y, offsets, total, check_offsets):
    return _call(_SegmentExpand, "segment_expand", y, offsets, total, check_offsets=check_offsets)


def _pack(x, offsets, max_len, check_offsets):
    return _call(_SegmentPack, "segment_pack", x, offsets, max_len, check_offsets=check_offsets)


def _unpack(packed, offsets, total, check_offsets):
    return _call(_SegmentUnpack, "segment_unpack", packed, offsets, total, check_offsets=check_offsets)


def _attaining_rows(offsets, total, reduce, x, y):
    """1 at each segment's first row that attains its max/min (per feature), else 0."""
    return _reduce_backward(torch.ones_like(y), offsets, total, reduce, x, y)


def _at_attaining_rows(t, attaining):
    """t where `attaining` (_attaining_rows) is 1, else 0: selected, not multiplied, so
    that an inf or NaN at another row does not turn into NaN (inf * 0), as in torch's
    own max and amax."""
    return torch.where(attaining != 0, t, 0)


class _SegmentReduce(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, offsets, reduce, check_offsets):
        return _ops.segment_reduce(x, offsets, reduce, check_offsets=check_offsets)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, offsets, reduce, _ = inputs
        ctx.reduce, ctx.total = reduce, x.shape[0]
        saved = (offsets, x, output) if reduce in ("max", "min") else (offsets,)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def backward(ctx, grad_y):
        offsets, *values = ctx.saved_tensors
        x, y = values if values else (None, None)
        return _reduce_backward(grad_y, offsets, ctx.total, ctx.reduce, x, y), None, None, None

    @staticmethod
    def jvp(ctx, x_tangent, *_):
        offsets, *values = ctx.saved_tensors
        if ctx.reduce in ("sum", "mean"):
            return _reduce(x_tangent, offsets, ctx.reduce, False)
        x_tangent = _at_attaining_rows(x_tangent, _attaining_rows(offsets, ctx.total, ctx.reduce, *values))
        return _reduce(x_tangent, offsets, "sum", False)


class _SegmentReduceBackward(torch.autograd.Function):
    """The backward of segment_reduce, linear in grad_y (see the double backward above)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_y, offsets, total, reduce, x, y, check_offsets):
        return _ops.segment_reduce_backward(grad_y, offsets, total, reduce, x, y, check_offsets=check_offsets)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, offsets, total, reduce, x, y, _ = inputs
        ctx.reduce, ctx.total = reduce, total
        saved = (offsets, x, y) if reduce in ("max", "min") else (offsets,)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def backward(ctx, grad_grad_x):
        offsets, *values = ctx.saved_tensors
        if ctx.reduce in ("sum", "mean"):
            grad_grad_y = _reduce(grad_grad_x, offsets, ctx.reduce, False)
        else:
            grad_grad_x = _at_attaining_rows(grad_grad_x, _attaining_rows(offsets, ctx.total, ctx.reduce, *values))
            grad_grad_y = _reduce(grad_grad_x, offsets, "sum", False)
        return grad_grad_y, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, grad_y_tangent, *_):
        offsets, *values = ctx.saved_tensors
        x, y = values if values else (None, None)
        return _reduce_backward(grad_y_tangent, offsets, ctx.total, ctx.reduce, x, y)


class _SegmentExpand(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(y, offsets, total, check_offsets):
        return _ops.segment_expand(y, offsets, total, check_offsets=check_offsets)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.total = output.shape[0]
        ctx.save_for_backward(inputs[1])
        ctx.save_for_forward(inputs[1])

    @staticmethod
    def backward(ctx, grad_x):
        (offsets,) = ctx.saved_tensors
        return _reduce(grad_x, offsets, "sum", False), None, None, None

    @staticmethod
    def jvp(ctx, y_tangent, *_):
        (offsets,) = ctx.saved_tensors
        return _expand(y_tangent, offsets, ctx.total, False)


class _SegmentPack(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, offsets, max_len, check_offsets):
        return _ops.segment_pack(x, offsets, max_len, check_offsets=check_offsets)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, offsets, max_len, _ = inputs
        ctx.total, ctx.max_len = x.shape[0], max_len
        ctx.save_for_backward(offsets)
        ctx.save_for_forward(offsets)

    @staticmethod
    def backward(ctx, grad_packed):
        (offsets,) = ctx.saved_tensors
        return _unpack(grad_packed, offsets, ctx.total, False), None, None, None

    @staticmethod
    def jvp(ctx, x_tangent, *_):
        (offsets,) = ctx.saved_tensors
        return _pack(x_tangent, offsets, ctx.max_len, False)


class _SegmentUnpack(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(packed, offsets, total, check_offsets):
        return _ops.segment_unpack(packed, offsets, total, check_offsets=check_offsets)

    @staticmethod
    def setup_context(ctx, inputs, output):
        packed, offsets, _, _ = inputs
        ctx.total, ctx.max_len = output.shape[0], packed.shape[1]
        ctx.save_for_backward(offsets)
        ctx.save_for_forward(offsets)

    @staticmethod
    def backward(ctx, grad_x):
        (offsets,) = ctx.saved_tensors
        return _pack(grad_x, offsets, ctx.max_len, False), None, None, None

    @staticmethod
    def jvp(ctx, packed_tangent, *_):
        (offsets,) = ctx.saved_tensors
        return _unpack(packed_tangent, offsets, ctx.total, False)


# ---------------------------------------------------------------- vmap rules
#
# A batch over the features of a segment op (vmap over heads, samples, tangents)
# with shared offsets is one call with the batch folded into the feature dimension:
# features are independent in every op, so [T, B, D] as [T, B * D] gives each
# sample's result (same bits). A batch of offsets has per-sample segments: one call
# per sample.


def _fold(t, bdim, batch_size):
    """A per-sample [..., D] tensor with its batch at bdim (None: not batched, shared
    by every sample) as [..., B * D]."""
    if t is None:
        return None
    t = t.unsqueeze(-2).expand(*t.shape[:-1], batch_size, t.shape[-1]) if bdim is None else t.movedim(bdim, -2)
    return t.flatten(-2)


def _sample_shape(t, bdim):
    """The shape of one sample of t (its batch dimension dropped; None: not batched)."""
    return tuple(t.shape) if bdim is None else tuple(t.movedim(bdim, 0).shape[1:])


def _unfold(out, batch_size, width):
    """[..., B * D] -> [..., B, D] (D = width: with B = 0 it cannot be read off the
    output), and the batch's dimension."""
    out = out.unflatten(-1, (batch_size, width))
    return out, out.dim() - 2


def _per_sample(op, info, in_dims, args, kwargs, empty_sample_shape):
    """The op once per sample, stacked (for batched offsets). An empty batch has no
    sample to run it on: its result is [0, *empty_sample_shape], zeros of the first
    argument's dtype (a size the op would read from each sample's offsets is 0)."""
    if info.batch_size == 0:
        return args[0].new_zeros((0, *empty_sample_shape)), 0
    outs = [op(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)), **kwargs)
            for i in range(info.batch_size)]
    for i, out in enumerate(outs[1:], 1):
        if out.shape != outs[0].shape:  # (torch.stack's own message names no argument)
            raise ValueError(
                f"tokcore.{getattr(op, '__name__', 'op')}: under vmap with batched offsets every sample's "
                f"output must have the same shape, but sample 0's is {list(outs[0].shape)} and sample {i}'s "
                f"{list(out.shape)}: every sample's offsets must end at the same total")
    return torch.stack(outs), 0


def _pad(in_dims, n):
    """in_dims for all n arguments (arguments left at their defaults have none)."""
    return tuple(in_dims) + (None,) * (n - len(in_dims))


def _segments(offsets, bdim):
    return _sample_shape(offsets, bdim)[0] - 1


@torch.library.register_vmap("tokcore::segment_reduce")
def _segment_reduce_vmap(info, in_dims, x, offsets, reduce, **kwargs):
    width = _sample_shape(x, in_dims[0])[-1]
    if in_dims[1] is not None:
        return _per_sample(_ops.segment_reduce, info, in_dims, (x, offsets, reduce), kwargs,
                           (_segments(offsets, in_dims[1]), width))
    return _unfold(_ops.segment_reduce(_fold(x, in_dims[0], info.batch_size), offsets, reduce, **kwargs),
                   info.batch_size, width)


@torch.library.register_vmap("tokcore::segment_reduce_backward")
def _segment_reduce_backward_vmap(info, in_dims, grad_y, offsets, total, reduce, x=None, y=None, **kwargs):
    args, in_dims = (grad_y, offsets, total, reduce, x, y), _pad(in_dims, 6)
    width = _sample_shape(grad_y, in_dims[0])[-1]
    if in_dims[1] is not None:
        return _per_sample(_ops.segment_reduce_backward, info, in_dims, args, kwargs, (total, width))
    b = info.batch_size
    folded = (_fold(grad_y, in_dims[0], b), offsets, total, reduce, _fold(x, in_dims[4], b), _fold(y, in_dims[5], b))
    return _unfold(_ops.segment_reduce_backward(*folded, **kwargs), b, width)


@torch.library.register_vmap("tokcore::segment_expand")
def _segment_expand_vmap(info, in_dims, y, offsets, total=None, **kwargs):
    in_dims = _pad(in_dims, 3)
    width = _sample_shape(y, in_dims[0])[-1]
    if in_dims[1] is not None:
        return _per_sample(_ops.segment_expand, info, in_dims, (y, offsets, total), kwargs, (total or 0, width))
    return _unfold(_ops.segment_expand(_fold(y, in_dims[0], info.batch_size), offsets, total, **kwargs),
                   info.batch_size, width)


@torch.library.register_vmap("tokcore::segment_pack")
def _segment_pack_vmap(info, in_dims, x, offsets, max_len, **kwargs):
    width = _sample_shape(x, in_dims[0])[-1]
    if in_dims[1] is not None:
        return _per_sample(_ops.segment_pack, info, in_dims, (x, offsets, max_len), kwargs,
                           (_segments(offsets, in_dims[1]), max_len, width))
    return _unfold(_ops.segment_pack(_fold(x, in_dims[0], info.batch_size), offsets, max_len, **kwargs),
                   info.batch_size, width)


@torch.library.register_vmap("tokcore::segment_unpack")
def _segment_unpack_vmap(info, in_dims, packed, offsets, total=None, **kwargs):
    in_dims = _pad(in_dims, 3)
    width = _sample_shape(packed, in_dims[0])[-1]
    if in_dims[1] is not None:
        return _per_sample(_ops.segment_unpack, info, in_dims, (packed, offsets, total), kwargs, (total or 0, width))
    return _unfold(_ops.segment_unpack(_fold(packed, in_dims[0], info.batch_size), offsets, total, **kwargs),
                   info.batch_size, width)

"""Tests for the pooling op family (DESIGN.md section 5, docs/pooling_api.md).

Layout:
1. reference self-tests: hand-checked fixed cases run against BOTH the readable reference
   (tests/reference/pooling.py) and the compiled ops, plus hypothesis properties of the
   reference word splitter that restate the rule in a different form;
2. compiled ops against the reference on random inputs (hypothesis), all feature dtypes;
3. real text (Python standard library sources);
4. torch.library.opcheck, gradcheck, torch.compile;
5. bad inputs, determinism, non-contiguous inputs.

Expected values in fixed cases were worked out by hand from the rule in DESIGN.md (the
derivation is in the comment next to each case where it is not obvious).
"""

from __future__ import annotations

import itertools
import re
import os
import subprocess
import sys
import sysconfig
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

try:
    from reference import pooling as ref
except ImportError:  # tests/ imported as a package
    from tests.reference import pooling as ref

# A missing or broken build must fail the suite, never turn into skips.
import tokcore  # noqa: E402  (loads the library, registers torch.ops.tokcore.*)
from tokcore.pooling import (  # noqa: E402
    segment_expand,
    segment_pack,
    segment_reduce,
    segment_unpack,
    word_boundaries,
)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
REDUCES = ["sum", "mean", "max", "min"]
I64 = torch.int64


def ops():
    return torch.ops.tokcore


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=I64)


def as_bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def offsets_from_lengths(lengths) -> torch.Tensor:
    return t64([0] + list(itertools.accumulate(lengths)))


# ----------------------------------------------------------------------------------------
# Implementations under test: the reference itself and the compiled ops on each device.
# Fixed, hand-checked cases run against all of them, so the reference is checked too.
# ----------------------------------------------------------------------------------------


class Impl:
    """Calls one implementation with CPU inputs; moves inputs to `device`, results back."""

    def __init__(self, name: str):
        self.name = name
        self.device = "cuda" if name.endswith("cuda") else "cpu"
        self.is_ref = name == "reference"

    def _to(self, t):
        return t.to(self.device) if isinstance(t, torch.Tensor) else t

    def word_boundaries(self, b, cu, max_word_bytes=16, mode="space"):
        fn = ref.word_boundaries if self.is_ref else word_boundaries
        wo, wc = fn(self._to(b), self._to(cu), max_word_bytes, mode)
        assert wo.dtype == I64 and wc.dtype == I64
        assert wo.device.type == self.device and wc.device.type == self.device
        return wo.cpu(), wc.cpu()

    def segment_reduce(self, x, offsets, reduce):
        fn = ref.segment_reduce if self.is_ref else segment_reduce
        y = fn(self._to(x), self._to(offsets), reduce)
        assert y.dtype == x.dtype and y.device.type == self.device
        return y.cpu()

    def segment_reduce_grad(self, x, offsets, reduce, grad_y):
        if self.is_ref:
            y = ref.segment_reduce(x, offsets, reduce)
            return ref.segment_reduce_backward(grad_y, x, y, offsets, reduce)
        xd = self._to(x).detach().requires_grad_(True)
        segment_reduce(xd, self._to(offsets), reduce).backward(self._to(grad_y))
        return xd.grad.cpu()

    def segment_expand(self, y, offsets, total=None):
        fn = ref.segment_expand if self.is_ref else segment_expand
        x = fn(self._to(y), self._to(offsets), total)
        assert x.dtype == y.dtype and x.device.type == self.device
        return x.cpu()

    def segment_pack(self, x, offsets, max_len):
        fn = ref.segment_pack if self.is_ref else segment_pack
        p = fn(self._to(x), self._to(offsets), max_len)
        assert p.dtype == x.dtype and p.device.type == self.device
        return p.cpu()

    def segment_unpack(self, packed, offsets, total=None):
        fn = ref.segment_unpack if self.is_ref else segment_unpack
        x = fn(self._to(packed), self._to(offsets), total)
        assert x.dtype == packed.dtype and x.device.type == self.device
        return x.cpu()


@pytest.fixture(
    params=[
        pytest.param("reference", id="reference"),
        pytest.param("tokcore-cpu", id="tokcore-cpu"),
        pytest.param("tokcore-cuda", marks=needs_cuda, id="tokcore-cuda"),
    ]
)
def impl(request) -> Impl:
    return Impl(request.param)


# ----------------------------------------------------------------------------------------
# Comparison helpers
# ----------------------------------------------------------------------------------------


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor):
    """Same dtype, shape and bits (NaN payloads aside: NaN must match NaN)."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.is_floating_point():
        nan_a, nan_e = a.isnan(), e.isnan()
        assert torch.equal(nan_a, nan_e), f"NaN positions differ:\n{a}\n{e}"
        a = torch.where(nan_a, torch.zeros_like(a), a)
        e = torch.where(nan_e, torch.zeros_like(e), e)
        bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        a, e = a.view(bits), e.view(bits)
    if not torch.equal(a, e):
        bad = (a != e).nonzero()[:5].tolist()
        raise AssertionError(f"not bitwise equal at {bad}:\nactual={actual}\nexpected={expected}")


REDUCE_BLOCK_ROWS = 256  # kReduceBlockRows (tokcore/pooling/segment.h)


def exact_reference(x: torch.Tensor, offsets: torch.Tensor, reduce: str) -> torch.Tensor:
    """The reference segment sum/mean, formed in float64 and rounded to x's dtype;
    except where a sum overflows the accumulator type (float32 for every dtype but
    float64), as the kernels' sums do: there it is the reference summed in that type."""
    exact = ref.segment_reduce(x.detach().cpu().to(torch.float64), offsets.cpu(), reduce).to(x.dtype)
    in_acc = ref.segment_reduce(x.detach().cpu(), offsets.cpu(), reduce)
    return torch.where(in_acc.isinf() & exact.isfinite(), in_acc, exact)


def sum_tolerance(x: torch.Tensor, offsets: torch.Tensor, expected: torch.Tensor, mean: bool):
    """Per-element tolerance for a segment sum/mean of x against `expected`, the
    exact_reference (float64, rounded to x's dtype).

    Every device forms a segment's sum in acc (float32, float64 for float64) in one
    order: its rows in blocks of REDUCE_BLOCK_ROWS, each block row by row from zero,
    then the blocks' sums in block order. Recursive summation of k terms errs by at most
    (k - 1) * u * sum|x| (u = eps / 2, to first order), so a segment of n rows, in m
    blocks of at most b = min(n, 256) rows, errs by at most (b - 1 + m - 1) * u * sum|x|;
    we allow (b + m) * eps_acc * sum|x|. The float64 reference errs by at most
    n * eps64 * sum|x| (torch's order). The mean's division rounds once more in acc
    (eps_acc * |value|). Both round to the output dtype: 2 output ulps
    (eps_out * |value| each), or one subnormal step (tiny * eps) near zero.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    eps_acc, eps64 = torch.finfo(acc).eps, torch.finfo(torch.float64).eps
    finfo_out = torch.finfo(x.dtype)
    abs_sum = ref.segment_reduce(x.detach().cpu().to(torch.float64).abs(), offsets.cpu(), "sum")
    n = (offsets[1:] - offsets[:-1]).cpu().to(torch.float64).clamp(min=1)
    b, m = n.clamp(max=REDUCE_BLOCK_ROWS), torch.ceil(n / REDUCE_BLOCK_ROWS)
    shape = (-1,) + (1,) * (x.dim() - 1)
    accum_err = ((b + m) * eps_acc + n * eps64).reshape(shape) * abs_sum
    exp = expected.detach().cpu().to(torch.float64).abs()
    if mean:
        accum_err = accum_err / n.reshape(shape) + eps_acc * exp
    return accum_err + 2 * finfo_out.eps * exp + finfo_out.tiny * finfo_out.eps


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor):
    """|actual - expected| <= tol elementwise; NaN and +-inf must match exactly."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a = actual.detach().cpu().to(torch.float64)
    e = expected.detach().cpu().to(torch.float64)
    assert torch.equal(a.isnan(), e.isnan()), f"NaN positions differ:\n{a}\n{e}"
    special = e.isinf() | e.isnan()
    assert torch.equal(a[e.isinf()], e[e.isinf()]), "infinities differ"
    diff = torch.where(special, torch.zeros_like(a), (a - e).abs())
    tol = torch.where(special, torch.zeros_like(a), tol.to(torch.float64).expand_as(a))
    if not bool((diff <= tol).all()):
        i = int((diff - tol).flatten().argmax())
        raise AssertionError(
            f"max excess at flat index {i}: actual={a.flatten()[i].item()!r} "
            f"expected={e.flatten()[i].item()!r} tol={tol.flatten()[i].item()!r}"
        )


def check_reduce(actual, x, offsets, reduce, expected=None):
    """The compiled result against the reference (computed from the same inputs)."""
    if reduce in ("max", "min"):
        # a selection, no arithmetic: exact in every dtype
        assert_bitwise_equal(actual, ref.segment_reduce(x.cpu(), offsets.cpu(), reduce) if expected is None
                             else expected)
    else:
        expected = exact_reference(x, offsets, reduce) if expected is None else expected
        assert_within(actual, expected, sum_tolerance(x, offsets, expected, reduce == "mean"))


def check_reduce_grad(actual, grad_y, x, offsets, reduce):
    expected = ref.segment_reduce_backward(
        grad_y.cpu(), x.cpu(), ref.segment_reduce(x.cpu(), offsets.cpu(), reduce),
        offsets.cpu(), reduce)
    # sum: a copy of grad_y; mean: grad_y / n in the accumulator's type, rounded once;
    # max/min: grad_y routed to one position -- exact, all of them
    assert_bitwise_equal(actual, expected)


# ----------------------------------------------------------------------------------------
# 1a. word_boundaries: hand-checked fixed cases (reference and compiled ops)
# ----------------------------------------------------------------------------------------


def split(impl: Impl, data, cu=None, max_word_bytes=16, mode="space"):
    """Words of each sequence as lists of bytes, after checking the output structure."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if cu is None:
        cu = [0, len(data)]
    wo, wc = impl.word_boundaries(as_bytes_tensor(data), t64(cu), max_word_bytes, mode)
    wo, wc = wo.tolist(), wc.tolist()
    assert len(wc) == len(cu) and wc[0] == 0
    assert len(wo) == wc[-1] + 1 and wo[-1] == len(data)
    return [[data[wo[i]:wo[i + 1]] for i in range(wc[b], wc[b + 1])] for b in range(len(cu) - 1)]


def enc(words):
    return [w.encode("utf-8") if isinstance(w, str) else w for w in words]


SPACE_CASES = [
    # (text, expected words) with max_word_bytes = 16
    ("Hello, world!", ["Hello,", " world!"]),
    # ',' after ' ' is punctuation: never a start; 'f' after ',' starts a word
    (" ,foo", [" ,", "foo"]),
    # only the first of a run of whitespace starts a word; 'b' after ' ' does not
    ("a  b", ["a", "  b"]),
    ("foo.bar", ["foo.", "bar"]),
    ("x==y", ["x==", "y"]),
    ("  hi", ["  hi"]),
    ("a\tb\nc\rd\x0be\x0cf", ["a", "\tb", "\nc", "\rd", "\x0be", "\x0cf"]),
    ("(a)", ["(", "a)"]),
    ("...", ["..."]),
    (". . .", [".", " .", " ."]),
    ("hi!!there", ["hi!!", "there"]),
    ("1+2=3", ["1+", "2=", "3"]),
    ("don't", ["don'", "t"]),
    ("snake_case_9", ["snake_case_9"]),
    ("\n\n", ["\n\n"]),
    ("a\n\nb", ["a", "\n\nb"]),
    # 0x1c-0x1f are whitespace to str.isspace but punctuation here
    ("a\x1cb", ["a\x1c", "b"]),
    ("a\x00b", ["a\x00", "b"]),
    # every byte >= 0x80 is a word byte, including U+00A0 (c2 a0) and U+0085 (c2 85)
    ("a\u00a0b", ["a\u00a0b"]),
    ("x\u0085y", ["x\u0085y"]),
    ("café au lait", ["café", " au", " lait"]),
    # 9 + 13 bytes, both <= 16
    ("日本語 テキスト", ["日本語", " テキスト"]),
]


@pytest.mark.parametrize("text,expected", SPACE_CASES)
def test_word_boundaries_space_fixed(impl, text, expected):
    assert split(impl, text) == [enc(expected)]


CUT_CASES = [
    # (data, max_word_bytes, expected pieces)
    ("abcdefghij", 4, ["abcd", "efgh", "ij"]),
    ("abcdefgh", 4, ["abcd", "efgh"]),
    ("abcd", 4, ["abcd"]),
    ("abcde", 4, ["abcd", "e"]),
    # c3a9 c3a9 c3a9: char starts in (0, 4] are 2 and 4, the last is 4
    ("ééé", 4, ["éé", "é"]),
    # 61 c3a9 c3a9: char starts in (0, 4] are 1 and 3 (4 is a continuation): cut at 3
    ("aéé", 4, ["aé", "é"]),
    # 61 f09f9880: the only char start in (0, 4] is 1
    ("a😀", 4, ["a", "😀"]),
    ("😀😀", 4, ["😀", "😀"]),
    ("😀😀", 7, ["😀", "😀"]),
    ("😀😀", 8, ["😀😀"]),
    # e282ac x 5 (15 bytes): with 5 the last start in (p, p+5] is p+3; with 6 it is p+6
    ("€€€€€", 5, ["€"] * 5),
    ("€€€€€", 6, ["€€", "€€", "€"]),
    (" abcdefgh", 4, [" abc", "defg", "h"]),
    (" " * 9, 4, ["    ", "    ", " "]),
    # rule words "Hello," " wonderful" " world", each then cut into <= 4 bytes
    ("Hello, wonderful world", 4, ["Hell", "o,", " won", "derf", "ul", " wor", "ld"]),
    ("abcdef,ghijkl", 4, ["abcd", "ef,", "ghij", "kl"]),
    # invalid UTF-8: no char start after the piece's first byte -> cut at the limit
    (b"\x80" * 10, 4, [b"\x80" * 4, b"\x80" * 4, b"\x80" * 2]),
    (b"\xc3" + b"\x80" * 9, 4, [b"\xc3\x80\x80\x80", b"\x80" * 4, b"\x80" * 2]),
    # 0xf8-0xff are not continuation bytes, so they count as character starts
    (b"\xff\xfe\xfd\xfc\xfb", 4, [b"\xff\xfe\xfd\xfc", b"\xfb"]),
    # starts in (0,4]: only 1 -> "a"; from 1, none in (1,5] -> cut at the limit 5
    (b"ab\x80\x80\x80\x80\x80", 4, [b"a", b"b\x80\x80\x80", b"\x80\x80"]),
    # truncated character at the end is fine
    (b"ab\xc3", 4, [b"ab\xc3"]),
]


@pytest.mark.parametrize("data,max_word_bytes,expected", CUT_CASES)
def test_word_boundaries_cuts_fixed(impl, data, max_word_bytes, expected):
    assert split(impl, data, max_word_bytes=max_word_bytes) == [enc(expected)]


SEQUENCE_CASES = [
    # (data, cu_seqlens, max_word_bytes, expected words per sequence)
    ("foobar", [0, 3, 6], 16, [["foo"], ["bar"]]),
    ("abcdefgh", [0, 3, 8], 4, [["abc"], ["defg", "h"]]),
    ("a b c", [0, 3, 5], 16, [["a", " b"], [" c"]]),
    ("x,y", [0, 2, 3], 16, [["x,"], ["y"]]),
    # a character split across two sequences is invalid UTF-8 in each; no word crosses
    (b"a\xc3\xa9b", [0, 2, 4], 16, [[b"a\xc3"], [b"\xa9b"]]),
    # a cut never looks past the end of its sequence
    (b"abcde\x80\x80", [0, 5, 7], 4, [[b"abcd", b"e"], [b"\x80\x80"]]),
    ("abcde", [0, 0, 3, 3, 5, 5], 16, [[], ["abc"], [], ["de"], []]),
    ("", [0], 16, []),
    ("", [0, 0], 16, [[]]),
    ("", [0, 0, 0], 16, [[], []]),
]


@pytest.mark.parametrize("data,cu,max_word_bytes,expected", SEQUENCE_CASES)
def test_word_boundaries_sequences_fixed(impl, data, cu, max_word_bytes, expected):
    assert split(impl, data, cu, max_word_bytes) == [enc(ws) for ws in expected]


def test_word_boundaries_raw_tensors_fixed(impl):
    # empty sequences contribute no words; word_offsets are start positions plus T
    wo, wc = impl.word_boundaries(as_bytes_tensor(b"abcde"), t64([0, 0, 3, 3, 5, 5]))
    assert wo.tolist() == [0, 3, 5]
    assert wc.tolist() == [0, 0, 1, 1, 2, 2]
    # T = 0
    wo, wc = impl.word_boundaries(torch.zeros(0, dtype=torch.uint8), t64([0]))
    assert wo.tolist() == [0] and wc.tolist() == [0]
    wo, wc = impl.word_boundaries(torch.zeros(0, dtype=torch.uint8), t64([0, 0]))
    assert wo.tolist() == [0] and wc.tolist() == [0, 0]
    # "Hello, world!": words start at 0 and 6
    wo, wc = impl.word_boundaries(as_bytes_tensor(b"Hello, world!"), t64([0, 13]))
    assert wo.tolist() == [0, 6, 13] and wc.tolist() == [0, 2]


def test_word_boundaries_bytes_mode_fixed(impl):
    wo, wc = impl.word_boundaries(as_bytes_tensor(b"ab c"), t64([0, 4]), 16, "bytes")
    assert wo.tolist() == [0, 1, 2, 3, 4] and wc.tolist() == [0, 4]
    wo, wc = impl.word_boundaries(as_bytes_tensor("é ".encode()), t64([0, 2, 2, 3]), 4, "bytes")
    assert wo.tolist() == [0, 1, 2, 3] and wc.tolist() == [0, 2, 2, 3]
    wo, wc = impl.word_boundaries(torch.zeros(0, dtype=torch.uint8), t64([0, 0]), 16, "bytes")
    assert wo.tolist() == [0] and wc.tolist() == [0, 0]


# ----------------------------------------------------------------------------------------
# 1b. feature ops: hand-checked fixed cases (reference and compiled ops)
# ----------------------------------------------------------------------------------------

# x rows: [1, 2], [3, -1], [5, 0], [2, 2]; segments [0, 2), [2, 2) (empty), [2, 4)
X4 = [[1.0, 2.0], [3.0, -1.0], [5.0, 0.0], [2.0, 2.0]]
OFF4 = [0, 2, 2, 4]
REDUCE_EXPECTED = {
    "sum": [[4.0, 1.0], [0.0, 0.0], [7.0, 2.0]],
    "mean": [[2.0, 0.5], [0.0, 0.0], [3.5, 1.0]],
    "max": [[3.0, 2.0], [0.0, 0.0], [5.0, 2.0]],
    "min": [[1.0, -1.0], [0.0, 0.0], [2.0, 0.0]],
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("reduce", REDUCES)
def test_segment_reduce_fixed(impl, reduce, dtype):
    x = torch.tensor(X4, dtype=dtype)
    y = impl.segment_reduce(x, t64(OFF4), reduce)
    # all values are exactly representable in every dtype: exact comparison
    assert_bitwise_equal(y, torch.tensor(REDUCE_EXPECTED[reduce], dtype=dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_segment_reduce_grad_fixed(impl, dtype):
    x = torch.tensor(X4, dtype=dtype)
    g = torch.tensor([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]], dtype=dtype)
    cases = {
        "sum": [[10, 20], [10, 20], [50, 60], [50, 60]],
        "mean": [[5, 10], [5, 10], [25, 30], [25, 30]],
        # argmax per feature: seg0 (rows 0-1) col0 -> row 1, col1 -> row 0;
        # seg2 (rows 2-3) col0 -> row 2, col1 -> row 3
        "max": [[0, 20], [10, 0], [50, 0], [0, 60]],
        # argmin: seg0 col0 -> row 0, col1 -> row 1; seg2 col0 -> row 3, col1 -> row 2
        "min": [[10, 0], [0, 20], [0, 60], [50, 0]],
    }
    for reduce, expected in cases.items():
        grad = impl.segment_reduce_grad(x, t64(OFF4), reduce, g)
        assert_bitwise_equal(grad, torch.tensor(expected, dtype=dtype))


def test_segment_reduce_max_min_ties_and_nan_fixed(impl):
    nan, inf = float("nan"), float("inf")
    off = t64([0, 4, 7, 9])
    x = torch.tensor([[2.0], [5.0], [5.0], [1.0],      # max tie at rows 1, 2 -> row 1
                      [1.0], [nan], [nan],            # NaN wins; first NaN is row 5
                      [-inf], [-inf]])                # all -inf: result -inf, row 7
    g = torch.tensor([[1.0], [2.0], [3.0]])
    y = impl.segment_reduce(x, off, "max")
    assert_bitwise_equal(y, torch.tensor([[5.0], [nan], [-inf]]))
    gx = impl.segment_reduce_grad(x, off, "max", g)
    assert_bitwise_equal(gx, torch.tensor([[0.0], [1.0], [0.0], [0.0], [0.0], [2.0], [0.0],
                                           [3.0], [0.0]]))
    # min: tie of 1.0 at rows 3 (seg0 has 2, 5, 5, 1 -> row 3 only); seg1: NaN row 5;
    # seg2: -inf tie -> row 7
    y = impl.segment_reduce(x, off, "min")
    assert_bitwise_equal(y, torch.tensor([[1.0], [nan], [-inf]]))
    gx = impl.segment_reduce_grad(x, off, "min", g)
    assert_bitwise_equal(gx, torch.tensor([[0.0], [0.0], [0.0], [1.0], [0.0], [2.0], [0.0],
                                           [3.0], [0.0]]))
    # min with a tie: 3, 1, 1 -> first 1 is row 1
    x2 = torch.tensor([[3.0], [1.0], [1.0]])
    gx = impl.segment_reduce_grad(x2, t64([0, 3]), "min", torch.tensor([[7.0]]))
    assert_bitwise_equal(gx, torch.tensor([[0.0], [7.0], [0.0]]))


def test_segment_reduce_nan_inf_sum_fixed(impl):
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[1.0, inf], [nan, 1.0], [2.0, -inf], [3.0, inf]])
    y = impl.segment_reduce(x, t64([0, 2, 4]), "sum")
    assert_bitwise_equal(y, torch.tensor([[nan, inf], [5.0, nan]]))


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_segment_reduce_accumulates_in_float32(impl, reduce):
    # in bf16 (spacing 2 at 256) 256 + 1 rounds back to 256 (tie to even), so a bf16
    # accumulator gives 256; a float32 accumulator gives 260, which bf16 represents.
    # float16 has the same situation at 2048 (spacing 2).
    for dtype, big in ((torch.bfloat16, 256.0), (torch.float16, 2048.0)):
        x = torch.tensor([[big], [1.0], [1.0], [1.0], [1.0]], dtype=dtype)
        y = impl.segment_reduce(x, t64([0, 5]), reduce)
        expected = big + 4 if reduce == "sum" else (big + 4) / 5  # 52.0 / 410.4 -> rounded
        assert_bitwise_equal(y, torch.tensor([[expected]], dtype=torch.float32).to(dtype))


def test_segment_reduce_accumulates_in_float64(impl):
    # 1 + 2**-30 is exact in float64 but rounds to 1 in float32
    x = torch.tensor([[1.0], [2.0 ** -30]], dtype=torch.float64)
    y = impl.segment_reduce(x, t64([0, 2]), "sum")
    assert y.item() == 1.0 + 2.0 ** -30


def test_segment_reduce_single_and_empty(impl):
    # D = 1, S = 0 (offsets [0], T = 0) and T = 0 with empty segments
    for reduce in REDUCES:
        y = impl.segment_reduce(torch.zeros(0, 1), t64([0]), reduce)
        assert y.shape == (0, 1)
        y = impl.segment_reduce(torch.zeros(0, 3), t64([0, 0, 0]), reduce)
        assert_bitwise_equal(y, torch.zeros(2, 3))
        y = impl.segment_reduce(torch.tensor([[-2.5]]), t64([0, 1]), reduce)
        assert_bitwise_equal(y, torch.tensor([[-2.5]]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_segment_expand_fixed(impl, dtype):
    y = torch.tensor([[1.0, -1.0], [2.0, -2.0], [3.0, -3.0]], dtype=dtype)
    off = t64([0, 2, 2, 3])
    expected = torch.tensor([[1.0, -1.0], [1.0, -1.0], [3.0, -3.0]], dtype=dtype)
    assert_bitwise_equal(impl.segment_expand(y, off), expected)
    assert_bitwise_equal(impl.segment_expand(y, off, 3), expected)
    # S = 0 and T = 0
    assert impl.segment_expand(torch.zeros(0, 2, dtype=dtype), t64([0])).shape == (0, 2)
    assert impl.segment_expand(torch.ones(2, 2, dtype=dtype), t64([0, 0, 0]), 0).shape == (0, 2)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_segment_pack_unpack_fixed(impl, dtype):
    x = torch.arange(1.0, 6.0, dtype=dtype).reshape(5, 1)  # rows 1..5
    off = t64([0, 3, 3, 5])  # lengths 3, 0, 2
    packed = impl.segment_pack(x, off, 2)
    # the third row of segment 0 is dropped (max_len 2); the empty segment is zeros
    assert_bitwise_equal(packed, torch.tensor([[[1.0], [2.0]], [[0.0], [0.0]], [[4.0], [5.0]]],
                                              dtype=dtype))
    packed4 = impl.segment_pack(x, off, 4)
    assert_bitwise_equal(packed4, torch.tensor([[[1.0], [2.0], [3.0], [0.0]],
                                                [[0.0], [0.0], [0.0], [0.0]],
                                                [[4.0], [5.0], [0.0], [0.0]]], dtype=dtype))
    assert impl.segment_pack(x, off, 0).shape == (3, 0, 1)
    # unpack: positions at i >= L get zeros (row 3 = segment 0, i = 2)
    assert_bitwise_equal(impl.segment_unpack(packed, off),
                         torch.tensor([[1.0], [2.0], [0.0], [4.0], [5.0]], dtype=dtype))
    assert_bitwise_equal(impl.segment_unpack(packed4, off, 5), x)
    assert impl.segment_unpack(torch.zeros(0, 3, 1, dtype=dtype), t64([0])).shape == (0, 1)


# ----------------------------------------------------------------------------------------
# 1c. properties of the reference word splitter (the rule restated differently)
# ----------------------------------------------------------------------------------------

TEXT_ALPHABET = st.one_of(
    st.sampled_from(list(" \t\n\r\x0b\x0c.,!'_-()aZz09\x00\x1c\x7f\x85\xa0éß€日😀")),
    st.characters(codec="utf-8"),
)
TEXT_BYTES = st.text(alphabet=TEXT_ALPHABET, max_size=40).map(lambda s: s.encode("utf-8"))
ANY_BYTES = st.binary(max_size=40)
SEQUENCE = st.one_of(TEXT_BYTES, ANY_BYTES, st.just(b""))


def _is_rule_start(seq: bytes, i: int) -> bool:
    ws = b" \t\n\r\x0b\x0c"
    if i == 0:
        return True
    cur, prev = seq[i], seq[i - 1]
    is_word = lambda c: chr(c).isascii() and (chr(c).isalnum() or c == 95) or c >= 128
    if cur in ws:
        return prev not in ws
    return is_word(cur) and prev not in ws and not is_word(prev)


@given(seq=SEQUENCE, max_word_bytes=st.integers(4, 12))
def test_reference_split_properties(seq, max_word_bytes):
    starts = ref.split_words(seq, max_word_bytes)
    n = len(seq)
    if n == 0:
        assert starts == []
        return
    assert starts[0] == 0 and starts == sorted(set(starts)) and starts[-1] < n
    rule = [i for i in range(n) if _is_rule_start(seq, i)]
    assert set(rule) <= set(starts)
    ends = starts[1:] + [n]
    for a, b in zip(starts, ends):
        assert 1 <= b - a <= max_word_bytes
        if b < n and b not in rule:
            # b is a cut of the piece starting at a: the last char start in (a, a + max]
            char_starts = [c for c in range(a + 1, a + max_word_bytes + 1)
                           if seq[c] & 0xC0 != 0x80]
            assert b == (char_starts[-1] if char_starts else a + max_word_bytes)
    # without cutting (max larger than the sequence) exactly the rule starts remain
    assert ref.split_words(seq, max(4, n)) == rule


@given(seq=TEXT_BYTES, max_word_bytes=st.integers(4, 12))
def test_reference_valid_utf8_pieces_are_valid(seq, max_word_bytes):
    # for valid UTF-8 text every piece decodes on its own (cuts fall on character starts
    # whenever a character start exists in range, which for valid UTF-8 with
    # max_word_bytes >= 4 is always the case)
    starts = ref.split_words(seq, max_word_bytes)
    for a, b in zip(starts, starts[1:] + [len(seq)]):
        seq[a:b].decode("utf-8")


# ----------------------------------------------------------------------------------------
# 2. compiled ops against the reference on random inputs
# ----------------------------------------------------------------------------------------


@given(seqs=st.lists(SEQUENCE, max_size=6), max_word_bytes=st.integers(4, 24),
       mode=st.sampled_from(["space", "space", "bytes"]))
def test_word_boundaries_random(device, seqs, max_word_bytes, mode):
    data = b"".join(seqs)
    cu = offsets_from_lengths(len(s) for s in seqs)
    b = as_bytes_tensor(data)
    wo, wc = word_boundaries(b.to(device), cu.to(device), max_word_bytes, mode)
    ewo, ewc = ref.word_boundaries(b, cu, max_word_bytes, mode)
    assert wo.dtype == I64 and wc.dtype == I64
    assert wo.device.type == device and wc.device.type == device
    assert wo.cpu().tolist() == ewo.tolist()
    assert wc.cpu().tolist() == ewc.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_word_boundaries_large_random_stream(device, seed):
    # a long stream biased towards the interesting byte classes: whitespace runs,
    # punctuation, ASCII word bytes, UTF-8 lead bytes and (stray) continuation bytes,
    # split into many sequences (some empty), for several max_word_bytes
    g = torch.Generator().manual_seed(seed)
    pools = [b" \t\n\r\x0b\x0c", b".,;:!?()[]{}'\"-+=*/\\#\x00\x1c\x7f", b"abcXYZ019_",
             bytes(range(0xC2, 0xF5)), bytes(range(0x80, 0xC0)), bytes(range(0xF5, 0x100))]
    weights = torch.tensor([3.0, 2.0, 8.0, 1.0, 3.0, 0.3])
    n = 20_000
    which = torch.multinomial(weights, n, replacement=True, generator=g).tolist()
    picks = torch.randint(0, 1 << 30, (n,), generator=g).tolist()
    data = bytes(pools[w][r % len(pools[w])] for w, r in zip(which, picks))
    cuts = sorted(torch.randint(0, n + 1, (60,), generator=g).tolist())
    cu = t64([0] + cuts + [n])
    b = as_bytes_tensor(data)
    for max_word_bytes in (4, 5, 6, 9, 16, 64):
        wo, wc = word_boundaries(b.to(device), cu.to(device), max_word_bytes, "space")
        ewo, ewc = ref.word_boundaries(b, cu, max_word_bytes, "space")
        assert torch.equal(wo.cpu(), ewo) and torch.equal(wc.cpu(), ewc)


def test_word_boundaries_many_sequences(device):
    # More sequences than the CPU's word_cu ranges hold (16384 entries each), many of
    # them empty or one byte long: each range finds its first count by a binary search
    # and the rest by a merge, which must agree with the reference at every boundary.
    g = torch.Generator().manual_seed(7)
    n = 30_000
    data = bytes(b" a.\xc3\xa9"[i] for i in torch.randint(0, 5, (n,), generator=g).tolist())
    cuts = sorted(torch.randint(0, n + 1, (50_000,), generator=g).tolist())
    cu = t64([0] + cuts + [n])
    b = as_bytes_tensor(data)
    for max_word_bytes in (4, 16):
        wo, wc = word_boundaries(b.to(device), cu.to(device), max_word_bytes, "space")
        ewo, ewc = ref.word_boundaries(b, cu, max_word_bytes, "space")
        assert torch.equal(wo.cpu(), ewo) and torch.equal(wc.cpu(), ewc)


def test_word_boundaries_words_longer_than_a_work_chunk(device):
    # The kernels split the stream into chunks (64 KiB on the CPU, 256 bytes on CUDA);
    # a chunk's worker owns the words that start in it and walks them past its end.
    # Words of 150 KB (multi-byte letters, so the cuts depend on where each piece
    # started) cross many chunks; they must be cut exactly as by the reference.
    long_word = ("é" * 20_000 + "x" * 7 + "東京" * 15_000).encode() + b"\x80" * 1000
    data = b"start, " + long_word + b" middle\n" + long_word[:70_001] + b"!end"
    b = as_bytes_tensor(data)
    for cu in (t64([0, len(data)]), t64([0, 7, 7, 90_000, len(data)])):
        for max_word_bytes in (4, 7, 64):
            wo, wc = word_boundaries(b.to(device), cu.to(device), max_word_bytes, "space")
            ewo, ewc = ref.word_boundaries(b, cu, max_word_bytes, "space")
            assert torch.equal(wo.cpu(), ewo) and torch.equal(wc.cpu(), ewc)


@st.composite
def segment_offsets(draw, max_segments=8):
    """CSR offsets with empty segments, S = 0 and T = 0 included, sometimes long ones."""
    length = st.one_of(st.integers(0, 6), st.integers(0, 300))
    lengths = draw(st.lists(length, max_size=max_segments))
    return offsets_from_lengths(lengths)


@st.composite
def features(draw, rows: int, dtype, special=False):
    """[rows, D] values; ties (small integers) or Gaussian; optionally NaN/inf sprinkled."""
    d = draw(st.one_of(st.integers(1, 5), st.integers(1, 70)))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):
        x = torch.randint(-2, 3, (rows, d), generator=g).to(torch.float64)
    else:
        x = torch.randn(rows, d, generator=g, dtype=torch.float64) * draw(
            st.sampled_from([1e-3, 1.0, 100.0]))
    if special and draw(st.booleans()):
        pick = torch.randint(0, 10, (rows, d), generator=g)
        x = torch.where(pick == 0, float("nan"), x)
        x = torch.where(pick == 1, float("inf"), x)
        x = torch.where(pick == 2, float("-inf"), x)
    return x.to(dtype), g


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("reduce", REDUCES)
@given(data=st.data())
def test_segment_reduce_random(device, reduce, dtype, data):
    offsets = data.draw(segment_offsets())
    T = int(offsets[-1])
    x, g = data.draw(features(T, dtype, special=reduce in ("max", "min")))
    xd = x.to(device).requires_grad_(True)
    y = segment_reduce(xd, offsets.to(device), reduce)
    assert y.shape == (offsets.numel() - 1, x.shape[1]) and y.dtype == dtype
    check_reduce(y.detach().cpu(), x, offsets, reduce)
    # backward against the reference gradient (first-index rule for max/min)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    y.backward(grad_y.to(device))
    check_reduce_grad(xd.grad.cpu(), grad_y, x, offsets, reduce)


def _words_then_a_long_segment() -> torch.Tensor:
    """2000 words of 0..9 rows, one segment of 14000 rows, 2000 more words."""
    g = torch.Generator().manual_seed(12)
    lengths = torch.cat([torch.randint(0, 10, (2000,), generator=g), t64([14000]),
                         torch.randint(0, 10, (2000,), generator=g)])
    return torch.cat([t64([0]), lengths.cumsum(0)])


@pytest.mark.parametrize("layout", ["few", "mixed"])
@pytest.mark.parametrize("D", [64, 6])  # 16-byte vectors, or one element per thread
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("reduce", REDUCES)
def test_segment_reduce_few_long_segments(device, reduce, dtype, D, layout):
    # Few long segments (sequence pooling), or one long segment among many words: the
    # reduce takes their rows in blocks of 256, CPU and CUDA alike (the CPU shares out
    # the blocks of segments too long for one thread; CUDA runs a thread per block, for
    # "mixed" only over the segments longer than one block, which its offsets check
    # finds; without the check a thread walks each such segment), so the results match
    # the reference and each other bit for bit.
    g = torch.Generator().manual_seed(11)
    offsets = t64([0, 300, 300, 3000, 3001, 20000]) if layout == "few" else _words_then_a_long_segment()
    x = (torch.randn(int(offsets[-1]), D, generator=g, dtype=torch.float64) * 3).to(dtype)
    x[5, 0], x[4000, D - 1] = float("nan"), float("inf")
    if reduce in ("max", "min"):  # ties across the rows of a long segment: the first one gets the gradient
        x[7000:7010] = x[9000:9010] = x[15000:15010] = 100.0 if reduce == "max" else -100.0
    y = segment_reduce(x.to(device), offsets.to(device), reduce).cpu()
    check_reduce(y, x, offsets, reduce)
    # the backward (on CUDA, max/min over a few long segments runs in two passes)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    grad_x = ops().segment_reduce_backward(grad_y.to(device), offsets.to(device), x.shape[0], reduce, x.to(device),
                                           y.to(device)).cpu()
    check_reduce_grad(grad_x, grad_y, x, offsets, reduce)
    if device != "cpu":
        assert_bitwise_equal(y, segment_reduce(x, offsets, reduce))
        assert_bitwise_equal(grad_x, ops().segment_reduce_backward(grad_y, offsets, x.shape[0], reduce, x, y))
        unchecked = segment_reduce(x.to(device), offsets.to(device), reduce, check_offsets=False).cpu()
        assert_bitwise_equal(unchecked, y)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_segment_ops_on_words_and_a_long_segment(device, dtype):
    # On the CPU a segment too long for one thread (here 14000 of ~32000 rows) is cut
    # into pieces that all threads share; every op that writes rows per segment
    # (expand, the backward, pack, unpack) must cover each piece exactly.
    g = torch.Generator().manual_seed(13)
    offsets = _words_then_a_long_segment()
    S, T, D = offsets.numel() - 1, int(offsets[-1]), 24
    y = (torch.randn(S, D, generator=g, dtype=torch.float64) * 3).to(dtype)
    dev_offsets = offsets.to(device)
    assert_bitwise_equal(segment_expand(y.to(device), dev_offsets, T).cpu(), ref.segment_expand(y, offsets))
    x = (torch.randn(T, D, generator=g, dtype=torch.float64) * 3).to(dtype)
    for reduce in ("sum", "mean"):
        grad_x = ops().segment_reduce_backward(y.to(device), dev_offsets, T, reduce).cpu()
        check_reduce_grad(grad_x, y, x, offsets, reduce)
    # max/min: values from a small set tie across the pieces of the long segment (the
    # first attaining row must win), and a NaN sits in its middle
    ties = torch.randint(-1, 3, (T, D), generator=g).to(dtype)
    ties[int(offsets[2000]) + 7000, 5] = float("nan")
    for reduce in ("max", "min"):
        result = ref.segment_reduce(ties, offsets, reduce)
        grad_x = ops().segment_reduce_backward(y.to(device), dev_offsets, T, reduce, ties.to(device),
                                               result.to(device)).cpu()
        check_reduce_grad(grad_x, y, ties, offsets, reduce)
    # unpack keeps a segment's first max_len rows and zeroes the rest: both inside the long one
    packed = (torch.randn(S, 5000, 2, generator=g, dtype=torch.float64) * 3).to(dtype)
    assert_bitwise_equal(segment_unpack(packed.to(device), dev_offsets, T).cpu(), ref.segment_unpack(packed, offsets))
    # pack with few segments: each segment's max_len packed rows are too many for one thread
    few = t64([0, 3, 9000, 9005])
    assert_bitwise_equal(segment_pack(x[:9005].to(device), few.to(device), 9000).cpu(),
                         ref.segment_pack(x[:9005], few, 9000))


# rows of 2, 4, 8, 16 and 32 bytes
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 1), (torch.float32, 1), (torch.float32, 2), (torch.float16, 4),
                                     (torch.float64, 2), (torch.bfloat16, 8), (torch.float32, 8)], ids=str)
def test_narrow_rows_expand_and_backward_over_many_row_ranges(device, dtype, D):
    # Rows of 2 to 32 bytes: the CPU writes a word's rows with one run of its row
    # repeated, spilling into the next word's rows, and shares the output's rows out
    # in ranges of 65536; 200000 rows make several ranges, whose edges fall inside
    # words, empty segments and a long segment.
    g = torch.Generator().manual_seed(17)
    lengths = torch.randint(0, 12, (33000,), generator=g)
    lengths[5000] = 70000  # a long segment across a range edge
    lengths[-1] = 0        # an empty last segment
    offsets = torch.cat([t64([0]), lengths.cumsum(0)])
    S, T = offsets.numel() - 1, int(offsets[-1])
    assert T > 3 * 65536
    y = (torch.randn(S, D, generator=g, dtype=torch.float64) * 3).to(dtype)
    dev_offsets = offsets.to(device)
    assert_bitwise_equal(segment_expand(y.to(device), dev_offsets, T).cpu(), ref.segment_expand(y, offsets))
    x = torch.zeros(T, D, dtype=dtype)
    for reduce in ("sum", "mean"):
        grad_x = ops().segment_reduce_backward(y.to(device), dev_offsets, T, reduce).cpu()
        check_reduce_grad(grad_x, y, x, offsets, reduce)
    # the forward: on AVX-512 CPUs rows of 1-8 f32/bf16/f16 features (16 bytes at most) go
    # 16 words at a time through transposes, words of 17 rows and more row by row or in blocks
    x = (torch.randn(T, D, generator=g, dtype=torch.float64) * 3).to(dtype)
    x[::97] = float("nan")
    x[1::5] = x[::5]  # ties within words
    for reduce in REDUCES:
        result = segment_reduce(x.to(device), dev_offsets, reduce)
        check_reduce(result.cpu(), x, offsets, reduce)
        if reduce in ("max", "min"):  # on AVX-512 CPUs, 1-8 features of 16 bytes at most: 16 elements at a time
            grad_x = ops().segment_reduce_backward(y.to(device), dev_offsets, T, reduce, x.to(device), result).cpu()
            check_reduce_grad(grad_x, y, x, offsets, reduce)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("reduce", REDUCES)
@given(data=st.data())
def test_segment_reduce_backward_op_random(device, reduce, dtype, data):
    # the helper op as documented: segment_reduce_backward(grad_y, offsets, total, reduce, x, y)
    offsets = data.draw(segment_offsets())
    x, g = data.draw(features(int(offsets[-1]), dtype, special=reduce in ("max", "min")))
    y = ref.segment_reduce(x, offsets, reduce)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    gx = ops().segment_reduce_backward(grad_y.to(device), offsets.to(device), x.shape[0], reduce,
                                       x.to(device), y.to(device))
    check_reduce_grad(gx.cpu(), grad_y, x, offsets, reduce)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@given(data=st.data())
def test_segment_expand_random(device, dtype, data):
    offsets = data.draw(segment_offsets())
    S, T = offsets.numel() - 1, int(offsets[-1])
    y, g = data.draw(features(S, dtype, special=True))
    total = data.draw(st.sampled_from([None, T]))
    yd = y.to(device).requires_grad_(True)
    x = segment_expand(yd, offsets.to(device), total)
    assert_bitwise_equal(x.detach().cpu(), ref.segment_expand(y, offsets))  # a copy: exact
    grad_x = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    x.backward(grad_x.to(device))
    expected = ref.segment_expand_backward(grad_x.to(torch.float64), offsets).to(dtype)  # exact_reference
    assert_within(yd.grad.cpu(), expected, sum_tolerance(grad_x, offsets, expected, False))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@given(data=st.data())
def test_segment_pack_unpack_random(device, dtype, data):
    offsets = data.draw(segment_offsets())
    S, T = offsets.numel() - 1, int(offsets[-1])
    x, g = data.draw(features(T, dtype, special=True))
    max_len = data.draw(st.one_of(st.integers(0, 8), st.integers(0, 320)))
    xd = x.to(device).requires_grad_(True)
    packed = segment_pack(xd, offsets.to(device), max_len)
    # pure data movement: exact
    assert_bitwise_equal(packed.detach().cpu(), ref.segment_pack(x, offsets, max_len))
    grad_p = torch.randn(packed.shape, generator=g, dtype=torch.float64).to(dtype)
    packed.backward(grad_p.to(device))
    assert_bitwise_equal(xd.grad.cpu(), ref.segment_unpack(grad_p, offsets, T))

    p = torch.randn(S, max_len, x.shape[1], generator=g, dtype=torch.float64).to(dtype)
    pd = p.to(device).requires_grad_(True)
    total = data.draw(st.sampled_from([None, T]))
    out = segment_unpack(pd, offsets.to(device), total)
    assert_bitwise_equal(out.detach().cpu(), ref.segment_unpack(p, offsets))
    grad_o = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    out.backward(grad_o.to(device))
    assert_bitwise_equal(pd.grad.cpu(), ref.segment_pack(grad_o, offsets, max_len))


@pytest.mark.parametrize("reduce", REDUCES)
def test_wrappers_accept_extra_feature_dims(device, reduce):
    g = torch.Generator().manual_seed(0)
    offsets = t64([0, 3, 3, 7])
    x = torch.randn(7, 2, 3, generator=g)
    y = segment_reduce(x.to(device), offsets.to(device), reduce)
    assert y.shape == (3, 2, 3)
    check_reduce(y.cpu(), x, offsets, reduce)
    x_back = segment_expand(y, offsets.to(device))
    assert x_back.shape == (7, 2, 3)
    assert_bitwise_equal(x_back.cpu(), ref.segment_expand(y.cpu(), offsets))
    packed = segment_pack(x.to(device), offsets.to(device), 5)
    assert packed.shape == (3, 5, 2, 3)
    assert_bitwise_equal(packed.cpu(), ref.segment_pack(x, offsets, 5))
    assert_bitwise_equal(segment_unpack(packed, offsets.to(device)).cpu(), x)


@pytest.mark.parametrize("reduce", REDUCES)
def test_wrappers_accept_rows_without_features(device, reduce):
    # x [T] -> [S], y [S] -> [T], x [T] -> packed [S, L] and back: one scalar per row,
    # the same values as with a feature dimension of 1, gradients included
    g = torch.Generator().manual_seed(1)
    offsets, dev_offsets = t64([0, 3, 3, 7]), t64([0, 3, 3, 7]).to(device)
    x = torch.randn(7, generator=g, dtype=torch.float64)
    xd = x.clone().to(device).requires_grad_(True)
    y = segment_reduce(xd, dev_offsets, reduce)
    assert y.shape == (3,)
    check_reduce(y.detach().cpu()[:, None], x[:, None], offsets, reduce)
    y.backward(torch.arange(1.0, 4.0, dtype=torch.float64, device=device))
    x_col = x[:, None].clone().to(device).requires_grad_(True)
    segment_reduce(x_col, dev_offsets, reduce).backward(torch.arange(1.0, 4.0, dtype=torch.float64,
                                                                     device=device)[:, None])
    assert_bitwise_equal(xd.grad.cpu(), x_col.grad.cpu()[:, 0])
    rows = y.detach()
    expanded = segment_expand(rows, dev_offsets)
    assert expanded.shape == (7,)
    assert_bitwise_equal(expanded.cpu(), ref.segment_expand(rows.cpu()[:, None], offsets)[:, 0])
    packed = segment_pack(x.to(device), dev_offsets, 5)
    assert packed.shape == (3, 5)
    assert_bitwise_equal(packed.cpu(), ref.segment_pack(x[:, None], offsets, 5)[..., 0])
    unpacked = segment_unpack(packed, dev_offsets)
    assert unpacked.shape == (7,)
    assert_bitwise_equal(unpacked.cpu(), x)


def test_default_arguments():
    # reduce defaults to "mean"; max_word_bytes to 16 and mode to "space"
    x = torch.tensor([[1.0], [2.0]])
    assert segment_reduce(x, t64([0, 2])).tolist() == [[1.5]]
    data = b"abcdefghijklmnopqrstu"  # 21 bytes -> 16 + 5
    wo, wc = word_boundaries(as_bytes_tensor(data), t64([0, 21]))
    assert wo.tolist() == [0, 16, 21] and wc.tolist() == [0, 2]


# ----------------------------------------------------------------------------------------
# 3. real text: Python standard library sources (code, prose, some non-ASCII)
# ----------------------------------------------------------------------------------------

STDLIB_FILES = ["textwrap.py", "difflib.py", "statistics.py", "shlex.py", "functools.py",
                "this.py", "heapq.py", "fractions.py"]


def _stdlib_corpus() -> list[bytes]:
    root = sysconfig.get_paths()["stdlib"]
    texts = []
    for name in STDLIB_FILES:
        path = os.path.join(root, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                texts.append(f.read())
    topics = os.path.join(root, "pydoc_data", "topics.py")
    if os.path.exists(topics):
        with open(topics, "rb") as f:
            texts.append(f.read(200_000))  # English prose about Python
    if len(texts) < 3:
        pytest.skip(f"too few standard library sources found under {root}")
    return texts


@pytest.mark.parametrize("max_word_bytes,mode", [(16, "space"), (4, "space"), (7, "space"),
                                                 (16, "bytes")])
def test_word_boundaries_stdlib_sources(device, max_word_bytes, mode):
    texts = _stdlib_corpus()
    assert any(any(c >= 0x80 for c in t) for t in texts), "corpus has no non-ASCII bytes"
    data = b"".join(texts)
    b = as_bytes_tensor(data)
    cu = offsets_from_lengths(len(t) for t in texts)
    wo, wc = word_boundaries(b.to(device), cu.to(device), max_word_bytes, mode)
    ewo, ewc = ref.word_boundaries(b, cu, max_word_bytes, mode)
    assert torch.equal(wo.cpu(), ewo)
    assert torch.equal(wc.cpu(), ewc)
    # also as one long sequence
    cu1 = t64([0, len(data)])
    wo, wc = word_boundaries(b.to(device), cu1.to(device), max_word_bytes, mode)
    ewo, ewc = ref.word_boundaries(b, cu1, max_word_bytes, mode)
    assert torch.equal(wo.cpu(), ewo) and torch.equal(wc.cpu(), ewc)


def test_pool_stdlib_words_end_to_end(device):
    # byte embeddings -> word vectors -> back to bytes, on real word boundaries
    texts = _stdlib_corpus()[:3]
    data = b"".join(texts)
    b = as_bytes_tensor(data)
    cu = offsets_from_lengths(len(t) for t in texts)
    wo, _ = word_boundaries(b.to(device), cu.to(device))
    table = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    x = table[b.long()]
    for reduce in REDUCES:
        y = segment_reduce(x.to(device), wo, reduce)
        check_reduce(y.cpu(), x, wo.cpu(), reduce)
    y = segment_reduce(x.to(device), wo, "max")
    assert_bitwise_equal(segment_expand(y, wo, len(data)).cpu(),
                         ref.segment_expand(y.cpu(), wo.cpu()))


# ----------------------------------------------------------------------------------------
# 4a. torch.library.opcheck
# ----------------------------------------------------------------------------------------


def _opcheck_samples(device):
    g = torch.Generator().manual_seed(0)
    off = t64([0, 2, 2, 5, 9]).to(device)

    def feat(shape, dtype, grad=True):
        return torch.randn(shape, generator=g).to(dtype).to(device).requires_grad_(grad)

    samples = []
    text = as_bytes_tensor("Hello, wörld! snake_case_identifier  ok".encode()).to(device)
    cu = t64([0, 10, 10, text.numel()]).to(device)
    samples += [
        ("word_boundaries", (text, cu, 16, "space")),
        ("word_boundaries", (text, cu, 4, "space")),
        ("word_boundaries", (text, cu, 16, "bytes")),
        ("word_boundaries", (torch.zeros(0, dtype=torch.uint8, device=device),
                             t64([0, 0]).to(device), 16, "space")),
    ]
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for reduce in REDUCES:
            samples.append(("segment_reduce", (feat((9, 3), dtype), off, reduce)))
        x = feat((9, 3), dtype, grad=False)
        for reduce in REDUCES:
            y = ops().segment_reduce(x, off, reduce)
            samples.append(("segment_reduce_backward",
                            (feat((4, 3), dtype, grad=False), off, 9, reduce, x, y)))
        samples += [
            ("segment_expand", (feat((4, 3), dtype), off, 9)),
            ("segment_expand", (feat((4, 3), dtype), off, None)),
            ("segment_pack", (feat((9, 3), dtype), off, 3)),
            ("segment_pack", (feat((9, 3), dtype), off, 6)),
            ("segment_unpack", (feat((4, 3, 3), dtype), off, 9)),
            ("segment_unpack", (feat((4, 3, 3), dtype), off, None)),
        ]
    empty = t64([0]).to(device)
    samples += [
        ("segment_reduce", (feat((0, 2), torch.float32), empty, "sum")),
        ("segment_expand", (feat((0, 2), torch.float32), empty, 0)),
        ("segment_pack", (feat((0, 2), torch.float32), empty, 2)),
        ("segment_unpack", (feat((0, 2, 2), torch.float32), empty, 0)),
    ]
    # check_offsets=False (what the backward passes use): the same kernels, no CUDA check
    x = feat((9, 3), torch.float32)
    trusted = {"check_offsets": False}
    samples += [
        ("segment_reduce", (x, off, "max"), trusted),
        ("segment_reduce_backward", (feat((4, 3), torch.float32, grad=False), off, 9, "sum"), trusted),
        ("segment_expand", (feat((4, 3), torch.float32), off, None), trusted),
        ("segment_pack", (x, off, 3), trusted),
        ("segment_unpack", (feat((4, 3, 3), torch.float32), off, 9), trusted),
    ]
    return samples


@pytest.mark.parametrize(
    "name", ["word_boundaries", "segment_reduce", "segment_reduce_backward",
             "segment_expand", "segment_pack", "segment_unpack"])
def test_opcheck(device, name):
    samples = [(args, *kwargs) for n, args, *kwargs in _opcheck_samples(device) if n == name]
    assert samples
    op = getattr(ops(), name)
    for args, *kwargs in samples:
        torch.library.opcheck(op, args, *kwargs)


# ----------------------------------------------------------------------------------------
# 4b. gradcheck in float64 (Python wrappers and raw torch.ops)
# ----------------------------------------------------------------------------------------

GRAD_OFFSETS = [0, 3, 3, 4, 8]  # lengths 3, 0, 1, 4


@pytest.mark.parametrize("check", ["gradcheck", "gradgradcheck"])  # gradgrad: the backward's own backward
@pytest.mark.parametrize("via", ["wrapper", "raw"])
@pytest.mark.parametrize("reduce", REDUCES)
def test_gradcheck_segment_reduce(device, via, reduce, check):
    off = t64(GRAD_OFFSETS).to(device)
    # Gaussian values: distinct with probability 1, so max/min are differentiable here
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 3, dtype=torch.float64, generator=g).to(device).requires_grad_(True)
    op = segment_reduce if via == "wrapper" else ops().segment_reduce
    assert getattr(torch.autograd, check)(lambda x: op(x, off, reduce), (x,))


@pytest.mark.parametrize("check", ["gradcheck", "gradgradcheck"])
@pytest.mark.parametrize("via", ["wrapper", "raw"])
@pytest.mark.parametrize("total", [None, 8])
def test_gradcheck_segment_expand(device, via, total, check):
    off = t64(GRAD_OFFSETS).to(device)
    y = torch.randn(4, 3, dtype=torch.float64).to(device).requires_grad_(True)
    if via == "wrapper":
        fn = lambda y: segment_expand(y, off, total)  # noqa: E731
    else:
        fn = lambda y: ops().segment_expand(y, off, total)  # noqa: E731
    assert getattr(torch.autograd, check)(fn, (y,))


@pytest.mark.parametrize("check", ["gradcheck", "gradgradcheck"])
@pytest.mark.parametrize("via", ["wrapper", "raw"])
@pytest.mark.parametrize("max_len", [0, 2, 5])  # 2 drops rows of the longer segments
def test_gradcheck_segment_pack(device, via, max_len, check):
    off = t64(GRAD_OFFSETS).to(device)
    x = torch.randn(8, 3, dtype=torch.float64).to(device).requires_grad_(True)
    if via == "wrapper":
        fn = lambda x: segment_pack(x, off, max_len)  # noqa: E731
    else:
        fn = lambda x: ops().segment_pack(x, off, max_len)  # noqa: E731
    assert getattr(torch.autograd, check)(fn, (x,))


@pytest.mark.parametrize("check", ["gradcheck", "gradgradcheck"])
@pytest.mark.parametrize("via", ["wrapper", "raw"])
@pytest.mark.parametrize("L", [2, 5])  # 2: positions i >= 2 of longer segments get zeros
def test_gradcheck_segment_unpack(device, via, L, check):
    off = t64(GRAD_OFFSETS).to(device)
    p = torch.randn(4, L, 3, dtype=torch.float64).to(device).requires_grad_(True)
    if via == "wrapper":
        fn = lambda p: segment_unpack(p, off, 8)  # noqa: E731
    else:
        fn = lambda p: ops().segment_unpack(p, off, None)  # noqa: E731
    assert getattr(torch.autograd, check)(fn, (p,))


def test_double_backward_known_values():
    # d/dg of sum(d/dx <g, segment_sum(x)>) = segment lengths, per feature
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = segment_reduce(x, t64([0, 2, 5]), "sum")
    g = torch.ones_like(y, requires_grad=True)
    (gx,) = torch.autograd.grad(y, x, g, create_graph=True)
    (gg,) = torch.autograd.grad(gx.sum(), g)
    assert torch.equal(gg, torch.tensor([[2.0] * 3, [3.0] * 3], dtype=torch.float64))


# ----------------------------------------------------------------------------------------
# 4b'. torch.func (grad, vmap, jvp, jacrev, jacfwd, hessian) and forward-mode AD, against
# each op written as a dense pure-torch function: linear ops as a matrix that the
# reference op builds from identity columns, max/min as the sum over the mask of first
# attaining rows that the reference backward gives (constant where x does not tie).
# ----------------------------------------------------------------------------------------

FUNC_OFFSETS = [0, 2, 2, 5, 9]  # an empty segment, and one longer than FUNC_MAX_LEN
FUNC_MAX_LEN = 3
FUNC_OPS = ["sum", "mean", "max", "min", "expand", "pack", "unpack"]


def _func_case(op, device="cpu"):
    """(tokcore function, dense function maker, input) on device: dense(a) gives the
    dense function at the point a (max/min fix their attaining rows there). The dense
    forms are built on the CPU by the reference ops."""
    cpu_off, L = t64(FUNC_OFFSETS), FUNC_MAX_LEN
    off = cpu_off.to(device)
    S, T = len(FUNC_OFFSETS) - 1, FUNC_OFFSETS[-1]
    eye = lambda n: torch.eye(n, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(device)
    if op in REDUCES:
        sums = ref.segment_reduce(eye(T), cpu_off, "sum" if op in ("max", "min") else op).to(device)  # [S, T]

        def dense(a):
            if op in ("sum", "mean"):
                return lambda t: sums @ t
            y = ref.segment_reduce(a.cpu(), cpu_off, op)
            mask = ref.segment_reduce_backward(torch.ones_like(y), a.cpu(), y, cpu_off, op).to(device)
            return lambda t: sums @ (mask * t)

        return (lambda t: segment_reduce(t, off, op)), dense, randn(T, 4)
    if op == "expand":
        m = ref.segment_expand(eye(S), cpu_off).to(device)  # [T, S]
        return (lambda t: segment_expand(t, off, T)), (lambda a: lambda t: m @ t), randn(S, 4)
    if op == "pack":
        m = ref.segment_pack(eye(T), cpu_off, L).reshape(S * L, T).to(device)
        return (lambda t: segment_pack(t, off, L)), (lambda a: lambda t: (m @ t).reshape(S, L, -1)), randn(T, 4)
    m = ref.segment_unpack(eye(S * L).reshape(S, L, S * L), cpu_off).to(device)  # [T, S * L]
    return (lambda t: segment_unpack(t, off, T)), (lambda a: lambda t: m @ t.reshape(S * L, -1)), randn(S, L, 4)


@pytest.mark.parametrize("op", FUNC_OPS)
def test_torch_func_transforms_match_dense(op, device):
    f, dense, a = _func_case(op, device)
    fd = dense(a)
    tangent = torch.randn_like(a)
    loss = lambda fn: (lambda t: fn(t).sin().sum())
    close = lambda u, v: torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    close(torch.func.grad(loss(f))(a), torch.func.grad(loss(fd))(a))
    close(torch.func.jvp(f, (a,), (tangent,))[1], fd(tangent))
    jacobian = torch.func.jacrev(fd)(a)
    close(torch.func.jacrev(f)(a), jacobian)
    close(torch.func.jacfwd(f)(a), jacobian)
    cube = lambda fn: (lambda t: fn(t).pow(3).sum())  # a Hessian that depends on the point
    close(torch.func.hessian(cube(f))(a), torch.func.hessian(cube(fd))(a))
    from torch.autograd import forward_ad as fwad

    with fwad.dual_level():
        out = f(fwad.make_dual(a, tangent))
        close(fwad.unpack_dual(out).tangent, fd(tangent))


@pytest.mark.parametrize("op", FUNC_OPS)
def test_torch_func_per_sample_gradients(op, device):
    # vmap over grad: each sample's gradient, as a loop over the samples gives
    f, dense, a = _func_case(op, device)
    batch = torch.stack([a, a.flip(-1), torch.randn_like(a)])
    loss = lambda fn: (lambda t: fn(t).sin().sum())
    got = torch.func.vmap(torch.func.grad(loss(f)))(batch)
    want = torch.stack([torch.func.grad(loss(dense(s)))(s) for s in batch])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", FUNC_OPS)
@pytest.mark.parametrize("in_dim", [0, 1, 2])
def test_vmap_folds_the_batch_into_features(op, in_dim, device, recwarn):
    # shared offsets: one call with the batch folded into the features, the same bits as
    # a loop, and no slow per-sample fallback (torch warns of "a performance drop")
    f, _, a = _func_case(op, device)
    if in_dim >= a.dim() + 1:
        pytest.skip("no such dimension")
    batch = torch.stack([a, -a, a * 3, torch.zeros_like(a)], dim=in_dim)
    for b in (batch, batch.float(), batch.bfloat16()):
        want = torch.stack([f(s) for s in b.unbind(in_dim)])
        assert torch.equal(torch.func.vmap(f, in_dims=in_dim)(b), want)
    assert not [w for w in recwarn if "performance drop" in str(w.message)]


def test_vmap_with_batched_offsets_runs_each_sample():
    x = torch.randn(2, 6, 3)
    offsets = torch.stack([t64([0, 2, 6]), t64([0, 5, 6])])
    got = torch.func.vmap(lambda t, o: segment_reduce(t, o, "max"))(x, offsets)
    assert torch.equal(got, torch.stack([segment_reduce(x[i], offsets[i], "max") for i in range(2)]))
    got = torch.func.vmap(lambda y, o: segment_expand(y, o, 6))(x[:, :2], offsets)
    assert torch.equal(got, torch.stack([segment_expand(x[i, :2], offsets[i], 6) for i in range(2)]))
    # samples whose offsets end at different totals have outputs of different sizes:
    # an error that says so (torch.stack's own names no argument)
    uneven = torch.stack([t64([0, 2, 6]), t64([0, 5, 5])])
    for fn, arg in ((segment_expand, x[:, :2]), (segment_unpack, torch.randn(2, 2, 5, 3))):
        with pytest.raises(ValueError, match=rf"tokcore.{fn.__name__}: under vmap with batched offsets every "
                                             r"sample's output must have the same shape, but sample 0's is "
                                             r"\[6, 3\] and sample 1's \[5, 3\]: every sample's offsets must "
                                             r"end at the same total"):
            torch.func.vmap(lambda y, o: fn(y, o))(arg, uneven)


@pytest.mark.parametrize("op", FUNC_OPS)
@pytest.mark.parametrize("batched_offsets", [False, True])
def test_vmap_over_an_empty_batch(op, batched_offsets):
    # torch's vmap takes a batch of 0 samples: the result is [0, *one sample's result],
    # as a pure-torch function gives (the feature width cannot be read off the folded
    # output, and there is no sample to run the op on)
    f, _, a = _func_case(op)
    want = (0, *f(a).shape)
    if not batched_offsets:
        assert torch.func.vmap(f)(a.new_zeros(0, *a.shape)).shape == want
        return
    off, L, T = t64(FUNC_OFFSETS), FUNC_MAX_LEN, FUNC_OFFSETS[-1]
    call = {"expand": lambda t, o: segment_expand(t, o, T), "pack": lambda t, o: segment_pack(t, o, L),
            "unpack": lambda t, o: segment_unpack(t, o, T)}.get(op, lambda t, o: segment_reduce(t, o, op))
    got = torch.func.vmap(call)(a.new_zeros(0, *a.shape), off.new_zeros(0, *off.shape))
    assert got.shape == want and got.dtype == a.dtype


@pytest.mark.parametrize("reduce", ["max", "min"])
def test_max_min_derivatives_ignore_nonfinite_values_at_other_rows(reduce):
    # forward mode and the double backward take the attaining row's value alone, as
    # torch's amax does: an inf or NaN at another row must not turn into NaN (inf * 0)
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0], [2.0, 0.0]], dtype=torch.float64)
    off = t64([0, 3])
    inf, nan = float("inf"), float("nan")
    # finite (5) only at the attaining rows: max rows 1 and 0, min rows 0 and 1
    v = [[inf, 5.0], [5.0, nan], [nan, -inf]] if reduce == "max" else [[5.0, inf], [nan, 5.0], [-inf, nan]]
    v = torch.tensor(v, dtype=torch.float64)
    dense = (lambda t: t.amax(0, keepdim=True)) if reduce == "max" else (lambda t: t.amin(0, keepdim=True))
    f = lambda t: segment_reduce(t, off, reduce)  # noqa: E731
    want = torch.func.jvp(dense, (x,), (v,))[1]
    assert torch.equal(torch.func.jvp(f, (x,), (v,))[1], want)
    assert torch.isfinite(want).all()
    for fn in (f, lambda t: ops().segment_reduce(t, off, reduce)):  # the Function's and the registered autograd
        xr = x.clone().requires_grad_(True)
        g = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
        (gx,) = torch.autograd.grad(fn(xr), xr, g, create_graph=True)
        (gg,) = torch.autograd.grad((gx * v).sum(), g)
        assert torch.equal(gg, want)


def test_vmap_of_the_raw_backward_op():
    # the backward op's vmap rule: grad_y batched, x and y shared (and the reverse)
    off, x = t64([0, 2, 5]), torch.randn(5, 3)
    y = segment_reduce(x, off, "max")
    grads = torch.randn(4, 2, 3)
    got = torch.func.vmap(lambda g: ops().segment_reduce_backward(g, off, 5, "max", x, y))(grads)
    assert torch.equal(got, torch.stack([ops().segment_reduce_backward(g, off, 5, "max", x, y) for g in grads]))
    xs = torch.randn(4, 5, 3)
    ys = torch.stack([segment_reduce(s, off, "min") for s in xs])
    got = torch.func.vmap(lambda s, t: ops().segment_reduce_backward(grads[0], off, 5, "min", s, t))(xs, ys)
    want = torch.stack([ops().segment_reduce_backward(grads[0], off, 5, "min", s, t) for s, t in zip(xs, ys)])
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------
# 4c. torch.compile(fullgraph=True)
# ----------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_word_boundaries(device, fresh_dynamo):
    def f(b, cu):
        wo, wc = word_boundaries(b, cu, 8, "space")
        return wo + 0, wc * 1

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    for text in (b"Hello, world! abcdefghijklmnop", b" ,foo\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9x"):
        b = as_bytes_tensor(text)
        cu = t64([0, 5, len(text)])
        wo, wc = cf(b.to(device), cu.to(device))
        ewo, ewc = ref.word_boundaries(b, cu, 8, "space")
        assert torch.equal(wo.cpu(), ewo) and torch.equal(wc.cpu(), ewc)


def test_compile_word_boundaries_of_text(fresh_dynamo):
    # the str/bytes convenience of the wrapper traces too (the text is a constant)
    def f(text):
        return word_boundaries(text, None, 8)[0] + 0

    for text in ("Hello, world!", b"ab cd", ""):
        got = torch.compile(f, backend="aot_eager", fullgraph=True)(text)
        data = text.encode() if isinstance(text, str) else text
        assert torch.equal(got, ref.word_boundaries(as_bytes_tensor(data), t64([0, len(data)]), 8, "space")[0])


@pytest.mark.parametrize("reduce", REDUCES)
def test_compile_segment_reduce(device, reduce, fresh_dynamo):
    def f(x, off):
        return segment_reduce(x * 2, off, reduce).sin()

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    off = t64([0, 2, 2, 6]).to(device)
    x = torch.randn(6, 4, dtype=torch.float64)
    xd = x.to(device).requires_grad_(True)
    out = cf(xd, off)
    expected = ref.segment_reduce(x * 2, off.cpu(), reduce).sin()
    torch.testing.assert_close(out.detach().cpu(), expected)
    out.sum().backward()
    y = ref.segment_reduce(x * 2, off.cpu(), reduce)
    expected_grad = 2 * ref.segment_reduce_backward(y.cos(), x * 2, y, off.cpu(), reduce)
    torch.testing.assert_close(xd.grad.cpu(), expected_grad)


@pytest.mark.parametrize("total", ["given", "none"])
def test_compile_segment_expand(device, total, fresh_dynamo):
    def f(y, off):
        return segment_expand(y + 1, off, 6 if total == "given" else None)

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    off = t64([0, 2, 2, 6]).to(device)
    y = torch.randn(3, 4, dtype=torch.float64)
    yd = y.to(device).requires_grad_(True)
    out = cf(yd, off)
    assert_bitwise_equal(out.detach().cpu(), ref.segment_expand(y + 1, off.cpu()))
    g = torch.randn(6, 4, dtype=torch.float64)
    out.backward(g.to(device))
    torch.testing.assert_close(yd.grad.cpu(), ref.segment_reduce(g, off.cpu(), "sum"))


def test_compile_segment_pack(device, fresh_dynamo):
    def f(x, off):
        return segment_pack(x, off, 3) * 3

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    off = t64([0, 2, 2, 6]).to(device)
    x = torch.randn(6, 4, dtype=torch.float64)
    xd = x.to(device).requires_grad_(True)
    out = cf(xd, off)
    assert_bitwise_equal(out.detach().cpu(), ref.segment_pack(x, off.cpu(), 3) * 3)
    g = torch.randn(3, 3, 4, dtype=torch.float64)
    out.backward(g.to(device))
    assert_bitwise_equal(xd.grad.cpu(), ref.segment_unpack(g * 3, off.cpu(), 6))


def test_compile_dynamic_pack_of_nothing(device, fresh_dynamo):
    # max_len 0 gives a tensor with no elements, which torch could not reshape with
    # symbolic sizes: the wrapper must not reshape what has one feature dimension
    cf = torch.compile(segment_pack, backend="aot_eager", fullgraph=True, dynamic=True)
    for offsets in ([0, 0, 0, 5, 6], [0, 6], [0, 2, 4, 6]):
        out = cf(torch.randn(6, 3, device=device), t64(offsets).to(device), 0)
        assert out.shape == (len(offsets) - 1, 0, 3)
    # more feature dimensions: the wrapper builds the result, which stays differentiable
    x = torch.randn(6, 2, 3, device=device, requires_grad=True)
    out = cf(x, t64([0, 2, 6]).to(device), 0)
    assert out.shape == (2, 0, 2, 3) and out.requires_grad
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_compile_never_drops_a_tangent(fresh_dynamo):
    # Inside a dual level, torch 2.13 runs a compiled function eagerly, where the
    # wrappers' Functions carry the tangent. Were dynamo to trace it, the tangents would
    # be invisible and the wrappers would call the raw ops: then they must refuse.
    from torch.autograd import forward_ad as fwad

    off, x, t = t64([0, 2, 2, 5, 6]), torch.randn(6, 4), torch.randn(6, 4)
    cf = torch.compile(lambda d: segment_reduce(d, off, "sum") * 2, backend="aot_eager")
    with fwad.dual_level():
        try:
            out = cf(fwad.make_dual(x, t))
        except Exception as e:  # noqa: BLE001 (dynamo wraps the wrapper's error)
            assert "forward-mode AD is not supported" in str(e)
            return
        tangent = fwad.unpack_dual(out).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, 2 * segment_reduce(t, off, "sum"))


def test_compile_segment_unpack(device, fresh_dynamo):
    def f(p, off):
        return segment_unpack(p, off, 6) - 1

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    off = t64([0, 2, 2, 6]).to(device)
    p = torch.randn(3, 3, 4, dtype=torch.float64)
    pd = p.to(device).requires_grad_(True)
    out = cf(pd, off)
    assert_bitwise_equal(out.detach().cpu(), ref.segment_unpack(p, off.cpu()) - 1)
    g = torch.randn(6, 4, dtype=torch.float64)
    out.backward(g.to(device))
    assert_bitwise_equal(pd.grad.cpu(), ref.segment_pack(g, off.cpu(), 3))


def test_compile_inductor_pooling_pipeline(fresh_dynamo):
    # default (inductor) backend, CPU only: one small graph through every feature op,
    # forward and backward, then a text of another length (a dynamic-shape recompile:
    # the word count is data-dependent, so the fake kernels must say so)
    def f(b, cu, table):
        wo, _ = word_boundaries(b, cu, 16, "space")
        x = table[b.long()]
        y = segment_reduce(x, wo, "mean")
        back = segment_expand(y, wo, b.shape[0])
        return back + x

    start = time.monotonic()
    cf = torch.compile(f, fullgraph=True)
    for text in (b"Hello, world! tokcore pools bytes into words.",
                 b"A second, longer text: caf\xc3\xa9 na\xc3\xafve words, and punctuation!?"):
        b, cu = as_bytes_tensor(text), t64([0, 13, len(text)])
        table = torch.randn(256, 4, dtype=torch.float64, requires_grad=True)
        out = cf(b, cu, table)
        g = torch.randn_like(out)
        (grad,) = torch.autograd.grad(out, table, g)
        # expected values and gradient from the references (which do not track autograd:
        # the chain rule is spelled out with their backward functions)
        wo, _ = ref.word_boundaries(b, cu, 16, "space")
        x = table.detach()[b.long()]
        y = ref.segment_reduce(x, wo, "mean")
        expected = ref.segment_expand(y, wo) + x
        grad_x = g + ref.segment_reduce_backward(ref.segment_expand_backward(g, wo), x, y, wo, "mean")
        expected_grad = torch.zeros_like(table).index_add_(0, b.long(), grad_x)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(grad, expected_grad)
    print(f"inductor compile + run: {time.monotonic() - start:.1f} s")


# ----------------------------------------------------------------------------------------
# 5a. bad inputs raise (naming the argument) and never crash
# ----------------------------------------------------------------------------------------

ERR = (RuntimeError, ValueError)


def names(match: str) -> str:
    """Regex matching any of the '|'-separated argument names as a whole word, so that
    e.g. "bytes" does not match inside "max_word_bytes" and "x" not inside "expected"."""
    return "|".join(rf"\b{n}\b" for n in match.split("|"))


def _bad_offsets_cases(T: int):
    """(offsets, why) pairs that violate the CSR contract for a stream of length T."""
    return [
        (t64([1, 2, T]), "does not start at 0"),
        (t64([0, 3, 2, T]), "decreasing"),
        (t64([0, T + 1]), "last != T"),
        (t64([0, T - 1]), "last != T (short)"),
        (t64([0, T + 5, T]), "out of range (past T)"),
        (t64([0, -2, T]), "out of range (negative)"),
        (t64([]), "empty"),
    ]


def _bad_input_cases():
    """(id, callable, match) for every op, via the Python wrapper and the raw op."""
    b = as_bytes_tensor(b"hello world")
    cu = t64([0, 11])
    x = torch.randn(6, 2)
    off = t64([0, 2, 6])
    y = torch.randn(2, 2)
    p = torch.randn(2, 3, 2)
    o = ops()
    cases = []
    for via, wb, sr, se, sp, su in (
        ("wrapper", word_boundaries, segment_reduce, segment_expand, segment_pack,
         segment_unpack),
        ("raw", o.word_boundaries, o.segment_reduce, o.segment_expand, o.segment_pack,
         o.segment_unpack),
    ):
        cases += [
            # word_boundaries
            (f"{via}-wb-bytes-dtype", lambda wb=wb: wb(b.to(torch.int64), cu, 16, "space"),
             "bytes"),
            (f"{via}-wb-bytes-int8", lambda wb=wb: wb(b.to(torch.int8), cu, 16, "space"),
             "bytes"),
            (f"{via}-wb-bytes-ndim", lambda wb=wb: wb(b.reshape(1, -1), cu, 16, "space"),
             "bytes"),
            (f"{via}-wb-cu-dtype", lambda wb=wb: wb(b, cu.to(torch.int32), 16, "space"),
             "cu_seqlens"),
            (f"{via}-wb-cu-ndim", lambda wb=wb: wb(b, cu.reshape(1, -1), 16, "space"),
             "cu_seqlens"),
            (f"{via}-wb-max3", lambda wb=wb: wb(b, cu, 3, "space"), "max_word_bytes"),
            (f"{via}-wb-max0", lambda wb=wb: wb(b, cu, 0, "space"), "max_word_bytes"),
            (f"{via}-wb-max-neg", lambda wb=wb: wb(b, cu, -5, "space"), "max_word_bytes"),
            (f"{via}-wb-max3-bytes-mode", lambda wb=wb: wb(b, cu, 3, "bytes"), "max_word_bytes"),
            (f"{via}-wb-mode", lambda wb=wb: wb(b, cu, 16, "words"), "mode"),
            (f"{via}-wb-mode-empty", lambda wb=wb: wb(b, cu, 16, ""), "mode"),
            # segment_reduce
            (f"{via}-sr-x-int", lambda sr=sr: sr(x.to(torch.int64), off, "sum"), "x"),
            (f"{via}-sr-x-bool", lambda sr=sr: sr(x > 0, off, "sum"), "x"),
            (f"{via}-sr-off-int32", lambda sr=sr: sr(x, off.to(torch.int32), "sum"), "offsets"),
            (f"{via}-sr-off-float", lambda sr=sr: sr(x, off.to(torch.float32), "sum"),
             "offsets"),
            (f"{via}-sr-off-ndim", lambda sr=sr: sr(x, off.reshape(1, -1), "sum"), "offsets"),
            (f"{via}-sr-reduce", lambda sr=sr: sr(x, off, "prod"), "reduce"),
            (f"{via}-sr-reduce-case", lambda sr=sr: sr(x, off, "SUM"), "reduce"),
            # segment_expand
            (f"{via}-se-y-int", lambda se=se: se(y.to(torch.int32), off, 6), "y"),
            (f"{via}-se-off-int32", lambda se=se: se(y, off.to(torch.int32), 6), "offsets"),
            (f"{via}-se-rows", lambda se=se: se(torch.randn(3, 2), off, 6), "y|offsets"),
            (f"{via}-se-total", lambda se=se: se(y, off, 7), "total|offsets"),
            # segment_pack
            (f"{via}-sp-x-int", lambda sp=sp: sp(x.to(torch.int64), off, 3), "x"),
            (f"{via}-sp-off-int32", lambda sp=sp: sp(x, off.to(torch.int32), 3), "offsets"),
            (f"{via}-sp-max-len", lambda sp=sp: sp(x, off, -1), "max_len"),
            # segment_unpack
            (f"{via}-su-p-int", lambda su=su: su(p.to(torch.int64), off, 6), "packed"),
            # packed needs [S, L, ...]: a 1-D tensor has no L dimension
            (f"{via}-su-p-ndim", lambda su=su: su(p.reshape(-1), off, 6), "packed"),
            (f"{via}-su-rows", lambda su=su: su(torch.randn(3, 3, 2), off, 6),
             "packed|offsets"),
            (f"{via}-su-total", lambda su=su: su(p, off, 5), "total|offsets"),
        ]
        for bad, why in _bad_offsets_cases(6):
            cases += [
                (f"{via}-sr-offsets-{why}", lambda sr=sr, bad=bad: sr(x, bad, "mean"),
                 "offsets"),
                (f"{via}-sp-offsets-{why}", lambda sp=sp, bad=bad: sp(x, bad, 4), "offsets"),
            ]
            if bad.numel() == 3:  # S = 2 rows for expand/unpack
                cases += [
                    (f"{via}-se-offsets-{why}", lambda se=se, bad=bad: se(y, bad, 6),
                     "offsets"),
                    (f"{via}-su-offsets-{why}", lambda su=su, bad=bad: su(p, bad, 6),
                     "offsets"),
                ]
        for bad, why in _bad_offsets_cases(11):
            cases.append((f"{via}-wb-cu-{why}", lambda wb=wb, bad=bad: wb(b, bad, 16, "space"),
                          "cu_seqlens"))
    # the backward helper op (raw only: the wrappers reach it through autograd)
    rb = o.segment_reduce_backward
    cases += [
        ("raw-srb-x-dtype", lambda: rb(y, off, 6, "max", x.double(), y), "x"),
        ("raw-srb-y-dtype", lambda: rb(y, off, 6, "max", x, y.to(torch.bfloat16)), "y"),
        ("raw-srb-x-rows", lambda: rb(y, off, 6, "max", x[:5], y), "x"),
        ("raw-srb-y-columns", lambda: rb(y, off, 6, "min", x, y[:, :1]), "y"),
        ("raw-srb-no-y", lambda: rb(y, off, 6, "min", x, None), "x and y"),
        ("raw-srb-grad-rows", lambda: rb(y[:1], off, 6, "sum"), "grad_y"),
        ("raw-srb-grad-int", lambda: rb(y.long(), off, 6, "sum"), "grad_y"),
        ("raw-srb-total", lambda: rb(y, off, -1, "mean"), "total"),
        ("raw-srb-reduce", lambda: rb(y, off, 6, "avg"), "reduce"),
    ]
    for bad, why in _bad_offsets_cases(6):
        if bad.numel() == 3:
            cases.append((f"raw-srb-offsets-{why}", lambda bad=bad: rb(y, bad, 6, "mean"), "offsets"))
    # raw ops take [T, D] / [S, L, D] exactly
    cases += [
        ("raw-sr-x-ndim", lambda: o.segment_reduce(torch.randn(6), off, "sum"), "x"),
        ("raw-se-y-ndim", lambda: o.segment_expand(torch.randn(2), off, 6), "y"),
        ("raw-sp-x-ndim", lambda: o.segment_pack(torch.randn(6), off, 3), "x"),
        ("raw-su-p-ndim", lambda: o.segment_unpack(p.reshape(2, 6), off, 6), "packed"),
        ("wrapper-sr-x-0d", lambda: segment_reduce(torch.tensor(1.0), off, "sum"), "x"),
    ]
    return cases


def _shape_level_bad_calls():
    """Calls of the raw ops whose error the fake kernels must raise too (no offsets
    values needed): (case, op name, args)."""
    x, off, y = torch.randn(6, 2), t64([0, 2, 6]), torch.randn(2, 2)
    p, b, cu = torch.randn(2, 3, 2), as_bytes_tensor(b"hello world"), t64([0, 11])
    return [
        ("x int32", "segment_reduce", (x.int(), off, "sum")),
        ("x 1-D", "segment_reduce", (x[:, 0], off, "sum")),
        ("offsets int32", "segment_reduce", (x, off.int(), "sum")),
        ("offsets 2-D", "segment_reduce", (x, off[None], "sum")),
        ("offsets empty", "segment_reduce", (x, t64([]), "sum")),
        ("reduce unknown", "segment_reduce", (x, off, "prod")),
        ("grad_y rows", "segment_reduce_backward", (x, off, 6, "sum", None, None)),
        ("max without x", "segment_reduce_backward", (y, off, 6, "max", None, None)),
        ("x columns", "segment_reduce_backward", (y, off, 6, "max", x[:, :1], y)),
        ("x rows", "segment_reduce_backward", (y, off, 5, "max", x, y)),
        ("y rows", "segment_reduce_backward", (y, off, 6, "max", x, y[:1])),
        ("y columns", "segment_reduce_backward", (y, off, 6, "max", x, y[:, :1])),
        # x and y are read as grad_y's dtype: a mismatch would read past their end
        ("x dtype", "segment_reduce_backward", (y, off, 6, "max", x.double(), y)),
        ("y dtype", "segment_reduce_backward", (y, off, 6, "min", x, y.half())),
        ("x 1-D", "segment_reduce_backward", (y, off, 6, "max", x[:, 0], y)),
        ("grad_y 1-D", "segment_reduce_backward", (y[:, 0], off, 6, "sum", None, None)),
        ("grad_y int", "segment_reduce_backward", (y.long(), off, 6, "sum", None, None)),
        ("backward total < 0", "segment_reduce_backward", (y, off, -1, "sum", None, None)),
        ("backward reduce", "segment_reduce_backward", (y, off, 6, "prod", None, None)),
        ("max_len overflows", "segment_pack", (x, off, 2**62)),
        ("y 3-D", "segment_expand", (p, off, 6)),
        ("y rows", "segment_expand", (x, off, 6)),
        ("total < 0", "segment_expand", (y, off, -1)),
        ("max_len < 0", "segment_pack", (x, off, -1)),
        ("packed 2-D", "segment_unpack", (y, off, 6)),
        ("packed segments", "segment_unpack", (torch.randn(3, 3, 2), off, 6)),
        ("bytes int64", "word_boundaries", (b.long(), cu, 8, "space")),
        ("cu_seqlens int32", "word_boundaries", (b, cu.int(), 8, "space")),
        ("max_word_bytes", "word_boundaries", (b, cu, 3, "space")),
        ("mode", "word_boundaries", (b, cu, 8, "words")),
        ("bytes 2-D", "word_boundaries", (b[None], cu, 8, "space")),
        ("cu_seqlens 2-D", "word_boundaries", (b, cu[None], 8, "space")),
        ("cu_seqlens empty", "word_boundaries", (b, t64([]), 8, "space")),
        # dtypes that the adapter names by torch's Python name, as the fake kernel does
        ("x complex64", "segment_reduce", (x.to(torch.complex64), off, "sum")),
        ("x uint16", "segment_reduce", (x.to(torch.uint16), off, "sum")),
        ("x float8", "segment_expand", (y.to(torch.float8_e4m3fn), off, 6)),
        ("x bool", "segment_pack", (x.bool(), off, 3)),
        # no bytes, but the first stride would overflow
        ("max_len overflows, no rows", "segment_pack", (x[:0], t64([0]), 2**62)),
        ("max_len overflows, no features", "segment_pack", (x[:, :0], off, 2**62)),
    ]


def _on_meta(args):
    return tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("case, name, args", _shape_level_bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_fake_kernels_raise_the_kernels_errors(case, name, args):
    # the fake kernels serve torch.compile and the meta device: a bad argument must give
    # the real kernel's error there too, not an IndexError or a silently shaped output
    op = getattr(ops(), name)
    with pytest.raises(ERR) as on_cpu:
        op(*args)
    with pytest.raises(ERR) as on_meta:
        op(*_on_meta(args))
    assert str(on_meta.value) == str(on_cpu.value), case


def test_cpu_tensor_with_meta_offsets_raises():
    # a meta argument sends the call to the fake kernel, which must not hand back an
    # uninitialized CPU tensor
    x, off = torch.randn(6, 2), t64([0, 2, 6]).to("meta")
    for fn, arg in ((lambda: segment_reduce(x, off, "sum"), "x"), (lambda: segment_expand(x[:2], off, 6), "y"),
                    (lambda: segment_pack(x, off, 3), "x"),
                    (lambda: segment_unpack(x[:2, None].expand(2, 3, 2), off, 6), "packed")):
        with pytest.raises(ERR, match=f"offsets must be on the same device as {arg}"):
            fn()


def test_backward_on_another_device_than_grad_y_raises():
    # x or y on the meta device sends the call to the fake kernel, which must name the
    # argument on the wrong device rather than hand back a tensor
    grad_y, off, x, y = torch.randn(2, 2), t64([0, 2, 6]), torch.randn(6, 2), torch.randn(2, 2)
    for args, arg in (((x.to("meta"), y), "x"), ((x, y.to("meta")), "y")):
        with pytest.raises(ERR, match=f"{arg} must be on the same device as grad_y"):
            ops().segment_reduce_backward(grad_y, off, 6, "max", *args)


def test_unsupported_dtypes_are_named():
    x, off = torch.randn(4, 2), t64([0, 2, 4])
    for dtype, name in ((torch.complex64, "complex64"), (torch.complex128, "complex128"),
                        (torch.uint16, "uint16"), (torch.float8_e5m2, "float8_e5m2"), (torch.int8, "int8")):
        with pytest.raises(ERR, match=f"x must be float32, float64, bfloat16 or float16, got {name}$"):
            segment_reduce(x.to(dtype), off, "sum")


def test_ints_past_int64_are_named():
    # the schema's int is int64: the dispatcher's own message would be "expected type
    # 'int' but found type 'int'"
    x, off = torch.randn(5, 3), t64([0, 2, 5])
    with pytest.raises(ValueError, match="max_len must fit in int64, got 9223372036854775808"):
        segment_pack(x, off, 2**63)
    with pytest.raises(ValueError, match="total must fit in int64"):
        segment_expand(x[:2], off, -2**63 - 1)
    with pytest.raises(ValueError, match="max_word_bytes must fit in int64"):
        word_boundaries(b"abc", None, 2**64)


def test_huge_sizes_raise_not_crash():
    x, off = torch.randn(5, 3), t64([0, 2, 5])
    # outputs with no bytes whose strides would overflow: max_len is named, not an
    # allocation of "0 GB"
    with pytest.raises(ERR, match=r"max_len = 4611686018427387904 is too large"):
        segment_pack(x[:0], t64([0]), 2**62)
    with pytest.raises(ERR, match=r"max_len = 4611686018427387904 is too large"):
        segment_pack(x[:, :0], off, 2**62)
    assert segment_pack(x[:, :0], off, 2**40).shape == (2, 2**40, 0)  # strides fit: fine
    with pytest.raises(ERR, match=names("max_len")):
        segment_pack(x, off, 2**63 - 1)
    with pytest.raises(ERR, match=names("max_len")):
        segment_pack(x, off, 2**62)
    # 844 TB: fits int64 but not a 47-bit address space, so the allocation fails even
    # where the OS overcommits memory
    with pytest.raises(ERR, match=r"segment_pack: could not allocate the output of shape \[2, 35184372088832, 3\]"):
        segment_pack(x, off, 2**45)
    with pytest.raises(ERR, match=r"segment_expand: the output would have shape \[4611686018427387904, 3\]"):
        segment_expand(x[:1], t64([0, 2**62]))  # valid offsets, 2^62 rows of 12 bytes
    with pytest.raises(ERR, match=r"segment_expand: could not allocate"):
        segment_expand(x[:1], t64([0, 2**50]), 2**50)


def test_unusable_settings_warn():
    from tokcore._library import check_settings

    assert check_settings({"TOKCORE_CPU_ISA": "avx2", "TOKCORE_CPU_STREAM_MIN_MB": "0"}) == []
    with pytest.warns(RuntimeWarning, match="TOKCORE_CPU_ISA='AVX2' is not base, avx2 or avx512"):
        check_settings({"TOKCORE_CPU_ISA": "AVX2"})
    with pytest.warns(RuntimeWarning, match="TOKCORE_CPU_STREAM_MIN_MB='-1'"):
        check_settings({"TOKCORE_CPU_STREAM_MIN_MB": "-1"})
    with pytest.warns(RuntimeWarning, match="TOKCORE_CUDA_CHECK_OFFSETS='no'"):
        check_settings({"TOKCORE_CUDA_CHECK_OFFSETS": "no"})
    # and at import, where users meet it
    env = dict(os.environ, TOKCORE_CPU_ISA="garbage")
    result = subprocess.run([sys.executable, "-c", "import tokcore"], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "TOKCORE_CPU_ISA='garbage'" in result.stderr


@pytest.mark.parametrize("name", ["word_boundaries", "segment_reduce", "segment_expand", "segment_pack",
                                  "segment_unpack"])
def test_wrappers_take_the_schemas_argument_names(name):
    # DESIGN.md: names match across the core, the adapter and the wrapper; the wrapper
    # takes the schema's arguments in order, keyword-only where the schema's are
    import inspect

    import tokcore.pooling

    schema = getattr(ops(), name).default._schema
    params = inspect.signature(getattr(tokcore.pooling, name)).parameters.values()
    assert [(a.name, a.kwarg_only) for a in schema.arguments] == [
        (p.name, p.kind == inspect.Parameter.KEYWORD_ONLY) for p in params]


def test_wrappers_name_arguments_of_the_wrong_type():
    off = t64([0, 2, 5])
    with pytest.raises(TypeError, match="bytes must be a uint8 tensor"):
        word_boundaries([104, 105])
    assert word_boundaries(bytes=b"a b")[0].tolist() == [0, 1, 3]  # the op's name, as a keyword too
    with pytest.raises(TypeError, match=names("x")):
        segment_reduce(np.ones((5, 3), dtype=np.float32), off, "sum")
    with pytest.raises(TypeError, match=names("y")):
        segment_expand([[1.0]], off)
    with pytest.raises(TypeError, match=names("packed")):
        segment_unpack(None, off)
    x = torch.ones(5, 3)
    with pytest.raises(TypeError, match=names("offsets")):
        segment_reduce(x, [0, 2, 5], "sum")
    with pytest.raises(TypeError, match=names("reduce")):
        segment_reduce(x, off, None)
    with pytest.raises(TypeError, match=names("max_len")):
        segment_pack(x, off, 2.5)
    with pytest.raises(TypeError, match=names("max_len")):
        segment_pack(x, off, True)
    with pytest.raises(TypeError, match=names("total")):
        segment_expand(x[:2], off, "5")
    with pytest.raises(TypeError, match=names("total")):
        segment_unpack(x[:2, None], off, 5.0)
    with pytest.raises(TypeError, match=names("cu_seqlens")):
        word_boundaries(b"ab", [0, 2])
    with pytest.raises(TypeError, match=names("mode")):
        word_boundaries(b"ab", mode=1)
    # numpy integers are ints
    assert segment_pack(x, off, np.int64(2)).shape == (2, 2, 3)


def test_bad_inputs_raise():
    failures = []
    for case_id, fn, match in _bad_input_cases():
        try:
            with pytest.raises(ERR, match=names(match)):
                fn()
        except BaseException as e:  # collect every failure, report them together
            if isinstance(e, KeyboardInterrupt):
                raise
            failures.append(f"{case_id}: {type(e).__name__}: {str(e)[:200]}")
    assert not failures, "\n".join(failures)


def test_offsets_with_wrong_end_name_both_numbers(device):
    # the most common offsets mistake: the message says what the end should be, which
    # argument sets it, and what the end is
    with pytest.raises(ERR, match=r"cu_seqlens must end at len\(bytes\) = 5, but its last entry is 4"):
        word_boundaries(torch.zeros(5, dtype=torch.uint8, device=device), t64([0, 4]).to(device), 8,
                        "space")
    x = torch.randn(10, 4, device=device)
    with pytest.raises(ERR, match=r"offsets must end at x.shape\[0\] = 10, but its last entry is 9"):
        segment_reduce(x, t64([0, 3, 9]).to(device), "mean")
    with pytest.raises(ERR, match=r"offsets must end at x.shape\[0\] = 10, but its last entry is 11"):
        segment_pack(x, t64([0, 3, 11]).to(device), 4)
    # a total given by the caller is named: it may be the wrong one of the two
    with pytest.raises(ERR, match=r"offsets must end at total = 7, but its last entry is 10"):
        segment_expand(x[:2], t64([0, 3, 10]).to(device), 7)
    with pytest.raises(ERR, match=r"offsets must end at total = 11, but its last entry is 10"):
        segment_unpack(torch.zeros(2, 7, 4, device=device), t64([0, 3, 10]).to(device), 11)
    with pytest.raises(ERR, match=r"offsets must end at total = 9, but its last entry is 10"):
        ops().segment_reduce_backward(x[:2], t64([0, 3, 10]).to(device), 9, "sum")


def test_cuda_device_mix_raises(cuda_device):
    b = as_bytes_tensor(b"hello world")
    cu = t64([0, 11])
    x, off = torch.randn(6, 2), t64([0, 2, 6])
    y, p = torch.randn(2, 2), torch.randn(2, 3, 2)
    c = cuda_device
    with pytest.raises(ERR, match=names("cu_seqlens|bytes")):
        word_boundaries(b.to(c), cu, 16, "space")
    with pytest.raises(ERR, match=names("cu_seqlens|bytes")):
        word_boundaries(b, cu.to(c), 16, "space")
    with pytest.raises(ERR, match=names("offsets|x")):
        segment_reduce(x.to(c), off, "sum")
    with pytest.raises(ERR, match=names("offsets|x")):
        segment_reduce(x, off.to(c), "sum")
    with pytest.raises(ERR, match=names("offsets|y")):
        segment_expand(y.to(c), off, 6)
    with pytest.raises(ERR, match=names("offsets|x")):
        segment_pack(x.to(c), off, 3)
    with pytest.raises(ERR, match=names("offsets|packed")):
        segment_unpack(p.to(c), off, 6)
    with pytest.raises(ERR, match=names("x|y|grad_y")):
        ops().segment_reduce_backward(y.to(c), off, x.shape[0], "max", x, y)
    torch.cuda.synchronize()


def test_cuda_graph_capture_and_replay(cuda_device):
    # Segment ops given their sizes launch on the current stream, allocate through torch
    # and skip their offsets check (a host sync) while the stream is captured, so they
    # can be captured in a CUDA graph, as inference engines do; a replay on new inputs
    # gives the eager results.
    c = cuda_device
    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 32, generator=g).to(c)
    off = t64([0, 5, 5, 20, 64]).to(c)

    def pipeline():
        y = segment_reduce(x, off, "mean")
        return (y, segment_expand(y, off, 64), segment_unpack(segment_pack(x, off, 8), off, 64))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture, as torch recommends
        pipeline()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = pipeline()
    x.copy_(torch.randn(64, 32, generator=g).to(c))
    graph.replay()
    torch.cuda.synchronize()
    for got, expected in zip(captured, pipeline()):
        assert_bitwise_equal(got, expected)


def test_cuda_ops_that_must_sync_refuse_graph_capture_and_leave_no_error(cuda_device):
    # expand/unpack without total and word_boundaries read a size from the device (a
    # host sync), which capture forbids: they raise, saying what to do, before touching
    # the stream, so the user's capture stays valid; and the next, valid calls do not
    # report a stale error of tokcore's own CUDA runtime.
    c = cuda_device
    y, off = torch.randn(4, 8, device=c), t64([0, 2, 4, 6, 8]).to(c)
    b, cu = as_bytes_tensor(b"hello, world").to(c), t64([0, 12]).to(c)
    calls = {"segment_expand": (lambda: segment_expand(y, off), "total=None reads the number of rows .* pass total"),
             "segment_unpack": (lambda: segment_unpack(y.view(4, 1, 8), off),
                                "total=None reads the number of rows .* pass total"),
             "word_boundaries": (lambda: word_boundaries(b, cu),
                                 "the number of words sizes the output .* find the words before capturing")}
    for name, (call, message) in calls.items():
        call()  # warm up (allocations) outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match=f"tokcore.{name}: {message}"):
            with torch.cuda.graph(graph):
                segment_expand(y, off, 8)  # fine under capture (its check is skipped)
                call()
        expected = segment_expand(y.cpu(), off.cpu(), 8)
        assert torch.equal(segment_expand(y, off, 8).cpu(), expected)  # no stale error
        assert torch.equal(segment_expand(y, off).cpu(), expected)
    assert word_boundaries(b, cu)[0].tolist() == [0, 6, 12]
    torch.cuda.synchronize()


# Invalid offsets for 6 rows (S <= 4), one of each kind of mistake.
BAD_OFFSETS = [[0, 100, 6], [0, -50, 6], [0, 5, 2], [3, 1, 6], [0, 2, 1000000], [1, 0, 7],
               [0, 6, 6, 5, 9]]


def _ops_on_offsets(x, y, p, b, off):
    """Every op that takes offsets, called on `off`; x [6, D], y [4, D], p [4, L, D]."""
    S = off.numel() - 1
    return {"segment_reduce max": lambda: segment_reduce(x, off, "max"),
            "segment_reduce sum": lambda: segment_reduce(x, off, "sum"),
            "segment_reduce_backward": lambda: ops().segment_reduce_backward(y[:S], off, 6, "mean",
                                                                             None, None),
            "segment_expand": lambda: segment_expand(y[:S], off, 6),
            "segment_expand, no total": lambda: segment_expand(y[:S], off),
            "segment_pack": lambda: segment_pack(x, off, 4),
            "segment_unpack": lambda: segment_unpack(p[:S], off, 6),
            "word_boundaries": lambda: word_boundaries(b, off, 4, "space")}


def _error_of(fn) -> str:
    try:
        fn()
    except ERR as e:
        return str(e)
    return "no error"


def test_cuda_invalid_offsets_raise_as_on_cpu(cuda_device):
    # On CUDA the offsets are validated on the device before any kernel runs (a sync),
    # and the error is the CPU's: the first failing entry decides it.
    c = cuda_device
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 2, generator=g), torch.randn(4, 2, generator=g)
    p, b = torch.randn(4, 3, 2, generator=g), as_bytes_tensor(b"hello!")
    for bad in BAD_OFFSETS:
        on_cpu = _ops_on_offsets(x, y, p, b, t64(bad))
        on_cuda = _ops_on_offsets(x.to(c), y.to(c), p.to(c), b.to(c), t64(bad).to(c))
        for name, fn in on_cpu.items():
            expected = _error_of(fn)
            assert expected == "no error" or re.search(names("offsets|cu_seqlens"), expected), (
                name, bad, expected)
            assert _error_of(on_cuda[name]) == expected, (name, bad)
    torch.cuda.synchronize()


def test_cuda_invalid_offsets_deep_inside_name_the_entry_as_on_cpu(cuda_device):
    # More entries than the check's grid has threads (1024 blocks x 256): the first
    # failing entry is found across the grid-stride loop, and its values are read back.
    many = torch.arange(1_000_001, dtype=torch.int64)
    many[700_001], many[900_000], many[300_000] = 5, 3, 300_000  # two drops; the third entry is fine
    y = torch.randn(1, 2).expand(1_000_000, 2)
    expected = _error_of(lambda: segment_expand(y, many))
    assert expected.endswith("offsets[700001] = 5 < offsets[700000] = 700000"), expected
    assert _error_of(lambda: segment_expand(y.to(cuda_device), many.to(cuda_device))) == expected
    many[0] = 7  # a bad start comes first
    assert _error_of(lambda: segment_expand(y.to(cuda_device), many.to(cuda_device))) == (
        _error_of(lambda: segment_expand(y, many)))


def test_cuda_unchecked_invalid_offsets_never_crash(cuda_device, tokcore_setting):
    # With TOKCORE_CUDA_CHECK_OFFSETS=0 the segment ops do not validate offsets (no host
    # sync); their kernels must still never read or write out of bounds: an op may raise
    # or return unspecified values, and the device must stay healthy afterwards.
    tokcore_setting("TOKCORE_CUDA_CHECK_OFFSETS", "0")
    c = cuda_device
    x, y, p = torch.randn(6, 2, device=c), torch.randn(4, 2, device=c), torch.randn(4, 3, 2,
                                                                                     device=c)
    b = as_bytes_tensor(b"hello!").to(c)
    for bad in BAD_OFFSETS:
        for fn in _ops_on_offsets(x, y, p, b, t64(bad).to(c)).values():
            _error_of(fn)
        torch.cuda.synchronize()  # raises if a kernel faulted
    assert torch.equal(segment_reduce(x, t64([0, 6]).to(c), "sum").cpu(),
                       segment_reduce(x.cpu(), t64([0, 6]), "sum"))


def test_cuda_unchecked_invalid_offsets_in_blocks_never_fault(cuda_device):
    # A few long segments take the block kernels (a workspace sized for valid
    # offsets); unchecked offsets whose clamped ranges overlap claim more blocks than
    # that, and the kernels must still stay inside it.
    c = cuda_device
    x = torch.randn(4096, 4, device=c)
    for bad in ([0, 4096, 0, 4096, -7, 4096], [0, 4096, 4096], [5000, 0, 4096]):
        for reduce in REDUCES:
            segment_reduce(x, t64(bad).to(c), reduce, check_offsets=False)
        torch.cuda.synchronize()  # raises if a kernel faulted
    good = t64([0, 1000, 4096])
    assert_bitwise_equal(segment_reduce(x, good.to(c), "sum").cpu(), segment_reduce(x.cpu(), good, "sum"))


def test_cuda_check_offsets_false_skips_the_check_for_that_call_only(cuda_device):
    # check_offsets=False skips the CUDA check of one call (no sync, no error; the
    # kernels clamp, so no fault either); the next default call checks again.
    c = cuda_device
    x, y = torch.randn(6, 2, device=c), torch.randn(2, 2, device=c)
    p = torch.randn(2, 3, 2, device=c)
    bad = t64([0, 100, 6]).to(c)
    for unchecked, checked in [
            (lambda: segment_reduce(x, bad, "sum", check_offsets=False),
             lambda: segment_reduce(x, bad, "sum")),
            (lambda: segment_expand(y, bad, 6, check_offsets=False), lambda: segment_expand(y, bad, 6)),
            (lambda: segment_pack(x, bad, 4, check_offsets=False), lambda: segment_pack(x, bad, 4)),
            (lambda: segment_unpack(p, bad, 6, check_offsets=False), lambda: segment_unpack(p, bad, 6)),
            (lambda: ops().segment_reduce_backward(y, bad, 6, "mean", check_offsets=False),
             lambda: ops().segment_reduce_backward(y, bad, 6, "mean"))]:
        assert _error_of(unchecked) == "no error"
        torch.cuda.synchronize()  # raises if a kernel faulted
        assert re.search(names("offsets"), _error_of(checked))


@pytest.mark.parametrize("name", ["segment_reduce", "segment_reduce_backward", "segment_expand",
                                  "segment_pack", "segment_unpack"])
def test_check_offsets_false_still_checks_cpu_offsets(name):
    # On the CPU the check costs no sync, so it always runs: a wrong check_offsets=False
    # must still raise there, never read out of bounds.
    x, y, p = torch.randn(6, 2), torch.randn(2, 2), torch.randn(2, 3, 2)
    bad = t64([0, 100, 6])
    call = {"segment_reduce": lambda: segment_reduce(x, bad, "sum", check_offsets=False),
            "segment_reduce_backward": lambda: ops().segment_reduce_backward(y, bad, 6, "mean",
                                                                             check_offsets=False),
            "segment_expand": lambda: segment_expand(y, bad, 6, check_offsets=False),
            "segment_pack": lambda: segment_pack(x, bad, 4, check_offsets=False),
            "segment_unpack": lambda: segment_unpack(p, bad, 6, check_offsets=False)}[name]
    assert re.search(names("offsets"), _error_of(call))


def test_backward_passes_reuse_the_forward_check(recorded_pooling_ops):
    # The forward checks its offsets; every backward op (double backward included)
    # reuses them with check_offsets=False, which on CUDA spares a host sync each.
    recorder = recorded_pooling_ops
    g = torch.Generator().manual_seed(5)
    off = t64([0, 2, 2, 5, 9])
    x = torch.randn(9, 3, dtype=torch.float64, generator=g, requires_grad=True)
    outs = [segment_reduce(x, off, r) for r in REDUCES]
    outs += [segment_expand(outs[1], off, 9), segment_unpack(segment_pack(x, off, 3), off, 9)]
    forward_calls = list(recorder.calls)
    assert len(forward_calls) == 7 and all(check for _, _, check in forward_calls)
    loss = sum((o * torch.randn(o.shape, dtype=o.dtype, generator=g)).sum() for o in outs)
    (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
    (grad_x * grad_x).sum().backward()  # double backward through the backward ops
    backward_calls = recorder.calls[len(forward_calls):]
    assert {name for name, _, _ in backward_calls} == {
        "segment_reduce", "segment_reduce_backward", "segment_pack", "segment_unpack"}
    assert not any(check for _, _, check in backward_calls), backward_calls


def test_backward_refuses_offsets_changed_in_place_after_the_forward():
    # The backward's check_offsets=False rests on this: offsets are saved with
    # save_for_backward, so changing them in place after the forward is an error
    # at backward, not a pass over unchecked offsets.
    for forward in (lambda x, off: segment_reduce(x, off, "mean"),
                    lambda x, off: segment_expand(x[:4], off, 9),
                    lambda x, off: segment_pack(x, off, 3),
                    lambda x, off: segment_unpack(x[:4].reshape(4, 1, 3).expand(4, 2, 3), off, 9)):
        off = t64([0, 2, 2, 5, 9])
        x = torch.randn(9, 3, requires_grad=True)
        out = forward(x, off)
        off[1] = 7
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_invalid_offsets_report_the_first_failing_entry():
    # The CPU reports the first failing entry, and the CUDA check must match it
    # (test_cuda_invalid_offsets_raise_as_on_cpu): pin the CPU's order here.
    # The message names the entry and its values, so a user finds it among millions.
    x, y = torch.randn(6, 2), torch.randn(4, 2)
    op = "tokcore.segment_reduce: "
    assert _error_of(lambda: segment_reduce(x, t64([1, 0, 7]), "sum")) == (
        op + "offsets must start at 0, but offsets[0] = 1")
    assert _error_of(lambda: segment_reduce(x, t64([0, 6, 6, 5, 9, 2]), "sum")) == (
        op + "offsets must be non-decreasing, but offsets[3] = 5 < offsets[2] = 6")
    assert _error_of(lambda: segment_reduce(x, t64([0, 2, 1000000]), "sum")) == (
        op + "offsets must end at x.shape[0] = 6, but its last entry is 1000000")
    assert "no error" == _error_of(lambda: segment_expand(y[:2], t64([0, 2, 1000000])))
    many = torch.arange(1_000_001, dtype=torch.int64)  # a drop deep inside, then a second one
    many[700_001], many[900_000] = 5, 3
    assert _error_of(lambda: segment_expand(y[:1].expand(1_000_000, 2), many)) == (
        "tokcore.segment_expand: offsets must be non-decreasing, but offsets[700001] = 5 < offsets[700000] = 700000")


def test_inputs_not_mutated(device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 3, generator=g).to(device)
    off = t64([0, 4, 4, 9]).to(device)
    b = as_bytes_tensor(b"mutation, never!").to(device)
    cu = t64([0, 16]).to(device)
    grad3 = torch.randn(3, 3, generator=g).to(device)
    grad9 = torch.randn(9, 3, generator=g).to(device)
    grad_p = torch.randn(3, 2, 3, generator=g).to(device)
    inputs = (x, off, b, cu, grad3, grad9, grad_p)
    saved = [t.clone() for t in inputs]
    for reduce in REDUCES:
        xd = x.detach().requires_grad_(True)
        segment_reduce(xd, off, reduce).backward(grad3)  # backward must not touch grad3
    yd = x[:3].detach().requires_grad_(True)
    segment_expand(yd, off, 9).backward(grad9)
    xd = x.detach().requires_grad_(True)
    segment_pack(xd, off, 2).backward(grad_p)
    pd = grad_p.detach().clone().requires_grad_(True)
    segment_unpack(pd, off, 9).backward(grad9)
    word_boundaries(b, cu, 4, "space")
    for before, after in zip(saved, inputs):
        assert torch.equal(before, after)


# ----------------------------------------------------------------------------------------
# 5b. determinism and 5c. non-contiguous inputs
# ----------------------------------------------------------------------------------------


def test_determinism(device):
    g = torch.Generator().manual_seed(7)
    lengths = [0, 1, 3000, 17, 0, 500, 2, 1200]
    off = offsets_from_lengths(lengths).to(device)
    T = int(off[-1])
    data = bytes(torch.randint(0, 256, (T,), generator=g).tolist())
    b = as_bytes_tensor(data).to(device)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(T, 64, generator=g).to(dtype).to(device)
        gy = torch.randn(len(lengths), 64, generator=g).to(dtype).to(device)
        gx = torch.randn(T, 64, generator=g).to(dtype).to(device)

        def run():
            outs = [word_boundaries(b, off, 6, "space")[0]]
            for reduce in REDUCES:
                xd = x.clone().requires_grad_(True)
                y = segment_reduce(xd, off, reduce)
                y.backward(gy)
                outs += [y.detach(), xd.grad]
            yd = gy.clone().requires_grad_(True)
            e = segment_expand(yd, off, T)
            e.backward(gx)  # backward is a segment sum: must not use float atomics
            outs += [e.detach(), yd.grad]
            outs.append(segment_pack(x, off, 1000))
            outs.append(segment_unpack(segment_pack(x, off, 1000), off, T))
            return outs

        first = run()
        for _ in range(2):
            for a, e in zip(run(), first):
                assert_bitwise_equal(a, e)


def test_non_contiguous_inputs(device):
    g = torch.Generator().manual_seed(11)
    lengths = [3, 0, 5, 1, 7]
    off = offsets_from_lengths(lengths)
    T, S, D = int(off[-1]), len(lengths), 4
    # offsets as a strided view
    off_big = torch.zeros(2 * (S + 1) - 1, dtype=I64)
    off_big[::2] = off
    off_nc = off_big.to(device)[::2]
    assert not off_nc.is_contiguous()
    # x as a transposed view and as a column-strided view
    x_t = torch.randn(D, T, generator=g).to(device).t()
    x_s = torch.randn(T, 2 * D, generator=g).to(device)[:, ::2]
    assert not x_t.is_contiguous() and not x_s.is_contiguous()
    for x in (x_t, x_s):
        for o in (off_nc, off.to(device)):
            for reduce in REDUCES:
                xd = x.detach().requires_grad_(True)
                y = segment_reduce(xd, o, reduce)
                check_reduce(y.detach().cpu(), x.cpu(), off, reduce)
                # grad of y.sum() arrives as an expanded (stride 0) tensor
                y.sum().backward()
                check_reduce_grad(xd.grad.cpu(), torch.ones(S, D), x.cpu(), off, reduce)
            assert_bitwise_equal(segment_pack(x, o, 4).cpu(), ref.segment_pack(x.cpu(), off, 4))
    y_t = torch.randn(D, S, generator=g).to(device).t()
    assert_bitwise_equal(segment_expand(y_t, off_nc, T).cpu(), ref.segment_expand(y_t.cpu(), off))
    yd = y_t.detach().requires_grad_(True)
    segment_expand(yd, off_nc, T).sum().backward()
    assert_within(yd.grad.cpu(), ref.segment_reduce(torch.ones(T, D), off, "sum"),
                  torch.zeros(S, D))
    p_nc = torch.randn(D, 6, S, generator=g).to(device).permute(2, 1, 0)
    assert not p_nc.is_contiguous()
    assert_bitwise_equal(segment_unpack(p_nc, off_nc, T).cpu(),
                         ref.segment_unpack(p_nc.cpu(), off))
    pd = p_nc.detach().requires_grad_(True)
    segment_unpack(pd, off_nc, T).sum().backward()
    assert_bitwise_equal(pd.grad.cpu(), ref.segment_pack(torch.ones(T, D), off, 6))
    # bytes as a strided view
    data = "Hello, wörld!  snake_case_and_more ,foo".encode()
    big = torch.zeros(2 * len(data), dtype=torch.uint8)
    big[::2] = as_bytes_tensor(data)
    b_nc = big.to(device)[::2]
    cu = t64([0, 9, len(data)])
    cu_big = torch.zeros(5, dtype=I64)
    cu_big[::2] = cu
    wo, wc = word_boundaries(b_nc, cu_big.to(device)[::2], 5, "space")
    ewo, ewc = ref.word_boundaries(as_bytes_tensor(data), cu, 5, "space")
    assert torch.equal(wo.cpu(), ewo) and torch.equal(wc.cpu(), ewc)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("reduce", REDUCES)
def test_segment_reduce_cpu_isa_variants_agree_bitwise(tokcore_setting, reduce, dtype):
    # The CPU forward and backward reduce are built per instruction set
    # (baseline, AVX2, AVX-512) and picked at run time; TOKCORE_CPU_ISA=base|avx2 caps the choice. Every
    # variant the CPU runs must give the same bits, for widths that use the wide
    # tiles (up to 256 features), the narrower ones, the scalar tail, or a mix; the
    # last segment is longer than kReduceBlockRows (256), so it is summed in blocks,
    # and with 2 threads or more too long for one thread: its blocks are shared out.
    g = torch.Generator().manual_seed(5)
    offsets = torch.tensor([0, 3, 3, 10, 11, 40, 700], dtype=I64)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    for D in (1, 7, 32, 45, 64, 100, 256, 300, 520):
        x = (torch.randn(700, D, generator=g, dtype=torch.float64) * 3).to(dtype)
        x[0, 0] = float("nan")
        x[1, -1] = float("inf")
        x[3:10] *= 1e-6 if dtype == torch.float16 else 1e-39  # a segment of subnormal results
        x[11:14] = 6e4 if dtype == torch.float16 else 3e38  # sums that overflow to inf
        if D > 1:  # a signalling NaN with a payload (not torch's canonical quiet NaN)
            x.view(bits)[4, 1] = {torch.float16: 0x7C01, torch.bfloat16: 0x7F81,
                                  torch.float32: 0x7F800001, torch.float64: 0x7FF0000000000001}[dtype]
        results, grads = {}, {}
        for isa in ("avx512", "avx2", "base"):
            tokcore_setting("TOKCORE_CPU_ISA", isa)
            results[isa] = segment_reduce(x, offsets, reduce)
            # the backward is built per instruction set too; grad_y holds x's rows, NaN included
            grads[isa] = ops().segment_reduce_backward(x[:6], offsets, 700, reduce, x, results[isa]).view(bits)
            results[isa] = results[isa].view(bits)
        check_reduce(results["base"].view(dtype), x, offsets, reduce)
        check_reduce_grad(grads["base"].view(dtype), x[:6], x, offsets, reduce)
        for isa in ("avx512", "avx2"):
            assert torch.equal(results[isa], results["base"]), f"{isa} vs base, D={D}"
            assert torch.equal(grads[isa], grads["base"]), f"backward, {isa} vs base, D={D}"
        # one segment, too long for one thread: its blocks are shared out over them
        whole = {}
        for isa in ("avx512", "avx2", "base"):
            tokcore_setting("TOKCORE_CPU_ISA", isa)
            whole[isa] = segment_reduce(x, t64([0, 700]), reduce).view(bits)
        check_reduce(whole["base"].view(dtype), x, t64([0, 700]), reduce)
        for isa in ("avx512", "avx2"):
            assert torch.equal(whole[isa], whole["base"]), f"one segment, {isa} vs base, D={D}"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("reduce", REDUCES)
def test_segment_reduce_streaming_stores_give_the_same_bits(tokcore_setting, reduce, dtype):
    # Large CPU outputs of the forward reduce are written with streaming stores
    # (TOKCORE_CPU_STREAM_MIN_MB, default 64; 0 streams every output whose rows are
    # whole cache lines). Both paths, in every instruction-set variant, must give
    # the reference's values and each other's bits, empty segments included.
    g = torch.Generator().manual_seed(6)
    offsets = torch.tensor([0, 3, 3, 10, 11, 40, 40], dtype=I64)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    for D in (16, 64, 256, 512):  # rows of whole cache lines (or not: 16 x 2 bytes)
        x = (torch.randn(40, D, generator=g, dtype=torch.float64) * 3).to(dtype)
        x[5, 0] = float("nan")
        for isa in ("avx512", "avx2", "base"):
            tokcore_setting("TOKCORE_CPU_ISA", isa)
            tokcore_setting("TOKCORE_CPU_STREAM_MIN_MB", "0")
            streamed = segment_reduce(x, offsets, reduce)
            tokcore_setting("TOKCORE_CPU_STREAM_MIN_MB", "1000000")
            stored = segment_reduce(x, offsets, reduce)
            check_reduce(streamed, x, offsets, reduce)
            assert torch.equal(streamed.view(bits), stored.view(bits)), f"{isa}, D={D}"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_streamed_outputs_match_the_reference(tokcore_setting, dtype):
    # expand, pack and the backward write their large CPU outputs with
    # streaming stores too (whole rows of cache lines only: D * itemsize a multiple
    # of 64; D = 24 below is not, for float16/bfloat16 and float32); unpack never
    # does, and must not be affected. TOKCORE_CPU_STREAM_MIN_MB=0 streams every
    # output, so small cases test it.
    g = torch.Generator().manual_seed(7)
    offsets = torch.tensor([0, 3, 3, 10, 11, 40, 40, 41], dtype=I64)
    S, T = offsets.numel() - 1, int(offsets[-1])
    for D in (8, 24, 64, 256):
        x = (torch.randn(T, D, generator=g, dtype=torch.float64) * 3).to(dtype)
        y = (torch.randn(S, D, generator=g, dtype=torch.float64) * 3).to(dtype)
        results = {}
        for setting in ("0", "1000000"):
            tokcore_setting("TOKCORE_CPU_STREAM_MIN_MB", setting)
            packed = segment_pack(x, offsets, 4)
            results[setting] = [
                segment_expand(y, offsets),
                packed,
                segment_unpack(packed, offsets),
                *(ops().segment_reduce_backward(y, offsets, T, reduce, x, segment_reduce(x, offsets, reduce))
                  for reduce in REDUCES),
            ]
        expanded, packed, unpacked, *grads = results["0"]
        assert_bitwise_equal(expanded, ref.segment_expand(y, offsets))
        assert_bitwise_equal(packed, ref.segment_pack(x, offsets, 4))
        assert_bitwise_equal(unpacked, ref.segment_unpack(ref.segment_pack(x, offsets, 4), offsets))
        for reduce, grad in zip(REDUCES, grads):
            check_reduce_grad(grad, y, x, offsets, reduce)
        for streamed, stored in zip(results["0"], results["1000000"]):
            assert_bitwise_equal(streamed, stored)


TORCH_HAS_FROM_BLOB_DELETER = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 11)
needs_output_cache = pytest.mark.skipif(not TORCH_HAS_FROM_BLOB_DELETER,
                                        reason="the CPU output cache needs torch >= 2.11")


def _big_expand_case(seed=0):
    # outputs of 2^16 x 128 float32 = 32 MB: above the 16 MB threshold of the cache
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 9, (12000,), generator=g)
    offsets = torch.cat([t64([0]), lengths.cumsum(0)])
    y = torch.randn(offsets.numel() - 1, 128, generator=g)
    return y, offsets


@needs_output_cache
def test_cpu_output_cache_reuses_freed_outputs_and_never_aliases_live_ones(tokcore_setting):
    tokcore_setting("TOKCORE_CPU_OUTPUT_CACHE_MB", None)
    y, offsets = _big_expand_case()
    first = segment_expand(y, offsets)
    assert not first.untyped_storage().resizable()  # a cached buffer
    address = first.data_ptr()
    second = segment_expand(y * 2, offsets)  # first is alive: another buffer
    assert second.data_ptr() != address
    expected = ref.segment_expand(y, offsets)
    assert torch.equal(first, expected) and torch.equal(second, 2 * expected)
    del first
    third = segment_expand(y * 3, offsets)  # takes the buffer first gave back
    assert third.data_ptr() == address
    assert torch.equal(third, 3 * expected) and torch.equal(second, 2 * expected)
    # backward outputs come from the cache too
    x = ref.segment_expand(y, offsets).requires_grad_(True)
    (grad,) = torch.autograd.grad(segment_reduce(x, offsets, "mean").sum(), x)
    counts = (offsets[1:] - offsets[:-1]).clamp(min=1).to(torch.float32)
    assert torch.equal(grad, ref.segment_expand((1 / counts)[:, None].expand(-1, 128), offsets))


@needs_output_cache
def test_cpu_output_cache_can_be_turned_off(tokcore_setting):
    tokcore_setting("TOKCORE_CPU_OUTPUT_CACHE_MB", "0")
    y, offsets = _big_expand_case(1)
    out = segment_expand(y, offsets)
    assert out.untyped_storage().resizable()  # torch's own allocation
    assert torch.equal(out, ref.segment_expand(y, offsets))


@needs_output_cache
def test_cpu_output_cache_is_thread_safe(tokcore_setting):
    tokcore_setting("TOKCORE_CPU_OUTPUT_CACHE_MB", None)
    y, offsets = _big_expand_case(2)
    expected = ref.segment_expand(y, offsets)
    errors = []

    def work(k):
        for i in range(6):
            out = segment_expand(y * (k + i), offsets)
            if not torch.equal(out, expected * (k + i)):
                errors.append((k, i))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_cpu_isa_reports_the_variant_in_use(tokcore_setting):
    # what benchmark reports print; TOKCORE_CPU_ISA caps it, the CPU's support too
    tokcore_setting("TOKCORE_CPU_ISA", None)
    best = tokcore.cpu_isa()
    assert best in ("base", "avx2", "avx512")  # the names TOKCORE_CPU_ISA takes
    tokcore_setting("TOKCORE_CPU_ISA", "base")
    assert tokcore.cpu_isa() == "base"
    tokcore_setting("TOKCORE_CPU_ISA", "avx2")
    assert tokcore.cpu_isa() == ("base" if best == "base" else "avx2")


@needs_output_cache
def test_settings_change_on_reload_only(monkeypatch):
    # The ops never read the environment: getenv in an op, which runs without the GIL,
    # can crash while another thread changes the environment. The library reads it at
    # import and on tokcore.reload_settings(), and nowhere else.
    monkeypatch.delenv("TOKCORE_CPU_OUTPUT_CACHE_MB", raising=False)
    monkeypatch.delenv("TOKCORE_CPU_ISA", raising=False)
    tokcore.reload_settings()
    best = tokcore.cpu_isa()
    y, offsets = _big_expand_case(3)
    try:
        monkeypatch.setenv("TOKCORE_CPU_OUTPUT_CACHE_MB", "0")
        monkeypatch.setenv("TOKCORE_CPU_ISA", "base")
        assert not segment_expand(y, offsets).untyped_storage().resizable()  # still cached
        assert tokcore.cpu_isa() == best
        tokcore.reload_settings()
        assert segment_expand(y, offsets).untyped_storage().resizable()  # torch's own allocation
        assert tokcore.cpu_isa() == "base"
        monkeypatch.setenv("TOKCORE_CPU_ISA", "AVX2")  # not a value: warned about, default used
        with pytest.warns(RuntimeWarning, match="TOKCORE_CPU_ISA='AVX2' is not base, avx2 or avx512"):
            tokcore.reload_settings()
        assert tokcore.cpu_isa() == best
    finally:
        monkeypatch.undo()
        tokcore.reload_settings()


def test_tokcore_library_names_the_library_to_load(tmp_path):
    # TOKCORE_LIBRARY (how scripts/sanitize.sh loads its ASan build) must name a file;
    # a wrong path is an ImportError that names the variable, not a silent fallback
    code = "import tokcore._library as l; print(l.LIBRARY_PATH)"
    env = dict(os.environ, TOKCORE_LIBRARY=str(tmp_path / "missing.so"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "TOKCORE_LIBRARY" in r.stderr and "missing.so" in r.stderr
    env["TOKCORE_LIBRARY"] = str(tokcore._library.LIBRARY_PATH)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == str(tokcore._library.LIBRARY_PATH)


def test_word_boundaries_accepts_python_text():
    # str is encoded as UTF-8; bytes are taken as they are; both give one sequence
    wo, wc = word_boundaries("naïve, café")
    assert wo.tolist() == [0, 7, 13] and wc.tolist() == [0, 2]
    wo, wc = word_boundaries(b"")
    assert wo.tolist() == [0] and wc.tolist() == [0, 0]

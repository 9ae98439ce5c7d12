"""Building blocks on top of the pooling ops.

Everything here works on *flat* streams: a tensor ``x [N, D]`` plus CSR offsets
``[S+1]`` that split it into segments (sequences, words, or words plus one extra
slot). Position-wise work (projections, MLPs, norms) runs on the flat stream, so
no compute is spent on padding; only attention runs on the padded
``[S, max_len, ...]`` batch made by ``segment_pack`` and goes back with
``segment_unpack``. Pooling bytes into words uses ``segment_reduce`` (mean, max) or
attention over the words packed by ``segment_pack``; no Python loop ever walks over
words or sequences.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .ops import segment_expand, segment_pack, segment_reduce, segment_unpack, word_boundaries

__all__ = [
    "POOL_MODES",
    "RotaryEmbedding",
    "SegmentAttention",
    "SegmentBlock",
    "SegmentTransformer",
    "DecodeCache",
    "BytePoolingEncoder",
    "segment_lengths",
    "segment_positions",
    "rotate_pairs",
    "max_segment_length",
    "check_segment_offsets",
    "check_word_lengths",
]

POOL_MODES = ("mean", "max", "attention")


def segment_lengths(offsets: Tensor) -> Tensor:
    """Lengths [S] of the segments described by CSR ``offsets`` [S+1]."""
    return offsets[1:] - offsets[:-1]


def max_segment_length(offsets: Tensor) -> int:
    """Longest segment (a host sync on CUDA); 0 when there are no segments."""
    if offsets.numel() < 2:
        return 0
    return int(segment_lengths(offsets).max())


def check_segment_offsets(offsets: Tensor, total: int | None, name: str, unit: str = "rows") -> int:
    """Check CSR offsets that a caller passed (1-D int64, start at 0, non-decreasing,
    end at `total` unless it is None) and return the longest segment, in one host read
    (a sync on CUDA: the one that reading the longest segment costs anyway). `name`
    starts the ValueError's message (e.g. "ByteLM.forward: cu_seqlens"); `unit` names
    what `total` counts. Checked before anything is derived from the offsets, so a
    bad entry is not reported as a bad length."""
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{name} must be a 1-D int64 tensor with at least one entry (it starts at 0), "
                         f"got {offsets.dtype} of shape {tuple(offsets.shape)}")
    lengths = segment_lengths(offsets)
    if lengths.numel():
        first, last, shortest, longest = torch.stack(
            [offsets[0], offsets[-1], lengths.min(), lengths.max()]).tolist()
    else:
        first = last = int(offsets[0])
        shortest = longest = 0
    arg = name.rsplit(": ", 1)[-1]  # "ByteLM.forward: cu_seqlens" -> cu_seqlens[i] in the messages
    if first != 0:
        raise ValueError(f"{name} must start at 0, but {arg}[0] = {first}")
    if shortest < 0:  # name the first drop, as the ops do (an error path: the extra reads are fine)
        i = int((lengths < 0).nonzero()[0, 0])
        before, after = offsets[i:i + 2].tolist()
        raise ValueError(f"{name} must be non-decreasing, but {arg}[{i + 1}] = {after} < {arg}[{i}] = {before}")
    if total is not None and last != total:
        raise ValueError(f"{name} must end at {total} (the number of {unit}), but its last entry is {last}")
    return longest


def check_word_lengths(word_offsets: Tensor, max_word_bytes: int, total: int | None = None,
                       name: str = "word_offsets") -> None:
    """ValueError if word_offsets are not valid offsets (ending at `total`, the number of
    bytes, if given) or a word is longer than max_word_bytes; one host read (a sync on
    CUDA). `name` starts the message. Skipped under torch.compile, where the offsets'
    values are not known while tracing."""
    if torch.compiler.is_compiling():
        return
    longest = check_segment_offsets(word_offsets, total, name, "bytes")
    if longest > max_word_bytes:
        raise ValueError(f"{name}: a word has {longest} bytes, more than max_word_bytes={max_word_bytes} "
                         "(its extra bytes would be ignored); segment with word_boundaries(..., max_word_bytes)")


def check_byte_tensor(bytes: Tensor, where: str, name: str = "bytes") -> None:
    """TypeError or ValueError, naming `name`, unless `bytes` is a 1-D uint8 tensor (the
    byte embeddings have 256 rows: uint8 is in range by its type, with no read of values)."""
    if not isinstance(bytes, Tensor):
        raise TypeError(f"{where}: {name} must be a 1-D uint8 tensor, got {type(bytes).__name__}")
    if bytes.dtype != torch.uint8 or bytes.dim() != 1:
        raise ValueError(f"{where}: {name} must be a 1-D uint8 tensor, got {bytes.dtype} {tuple(bytes.shape)}")


def is_int(v) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_sizes(minimum: int = 1, where: str = "", **sizes: int) -> None:
    """ValueError naming the first of `sizes` that is not an int >= minimum; `where`
    (a model's name) starts the message."""
    for name, v in sizes.items():
        if not is_int(v) or v < minimum:
            raise ValueError(f"{where + ': ' if where else ''}{name} must be an int >= {minimum}, got {v!r}")


def check_dropout(dropout: float, where: str = "") -> None:
    if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
        raise ValueError(f"{where + ': ' if where else ''}dropout must be in [0, 1], got {dropout!r}")


def segment_positions(offsets: Tensor, total: int, *, check_offsets: bool = True) -> Tensor:
    """Each row's position within its segment: int64 [total], row t of segment s at
    t - offsets[s]. ``check_offsets=False`` skips the CUDA offsets check (a host sync);
    with invalid offsets the positions are then meaningless, but nothing is read out
    of bounds."""
    starts = offsets[:-1].to(torch.float64)[:, None]  # exact below 2^53 rows
    first_row = segment_expand(starts, offsets, total, check_offsets=check_offsets)[:, 0].long()
    return torch.arange(total, device=offsets.device) - first_row


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [..., Dh] with element i paired with element i + Dh/2, each pair rotated by
    the angle whose cos and sin ([..., Dh/2], broadcast) are given."""
    x1, x2 = x.chunk(2, dim=-1)  # (a split: its backward is one cat, where slices' add zeros)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attention_kernel_for(q: Tensor) -> contextlib.AbstractContextManager:
    """The scaled_dot_product_attention kernel for self-attention over q [S, H, L, Dh]:
    on the CPU, for L up to 32 (64 in bf16 and f16; words take 16 or 17), the plain
    ("math") kernel, since torch's CPU flash kernel is slow on short segments. Measured
    on the 2-core CPU, forward and backward, H = 4, flash against plain: causal, L = 16:
    f32 44 ms against 23, bf16 155 against 21, f16 70 against 34; masked, L = 16, f32: 51
    against 18; L = 32: f32 32 against 28, bf16 84 against 29; L = 64: f32 41 against 46,
    bf16 110 against 49, f16 147 against 50; from L = 128 flash is as fast or faster in
    f32 and bf16 (f16: not yet, 413 against 130 at L = 128; longer not measured).
    Elsewhere torch's own choice."""
    longest_math = 64 if q.dtype in (torch.bfloat16, torch.float16) else 32
    if q.device.type == "cpu" and q.shape[-2] <= longest_math:
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def rotates_before_packing(rows: int, segments: int, max_len: int) -> bool:
    """Whether attention rotates q and k (rotary embedding) on the flat stream of
    `rows` rows, before packing them into [segments, max_len] slots, rather than after:
    where at least a quarter of the slots are padding (words: about 2/3), the padding
    then costs no rotation. The price is two projections (q and k, then v) instead of
    one, so that both pack without a copy; measured on the 2-core CPU at ByteLM's
    attention sizes, forward and backward, it is about a quarter of the rotation of
    every slot (2.8 ms more than one projection; the rotation 12 ms)."""
    return rows > 0 and segments > 0 and max_len > 0 and 3 * segments * max_len >= 4 * rows


class RotaryEmbedding(nn.Module):
    """Rotary position embedding: the pair (i, i + head_dim/2) of a vector at position
    p is rotated by the angle p * base^(-2i/head_dim)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, torch.device, torch.dtype, Tensor, Tensor] | None = None

    def _cos_sin(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin [length, head_dim/2] of the angles at positions 0..length-1."""
        c = self._cache
        same_kind = c is not None and c[1] == device and c[2] == dtype
        if not same_kind or c[0] < length:
            # doubled when it grows, so that decoding one position at a time (which
            # asks for one more each step) rebuilds it a few times, not every step;
            # not when only the dtype or device changed (autocast steps between fp32
            # ones would double it each time)
            n = max(length, 2 * c[0] if same_kind else 64)
            # normal tensors even when first called under torch.inference_mode(): an
            # inference tensor in the cache would break every later backward
            with torch.inference_mode(False):
                t = torch.arange(n, device=device, dtype=torch.float32)
                freqs = torch.outer(t, self.inv_freq.to(device))
                c = (n, device, dtype, freqs.cos().to(dtype), freqs.sin().to(dtype))
            self._cache = c
        return c[3][:length], c[4][:length]

    def forward(self, x: Tensor) -> Tensor:
        """x [..., L, head_dim] -> same shape, rotated by position along L."""
        cos, sin = self._cos_sin(x.shape[-2], x.device, x.dtype)
        return rotate_pairs(x, cos, sin)

    def rotate_from(self, x: Tensor, start: int) -> Tensor:
        """x [..., L, head_dim] -> same shape, rotated for positions start..start+L-1."""
        length = x.shape[-2]
        cos, sin = self._cos_sin(start + length, x.device, x.dtype)
        return rotate_pairs(x, cos[start:], sin[start:])

    def rotate_rows(self, x: Tensor, positions: Tensor, max_len: int) -> Tensor:
        """x [N, G, head_dim] (G heads per row) -> same shape, row r rotated for position
        positions[r]. Positions are clamped to [0, max_len): rows past a segment's
        max_len are dropped by the packing that follows anyway."""
        cos, sin = self._cos_sin(max_len, x.device, x.dtype)
        index = positions.clamp(0, max_len - 1)
        return rotate_pairs(x, cos.index_select(0, index)[:, None], sin.index_select(0, index)[:, None])


class DecodeCache:
    """What a causal :class:`SegmentTransformer` keeps of one sequence between calls of
    its ``extend``: each layer's rotated keys and values [n_heads, length, head_dim]
    of the positions so far, so that a new position costs attention over them rather
    than the whole sequence again (generation). Made by ``SegmentTransformer.new_cache``.

    They live in buffers with room to spare, doubled when full: a copy of the whole
    cache for each new position (torch.cat) took a third of a generation step of the
    byte-level model (small preset, 400 positions, 2-core CPU)."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.length = 0  # positions held (the next one's position)
        self._keys: list[Tensor | None] = [None] * n_layers
        self._values: list[Tensor | None] = [None] * n_layers

    @property
    def keys(self) -> list[Tensor | None]:
        return [None if k is None else k[:, :self.length] for k in self._keys]

    @property
    def values(self) -> list[Tensor | None]:
        return [None if v is None else v[:, :self.length] for v in self._values]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Adds k and v [n_heads, n, head_dim], the next n positions (from ``length``),
        to one layer; returns that layer's keys and values so far."""
        end = self.length + k.shape[1]
        buffer_k, buffer_v = self._keys[layer], self._values[layer]
        if buffer_k is None or buffer_k.shape[1] < end:
            room = max(end, 64 if buffer_k is None else 2 * buffer_k.shape[1])
            grown_k, grown_v = (k.new_empty(k.shape[0], room, k.shape[2]) for _ in range(2))
            if buffer_k is not None:
                grown_k[:, :self.length] = buffer_k[:, :self.length]
                grown_v[:, :self.length] = buffer_v[:, :self.length]
            self._keys[layer], self._values[layer] = buffer_k, buffer_v = grown_k, grown_v
        buffer_k[:, self.length:end] = k
        buffer_v[:, self.length:end] = v
        return buffer_k[:, :end], buffer_v[:, :end]


class SegmentAttention(nn.Module):
    """Multi-head self-attention restricted to each segment of a flat stream.

    ``causal=True``: position i of a segment attends to positions <= i of the same
    segment. ``causal=False``: every position attends to all valid positions of its
    segment (padding keys are masked by segment length).

    ``check_offsets=False`` skips the CUDA offsets check (a host sync) for offsets
    known to be valid; the unpack always reuses the pack's check. With nothing to
    attend (no rows, no segments or max_len 0) no op runs, and the offsets are checked
    in Python instead: the layers after it count on its check.
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool):
        super().__init__()
        check_sizes(d_model=d_model, n_heads=n_heads)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if (d_model // n_heads) % 2:
            raise ValueError(f"d_model={d_model} / n_heads={n_heads} = {d_model // n_heads} per head, which must "
                             "be even (rotary embeddings)")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.causal = causal
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.rotary = RotaryEmbedding(self.head_dim)

    def forward(self, x: Tensor, offsets: Tensor, max_len: int, *, check_offsets: bool = True,
                positions: Tensor | None = None) -> Tensor:
        """x [N, d_model] -> [N, d_model]. ``positions``: `segment_positions` of the
        offsets, when the caller has them (a stack of layers shares them)."""
        n = x.shape[0]
        s = offsets.numel() - 1
        if n == 0 or s == 0 or max_len == 0:
            if check_offsets and not torch.compiler.is_compiling():
                # no op runs here to check them (an empty stream, say), and later layers reuse this check
                check_segment_offsets(offsets, n, "SegmentAttention: offsets")
            return self.proj(torch.zeros_like(x))
        h, dh, d = self.n_heads, self.head_dim, self.d_model
        if rotates_before_packing(n, s, max_len):
            if positions is None:
                positions = segment_positions(offsets, n, check_offsets=check_offsets)
                check_offsets = False  # the same check was just made
            # q and k projected apart from v, so that both come out contiguous and the
            # rotated q and k need no copy next to v
            w, b = self.qkv.weight, self.qkv.bias
            qk = self.rotary.rotate_rows(F.linear(x, w[:2 * d], b[:2 * d]).view(n, 2 * h, dh), positions, max_len)
            qk = segment_pack(qk.view(n, 2 * d), offsets, max_len, check_offsets=check_offsets)
            q, k = qk.view(s, max_len, 2, h, dh).permute(2, 0, 3, 1, 4)  # [S, H, L, Dh]
            v = segment_pack(F.linear(x, w[2 * d:], b[2 * d:]), offsets, max_len, check_offsets=False)
            v = v.view(s, max_len, h, dh).transpose(1, 2)
        else:
            qkv = segment_pack(self.qkv(x), offsets, max_len, check_offsets=check_offsets)  # [S, L, 3D]
            q, k, v = qkv.view(s, max_len, 3, h, dh).permute(2, 0, 3, 1, 4)  # [S, H, L, Dh]
            q, k = self.rotary(q), self.rotary(k)
        with attention_kernel_for(q):
            if self.causal:
                # Padding sits after the valid positions, so a causal mask alone keeps every
                # valid query away from padding keys.
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                lengths = segment_lengths(offsets).clamp(min=1)
                mask = torch.arange(max_len, device=x.device) < lengths[:, None]  # [S, L]
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        o = o.transpose(1, 2).reshape(s, max_len, self.d_model)
        return self.proj(segment_unpack(o, offsets, n, check_offsets=False))  # checked by the pack

    def extend(self, x: Tensor, cache: DecodeCache, layer: int) -> Tensor:
        """Causal attention only: x [n, d_model], the next n positions of the one
        sequence whose earlier positions `cache` holds (this block is layer `layer`),
        -> [n, d_model], as `forward` gives those rows over the whole sequence. Adds
        their keys and values to the cache; the caller advances ``cache.length``."""
        if not self.causal:
            raise ValueError("SegmentAttention.extend: only causal attention can extend a sequence")
        n, start = x.shape[0], cache.length
        h, dh = self.n_heads, self.head_dim
        q, k, v = self.qkv(x).view(n, 3, h, dh).permute(1, 2, 0, 3)  # [H, n, Dh] each
        q, k = self.rotary.rotate_from(q, start), self.rotary.rotate_from(k, start)
        k, v = cache.append(layer, k, v)  # [H, start + n, Dh]
        mask = None
        if n > 1:  # new position start + i sees positions <= start + i
            mask = torch.arange(start + n, device=x.device) <= torch.arange(start, start + n, device=x.device)[:, None]
        # torch's own kernel choice: without a backward and a batch of segments, its CPU
        # flash kernel is the faster (measured on the 2-core CPU, f32, one query over 512
        # keys: 25 us against 70 for the plain kernel; 17 queries over 17: 25 against 50)
        o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)  # [1, H, n, Dh]
        return self.proj(o[0].transpose(0, 1).reshape(n, self.d_model))


class SegmentBlock(nn.Module):
    """Pre-norm transformer block over a segmented flat stream."""

    def __init__(self, d_model: int, n_heads: int, causal: bool, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SegmentAttention(d_model, n_heads, causal)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_ratio * d_model, d_model),
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, offsets: Tensor, max_len: int, *, check_offsets: bool = True,
                positions: Tensor | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x), offsets, max_len, check_offsets=check_offsets,
                                    positions=positions))
        return x + self.drop(self.mlp(self.ln2(x)))

    def extend(self, x: Tensor, cache: DecodeCache, layer: int) -> Tensor:
        """`forward` for the next rows of one cached sequence (`SegmentAttention.extend`)."""
        x = x + self.drop(self.attn.extend(self.ln1(x), cache, layer))
        return x + self.drop(self.mlp(self.ln2(x)))


class SegmentTransformer(nn.Module):
    """A stack of :class:`SegmentBlock` plus a final LayerNorm (``n_layers`` may be 0).

    The offsets are checked once (on CUDA a host sync; none with
    ``check_offsets=False``, for offsets known to be valid): where the longest segment
    is read (to check ``max_len``, or to find it), by :func:`check_segment_offsets`,
    which reads it in the same sync, and then no op checks them again; otherwise
    (``check_max_len=False`` with ``max_len`` given, or under torch.compile) by the
    first op that takes them, where the rows' positions in their segments are made for
    every block's rotary embedding, or the first block packs them for attention (a
    stack of no blocks uses them for nothing, and checks them only where it reads the
    longest segment). ``max_len`` (default: the longest segment, read from the
    offsets) must be at least the longest segment: attention packs each segment into
    ``max_len`` positions. A shorter one raises ValueError (reading the longest
    segment: on CUDA a host sync), unless ``check_offsets=False`` or
    ``check_max_len=False`` say it is known to fit (then rows past ``max_len`` would
    come back with no attention output).
    """

    def __init__(self, d_model: int, n_layers: int, n_heads: int, causal: bool, mlp_ratio: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        check_sizes(d_model=d_model, n_heads=n_heads, mlp_ratio=mlp_ratio)
        check_sizes(0, n_layers=n_layers)
        check_dropout(dropout)
        self.blocks = nn.ModuleList(
            SegmentBlock(d_model, n_heads, causal, mlp_ratio, dropout) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, offsets: Tensor, max_len: int | None = None, *,
                check_offsets: bool = True, check_max_len: bool = True) -> Tensor:
        d_model = self.ln_f.normalized_shape[0]
        if not isinstance(x, Tensor):
            raise TypeError(f"SegmentTransformer: x must be a tensor [rows, d_model={d_model}], got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != d_model:  # (else the offsets' check would name the rows)
            raise ValueError(f"SegmentTransformer: x must be [rows, d_model={d_model}], got {tuple(x.shape)}")
        if check_offsets and (check_max_len or max_len is None) and not torch.compiler.is_compiling():
            # the read of the longest segment checks the offsets too (no extra sync)
            longest = check_segment_offsets(offsets, x.shape[0], "SegmentTransformer: offsets")
            if max_len is None:
                max_len = longest
            elif check_max_len and longest > max_len:
                raise ValueError(f"max_len={max_len} is shorter than the longest segment ({longest} rows): "
                                 "attention would drop the rows past max_len; pass max_len=None to read it")
            check_offsets = False  # checked: no op checks them again
        elif max_len is None:
            max_len = max_segment_length(offsets)
        positions = None
        if self.blocks and rotates_before_packing(x.shape[0], offsets.numel() - 1, max_len):
            # every block's rotary embedding needs them: made (and the offsets checked) once
            positions = segment_positions(offsets, x.shape[0], check_offsets=check_offsets)
            check_offsets = False
        for block in self.blocks:
            x = block(x, offsets, max_len, check_offsets=check_offsets, positions=positions)
            check_offsets = False  # the same offsets, checked (if not before) by the first block
        return self.ln_f(x)

    def new_cache(self) -> DecodeCache:
        """An empty cache for `extend` (one sequence)."""
        return DecodeCache(len(self.blocks))

    def extend(self, x: Tensor, cache: DecodeCache) -> Tensor:
        """Causal stacks only: x [n, d_model], the next n rows of one sequence whose
        earlier rows went through `extend` with the same `cache` (none for a new one),
        -> [n, d_model], the rows `forward` gives them over the whole sequence (up to
        rounding: the sums run in another order). The cache keeps every layer's keys
        and values: each call costs attention over the rows so far, not the whole
        sequence again. No offsets, so no check and no host sync."""
        if x.dim() != 2:
            raise ValueError(f"SegmentTransformer.extend: x must be [n, d_model], got {tuple(x.shape)}")
        if cache.n_layers != len(self.blocks):
            raise ValueError(f"SegmentTransformer.extend: the cache has {cache.n_layers} layers, the stack "
                             f"{len(self.blocks)}: make it with new_cache()")
        for layer, block in enumerate(self.blocks):
            x = block.extend(x, cache, layer)
        cache.length += x.shape[0]
        return self.ln_f(x)


class BytePoolingEncoder(nn.Module):
    """Bytes -> one vector per word.

    Byte embeddings, ``n_layers`` small bidirectional transformer layers restricted to
    each word (attention on the packed ``[W, max_word_bytes, D]`` batch), then pooling
    into word vectors:

    - ``"mean"`` / ``"max"``: ``segment_reduce`` over the word's byte states ``[T, D]``;
    - ``"attention"``: a learned query per head attends over the word's bytes,
      masked by word length.

    Words come from ``word_boundaries(bytes, cu_seqlens, max_word_bytes, "space")``
    (see :meth:`segment`), or from any word offsets whose words are at most
    ``max_word_bytes`` long.
    """

    def __init__(self, d_model: int = 128, n_layers: int = 1, n_heads: int = 4, max_word_bytes: int = 16,
                 pool: str = "mean", d_out: int | None = None, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        if pool not in POOL_MODES:
            raise ValueError(f"pool must be one of {POOL_MODES}, got {pool!r}")
        check_sizes(d_model=d_model, n_heads=n_heads)
        check_sizes(4, max_word_bytes=max_word_bytes)  # (word_boundaries' own minimum)
        if d_out is not None:
            check_sizes(d_out=d_out)
        # attention pooling splits d_model into heads even without local layers (which check it)
        if pool == "attention" and d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads} (attention pooling)")
        self.d_model = d_model
        self.n_heads = n_heads
        self.max_word_bytes = max_word_bytes
        self.pool = pool
        self.embed = nn.Embedding(256, d_model)
        self.local = SegmentTransformer(d_model, n_layers, n_heads, causal=False, mlp_ratio=mlp_ratio,
                                        dropout=dropout)
        if pool == "attention":
            head_dim = d_model // n_heads
            self.query = nn.Parameter(torch.randn(n_heads, head_dim) * head_dim ** -0.5)
            self.kv = nn.Linear(d_model, 2 * d_model)
            self.pool_proj = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_out) if d_out is not None and d_out != d_model else nn.Identity()
        self.d_out = d_out or d_model

    def segment(self, bytes: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor]:
        """(word_offsets [W+1], word_cu_seqlens [B+1]) for a flat uint8 byte stream."""
        return word_boundaries(bytes, cu_seqlens, self.max_word_bytes, "space")

    def byte_states(self, bytes: Tensor, word_offsets: Tensor, *, check_offsets: bool = True) -> Tensor:
        """Contextual byte states [T, d_model] (context = the byte's own word); words
        must be at most max_word_bytes long (not checked here: `forward` checks).
        ``check_offsets=False`` skips the CUDA check of word_offsets (a host sync)."""
        x = self.embed(bytes.long())
        # words of at most max_word_bytes are the encoder's contract (forward checks it,
        # encode trusts it): the local layers need not read the longest word again
        return self.local(x, word_offsets, self.max_word_bytes, check_offsets=check_offsets, check_max_len=False)

    def pool_words(self, x: Tensor, word_offsets: Tensor, *, check_offsets: bool = True) -> Tensor:
        """Byte states [T, D] -> word vectors [W, D] (before the output projection).
        ``check_offsets=False`` skips the CUDA check of word_offsets (a host sync)."""
        if self.pool in ("mean", "max"):
            return segment_reduce(x, word_offsets, self.pool, check_offsets=check_offsets)
        w = word_offsets.numel() - 1
        L = self.max_word_bytes
        h, dh = self.n_heads, self.d_model // self.n_heads
        kv = segment_pack(self.kv(x), word_offsets, L, check_offsets=check_offsets)  # [W, L, 2D]
        k, v = kv.view(w, L, 2, h, dh).permute(2, 0, 3, 1, 4)  # [W, H, L, Dh]
        q = self.query.to(x.dtype)[None, :, None, :].expand(w, h, 1, dh)
        lengths = segment_lengths(word_offsets).clamp(min=1)
        mask = torch.arange(L, device=x.device) < lengths[:, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # [W, H, 1, Dh]
        return self.pool_proj(o.reshape(w, self.d_model))

    def forward(self, bytes: Tensor, word_offsets: Tensor) -> Tensor:
        """bytes uint8 [T], word_offsets int64 [W+1] -> word vectors [W, d_out].

        Raises ValueError for invalid word_offsets or a word longer than max_word_bytes
        (its extra bytes would be dropped silently); the check reads the longest word (a
        host sync on CUDA), and then no op checks word_offsets again. `encode` skips it,
        for offsets made by `segment`."""
        check_byte_tensor(bytes, "BytePoolingEncoder.forward")
        if not isinstance(word_offsets, Tensor):
            raise TypeError(f"BytePoolingEncoder.forward: word_offsets must be an int64 tensor, got "
                            f"{type(word_offsets).__name__}")
        check_word_lengths(word_offsets, self.max_word_bytes, bytes.numel(),
                           "BytePoolingEncoder.forward: word_offsets")
        # that checked the offsets too, except under torch.compile (where the ops check them)
        return self.encode(bytes, word_offsets, check_offsets=torch.compiler.is_compiling())

    def encode(self, bytes: Tensor, word_offsets: Tensor, *, check_offsets: bool = True) -> Tensor:
        """`forward` without the word-length check: every word must be at most
        max_word_bytes long (true of `segment`'s words). ``check_offsets=False`` skips
        the CUDA check of word_offsets (a host sync), for offsets known to be valid,
        such as `segment`'s."""
        x = self.byte_states(bytes, word_offsets, check_offsets=check_offsets)
        # the local layers checked word_offsets; with no local layer the pooling checks them
        pool_checks = check_offsets and len(self.local.blocks) == 0
        return self.out(self.pool_words(x, word_offsets, check_offsets=pool_checks))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-style init: normal(0, std) for linear and embedding weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
    # scale the residual output projections by depth (GPT-2)
    blocks = [m for m in module.modules() if isinstance(m, SegmentBlock)]
    if blocks:
        scale = std / math.sqrt(2 * len(blocks))
        for b in blocks:
            nn.init.normal_(b.attn.proj.weight, std=scale)
            nn.init.normal_(b.mlp[2].weight, std=scale)

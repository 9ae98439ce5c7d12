"""Fast tests of the pooling models, training loop, data loading, demo registry and CLI.

Everything runs on CPU with tiny models and a tiny synthetic corpus (a few seconds in all).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import types
import xml.etree.ElementTree as ET
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch import nn

import tokcore  # noqa: F401  (loads the ops)
from tokcore import cli
from tokcore.plot import line_chart_svg, nice_ticks
from tokcore.data import batched, heldout_windows, list_files, load_corpus, pack_sequences, sample_batch
from tokcore.errors import UsageError
from tokcore.pooling.lm import (
    EOW,
    ByteLM,
    ByteLMConfig,
    HierarchicalByteLM,
    HierConfig,
    build_model,
    count_parameters,
    matched_byte_config,
)
from tokcore.pooling import modules
from tokcore.pooling.modules import BytePoolingEncoder, SegmentAttention, SegmentTransformer
from tokcore.pooling.ops import segment_reduce, word_boundaries
from reference.pooling import split_words as ref_split_words
from tokcore.pooling.train import (
    TrainConfig,
    compare,
    evaluate,
    format_compare,
    format_report,
    load_checkpoint,
    load_model,
    check_precision,
    lr_at,
    plan_steps,
    resolve_model_config,
    save_checkpoint,
    train,
)

TINY_HIER = dict(d_model=32, n_layers=1, n_heads=2, d_local=16, n_local_heads=2, n_enc_layers=1, n_dec_layers=1,
                 max_word_bytes=8)
TINY_BYTE = dict(d_model=32, n_layers=2, n_heads=2)
TEXT = (
    b"def add(a, b):\n    return a + b\n\n"
    b"class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    b"# The quick brown fox jumps over the lazy dog. Na\xc3\xafve caf\xc3\xa9!\n"
)


def _batch(texts):
    return pack_sequences([t if isinstance(t, bytes) else t.encode() for t in texts])


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """25 small text files: file 20 is held out (every 20th)."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(25):
        (root / f"f{i:02d}.py").write_bytes(TEXT * 6 + f"value_{i} = {i * i}\n".encode())
    (root / "blob.bin").write_bytes(b"\x00\x01" * 100)  # binary: skipped
    return root


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------ encoder
@pytest.mark.parametrize("pool", ["mean", "max", "attention"])
def test_encoder_shapes_and_grad(pool):
    b, cu = _batch([TEXT, b"x", b"hello world"])
    enc = BytePoolingEncoder(d_model=16, n_layers=1, n_heads=2, max_word_bytes=8, pool=pool, d_out=24)
    wo, wcu = enc.segment(b, cu)
    w = enc(b, wo)
    assert w.shape == (wo.numel() - 1, 24)
    assert wcu.tolist()[-1] == wo.numel() - 1
    assert torch.isfinite(w).all()
    w.square().sum().backward()
    assert enc.embed.weight.grad is not None and torch.isfinite(enc.embed.weight.grad).all()


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_encoder_pool_reduces_each_word(pool):
    # byte_states does not depend on the pooling mode: each word vector is the mean or
    # the max of its word's byte states
    b, cu = _batch([TEXT])
    enc = BytePoolingEncoder(d_model=16, n_layers=1, n_heads=2, max_word_bytes=8, pool=pool)
    wo, _ = enc.segment(b, cu)
    states = enc.byte_states(b, wo)
    words = [states[a:e] for a, e in _pairs(wo)]
    means = torch.stack([w.mean(0) for w in words])
    maxes = torch.stack([w.max(0).values for w in words])
    torch.testing.assert_close(enc(b, wo), means if pool == "mean" else maxes, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(means, maxes, atol=1e-3)  # the two reductions differ here


# Dense per-segment references: each segment's rows alone, plain softmax attention, no
# padding and no mask, with the module's own weights.
def _pairs(offsets):
    bounds = offsets.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _ref_rotary(x):
    """Rotary embedding of x [H, L, Dh] at positions 0..L-1 (halves rotated as pairs)."""
    length, dh = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    angle = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _ref_segment_attention(attn, x, offsets):
    h, dh = attn.n_heads, attn.head_dim
    out = []
    for a, e in _pairs(offsets):
        n = e - a
        q, k, v = attn.qkv(x[a:e]).view(n, 3, h, dh).permute(1, 2, 0, 3)  # each [H, n, Dh]
        q, k = _ref_rotary(q), _ref_rotary(k)
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)  # [H, n, n]
        if attn.causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        o = scores.softmax(-1) @ v  # [H, n, Dh]
        out.append(attn.proj(o.transpose(0, 1).reshape(n, h * dh)))
    return torch.cat(out)


def _ref_segment_transformer(tr, x, offsets):
    for blk in tr.blocks:
        x = x + _ref_segment_attention(blk.attn, blk.ln1(x), offsets)
        x = x + blk.mlp(blk.ln2(x))
    return tr.ln_f(x)


def _ref_attention_pool(enc, x, offsets):
    h = enc.n_heads
    dh = enc.d_model // h
    out = []
    for a, e in _pairs(offsets):
        k, v = enc.kv(x[a:e]).view(e - a, 2, h, dh).permute(1, 2, 0, 3)  # each [H, n, Dh]
        weights = ((k @ enc.query[:, :, None]).squeeze(-1) / math.sqrt(dh)).softmax(-1)  # [H, n]
        out.append(enc.pool_proj((weights[:, :, None] * v).sum(1).reshape(h * dh)))
    return torch.stack(out)


@pytest.mark.parametrize("causal", [False, True])
def test_segment_attention_matches_dense_per_segment_reference(causal):
    # segments of 3, 5, 1 and 6 rows packed into 8 slots: every segment has padding
    attn = SegmentAttention(16, 2, causal=causal).eval()
    x = torch.randn(15, 16)
    offsets = torch.tensor([0, 3, 8, 9, 15])
    with torch.no_grad():
        ref = _ref_segment_attention(attn, x, offsets)
        torch.testing.assert_close(attn(x, offsets, 8), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attn(x, offsets, 6), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_attention_short_and_long_segments_match_dense_reference(causal, dtype):
    # on the CPU, short packed segments (words) take the plain attention kernel, long
    # ones torch's default (flash): both against the reference
    torch.manual_seed(0)
    attn = SegmentAttention(16, 2, causal=causal).eval().to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for lengths in ([3, 5, 1, 6], [3, 70, 1, 20]):
        offsets = torch.tensor([0] + lengths).cumsum(0)
        x = torch.randn(int(offsets[-1]), 16, dtype=dtype)
        q = torch.empty(len(lengths), 2, max(lengths), 8, dtype=dtype)
        plain = not isinstance(modules.attention_kernel_for(q), contextlib.nullcontext)
        assert plain == (max(lengths) <= (32 if dtype == torch.float32 else 64))
        with torch.no_grad():
            torch.testing.assert_close(attn(x, offsets, max(lengths)), _ref_segment_attention(attn, x, offsets), **tol)


def test_segment_attention_without_padding_matches_dense_reference():
    # segments of one length packed into as many slots: q and k are rotated after packing
    attn = SegmentAttention(16, 2, causal=True).eval()
    x, offsets = torch.randn(12, 16), torch.tensor([0, 4, 8, 12])
    assert not modules.rotates_before_packing(12, 3, 4) and modules.rotates_before_packing(12, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, offsets, 4), _ref_segment_attention(attn, x, offsets),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_segment_attention_rotates_before_or_after_packing_alike(causal, monkeypatch):
    # the two places of the rotary embedding (the flat stream, the packed slots) give
    # the same outputs and gradients, also with rows past max_len (dropped) and an
    # empty segment
    torch.manual_seed(0)
    attn = SegmentAttention(16, 2, causal=causal)
    offsets = torch.tensor([0, 3, 8, 8, 9, 20])
    x = torch.randn(20, 16, dtype=torch.float64)
    attn.double()
    results = []
    for before in (True, False):
        monkeypatch.setattr(modules, "rotates_before_packing", lambda rows, segments, max_len, b=before: b)
        for max_len in (11, 13, 6):  # 6: rows of the last segment past it are dropped
            xi = x.clone().requires_grad_()
            attn.zero_grad()
            y = attn(xi, offsets, max_len, check_offsets=False)
            y.backward(torch.cos(torch.arange(y.numel(), dtype=torch.float64)).view_as(y))
            results.append((y.detach(), xi.grad, attn.qkv.weight.grad.clone()))
    for a, b in zip(results[:3], results[3:]):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_segment_positions():
    offsets = torch.tensor([0, 3, 3, 4, 9])
    torch.testing.assert_close(modules.segment_positions(offsets, 9),
                               torch.tensor([0, 1, 2, 0, 0, 1, 2, 3, 4]))
    assert modules.segment_positions(torch.tensor([0]), 0).shape == (0,)
    with pytest.raises(RuntimeError, match="segment_expand: offsets must be non-decreasing"):
        modules.segment_positions(torch.tensor([0, 5, 3]), 3)
    for n_seg in (1, 7, 40):  # random lengths, empty segments included
        lengths = torch.randint(0, 6, (n_seg,))
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        expected = torch.cat([torch.arange(int(k)) for k in lengths])
        torch.testing.assert_close(modules.segment_positions(offsets, int(offsets[-1])), expected)


def test_rotary_embedding_rotates_pairs_by_position():
    # against the closed form: pair (i, i + Dh/2) at position p turns by p / 10000^(2i/Dh)
    rot = modules.RotaryEmbedding(8)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(rot(x), _ref_rotary(x))
    positions = torch.tensor([4, 0, 2, 2, 1])
    rows = torch.randn(5, 3, 8, dtype=torch.float64)  # 3 heads per row
    expected = torch.stack([_ref_rotary(rows[r:r + 1].transpose(0, 1).expand(3, int(p) + 1, 8).contiguous())
                            [:, -1] for r, p in enumerate(positions)])
    torch.testing.assert_close(rot.rotate_rows(rows, positions, 5), expected)


def test_encoder_attention_pool_matches_dense_per_word_reference():
    # the local layers attend within each word only, the pooling query over the word's
    # bytes only: words shorter than max_word_bytes are padded, the padding masked
    b, cu = _batch([TEXT, b"x", b"hello world"])
    enc = BytePoolingEncoder(d_model=16, n_layers=2, n_heads=2, max_word_bytes=8, pool="attention", d_out=24).eval()
    wo, _ = enc.segment(b, cu)
    lengths = (wo[1:] - wo[:-1]).tolist()
    assert min(lengths) == 1 and max(lengths) == 8  # short words (padded) and full ones
    with torch.no_grad():
        states = _ref_segment_transformer(enc.local, enc.embed(b.long()), wo)
        torch.testing.assert_close(enc.byte_states(b, wo), states, rtol=1e-5, atol=1e-5)
        ref = enc.out(_ref_attention_pool(enc, states, wo))
        torch.testing.assert_close(enc(b, wo), ref, rtol=1e-5, atol=1e-5)
        x = torch.randn(b.numel(), 16)  # the pooling alone, on any byte states
        torch.testing.assert_close(enc.pool_words(x, wo), _ref_attention_pool(enc, x, wo), rtol=1e-5, atol=1e-5)


def test_encoder_words_are_independent():
    # the local layer sees only its own word: changing one word leaves the others' vectors alone
    enc = BytePoolingEncoder(d_model=16, n_layers=2, n_heads=2, max_word_bytes=8, pool="attention").eval()
    b1, cu = _batch([b"alpha beta gamma"])
    b2, _ = _batch([b"alpha bXta gamma"])
    wo, _ = enc.segment(b1, cu)
    assert torch.equal(wo, enc.segment(b2, cu)[0])
    w1, w2 = enc(b1, wo), enc(b2, wo)
    torch.testing.assert_close(w1[[0, 2]], w2[[0, 2]])
    assert not torch.allclose(w1[1], w2[1])


# ------------------------------------------------------------------------------ hierarchical LM
def test_hier_forward_counts_and_targets():
    model = HierarchicalByteLM(HierConfig(**TINY_HIER))
    b, cu = _batch([TEXT, b"Hello, world!"])
    out = model(b, cu)
    wo, wcu = model.segment(b, cu)
    t, w = b.numel(), wo.numel() - 1
    assert out["n_bytes"] == t and out["n_words"] == w and out["n_symbols"] == t + w
    assert out["backbone_tokens"] == w and out["n_seqs"] == 2
    assert torch.isfinite(out["loss"]) and out["loss"].item() == pytest.approx(out["nll"].item() / (t + w))
    # targets: each word's bytes then EOW
    bounds, data = wo.tolist(), b.tolist()
    ref = []
    for a, e in zip(bounds[:-1], bounds[1:]):
        ref += data[a:e] + [EOW]
    assert model.decoder_targets(b, wo).tolist() == ref


def test_hier_is_causal():
    """A symbol's logits depend only on earlier words of its sequence and earlier bytes of its word."""
    model = HierarchicalByteLM(HierConfig(**TINY_HIER)).eval()
    s0 = b"one two three four"
    b1, cu = _batch([s0, b"alpha beta gamma"])
    b2, _ = _batch([s0, b"alpha beta gaXma"])  # change byte 3 of the last word of sequence 1
    wo, wcu = model.segment(b1, cu)
    assert torch.equal(wo, model.segment(b2, cu)[0])

    def logits(b):
        h = model.word_states(b, wo, wcu)
        return model.decoder_logits(model.previous_word_context(h, wcu), b, wo)[0]

    l1, l2 = logits(b1), logits(b2)
    # decoder stream of the last word: [ctx, g, a, m|X, m, a] (slot i predicts byte i, slot 5
    # predicts EOW); slots 0..2 see only bytes before the changed one, slots 3..5 see it.
    n = l1.shape[0]
    torch.testing.assert_close(l1[: n - 3], l2[: n - 3])
    assert not torch.allclose(l1[n - 3:], l2[n - 3:])


def test_hier_first_word_uses_start_state():
    model = HierarchicalByteLM(HierConfig(**TINY_HIER))
    b, cu = _batch([b"ab cd", b"ef gh ij"])
    wo, wcu = model.segment(b, cu)
    h = model.word_states(b, wo, wcu)
    ctx = model.previous_word_context(h, wcu)
    assert wcu.tolist() == [0, 2, 5]
    for first in (0, 2):
        torch.testing.assert_close(ctx[first], model.start.detach().to(ctx.dtype), check_stride=False)
    torch.testing.assert_close(ctx[1], h[0])
    torch.testing.assert_close(ctx[4], h[3])


@pytest.mark.parametrize("kind,cfg", [("hier", TINY_HIER), ("hier", {**TINY_HIER, "pool": "attention"}),
                                      ("byte", TINY_BYTE)])
def test_loss_decreases(kind, cfg):
    model = build_model(kind, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    b, cu = _batch([TEXT[:96], TEXT[96:192]])
    losses = []
    for _ in range(12):
        out = model(b, cu)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.3


@pytest.mark.parametrize("kind,cfg", [("hier", TINY_HIER), ("hier", {**TINY_HIER, "pool": "attention"}),
                                      ("byte", TINY_BYTE)])
def test_models_on_cuda_match_the_cpu(cuda_device, kind, cfg):
    # The same weights and batch on both devices: loss and every gradient agree (the
    # CUDA kernels, the models' skipped offsets checks and torch's own CUDA kernels in
    # one step), and a training step and generation run on the GPU.
    model = build_model(kind, cfg)
    b, cu = _batch([TEXT[:150], TEXT[150:], b""])
    grads = {}
    for device in ("cpu", cuda_device):
        model.to(device).zero_grad()
        out = model(b.to(device), cu.to(device))
        out["loss"].backward()
        grads[device] = (out["loss"].detach().cpu(),
                         torch.cat([p.grad.detach().cpu().flatten() for p in model.parameters()]))
    (loss_cpu, grad_cpu), (loss_cuda, grad_cuda) = grads["cpu"], grads[cuda_device]
    torch.testing.assert_close(loss_cuda, loss_cpu, rtol=1e-4, atol=1e-6)  # f32, other summation orders
    assert float((grad_cuda - grad_cpu).norm() / grad_cpu.norm()) < 1e-4
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    out = model.generate(b"def f", max_new_bytes=12, top_k=10,
                         generator=torch.Generator().manual_seed(0))  # sampling runs on the CPU
    assert isinstance(out, bytes) and 0 < len(out) <= 12


def test_byte_lm_is_causal_and_counts():
    model = ByteLM(ByteLMConfig(**TINY_BYTE)).eval()
    b1, cu = _batch([b"abcdef", b"ghijkl"])
    b2 = b1.clone()
    b2[9] = ord("X")
    l1, l2 = model.logits(b1, cu), model.logits(b2, cu)
    torch.testing.assert_close(l1[:10], l2[:10])  # row t predicts byte t from bytes < t
    assert not torch.allclose(l1[10:], l2[10:])
    out = model(b1, cu)
    assert out["n_bytes"] == out["n_symbols"] == 12 and out["backbone_tokens"] == 12


def test_byte_lm_sequences_are_independent_and_start_at_bos():
    # packed sequences do not see each other: the first row of each (sequence 0 too)
    # predicts from BOS (input symbol 256) alone, never from the previous sequence's end
    model = ByteLM(ByteLMConfig(**TINY_BYTE)).eval()
    seqs = [b"abcdef", b"ghijkl", b"mnop"]
    b1, cu = _batch(seqs)
    with torch.no_grad():
        l1 = model.logits(b1, cu)
        b2 = b1.clone()
        b2[5], b2[11] = ord("X"), ord("Y")  # the last bytes of sequences 0 and 1: no row predicts from them
        torch.testing.assert_close(model.logits(b2, cu), l1, rtol=1e-5, atol=1e-5)
        for s, (a, e) in zip(seqs, _pairs(cu)):
            torch.testing.assert_close(l1[a:e], model.logits(*_batch([s])), rtol=1e-5, atol=1e-5)
        # a row that sees nothing but BOS: one position, attention returns its own value
        bos_row = model.head(model.blocks(model.embed(torch.tensor([256])), torch.tensor([0, 1])))[0]
        for a in cu[:-1].tolist():
            torch.testing.assert_close(l1[a], bos_row, rtol=1e-5, atol=1e-5)
        zero_row = model.head(model.blocks(model.embed(torch.tensor([0])), torch.tensor([0, 1])))[0]
        assert not torch.allclose(bos_row, zero_row, atol=1e-4)  # BOS is not byte 0


@pytest.mark.parametrize("kind,cfg", [("hier", TINY_HIER), ("byte", TINY_BYTE)])
def test_generate_returns_bytes(kind, cfg):
    model = build_model(kind, cfg)
    out = model.generate(b"def f", max_new_bytes=20, temperature=1.0, top_k=10,
                         generator=torch.Generator().manual_seed(0))
    assert isinstance(out, bytes) and 0 < len(out) <= 20
    g1 = model.generate("x = ", max_new_bytes=12, temperature=0)
    g2 = model.generate("x = ", max_new_bytes=12, temperature=0)
    assert g1 == g2 and len(g1) == 12
    assert isinstance(model.generate(b"", max_new_bytes=5), bytes)
    assert model.training  # generate restores the mode


def test_matched_byte_config_params():
    hier = HierConfig(d_model=64, n_layers=2, n_heads=2, d_local=32, n_local_heads=2)
    n_hier = count_parameters(HierarchicalByteLM(hier))
    byte_cfg = matched_byte_config(hier)
    n_byte = count_parameters(ByteLM(byte_cfg))
    assert byte_cfg.d_model == 64
    assert abs(n_byte - n_hier) / n_hier < 0.2


# ------------------------------------------------------------------------------ data
def test_corpus_split_and_windows(corpus_dir):
    c = load_corpus(corpus_dir)
    assert c.n_train_files == 24 and c.n_heldout_files == 1
    assert c.heldout.tobytes().endswith(b"value_19 = 361\n")  # the 20th file in sorted order
    assert load_corpus(corpus_dir).train.tobytes() == c.train.tobytes()  # deterministic
    assert [p.name for p in list_files(corpus_dir, "*.py")][:2] == ["f00.py", "f01.py"]
    single = load_corpus(corpus_dir / "f00.py")
    assert len(single.train) > 0 and len(single.heldout) > 0
    b, cu = sample_batch(c.train, 3, 64, np.random.default_rng(0))
    assert b.dtype == torch.uint8 and b.shape == (192,) and cu.tolist() == [0, 64, 128, 192]
    w1, w2 = heldout_windows(c.heldout, 4, 32), heldout_windows(c.heldout, 4, 32)
    assert len(w1) == 4 and all(np.array_equal(x, y) for x, y in zip(w1, w2))
    batches = list(batched(w1, 3))
    assert [bb[1].tolist() for bb in batches] == [[0, 32, 64, 96], [0, 32]]


def test_stdlib_corpus_default():
    c = load_corpus(max_bytes=300_000)
    assert c.source == "python stdlib" and len(c.train) > 100_000 and len(c.heldout) > 0


def test_load_corpus_stops_reading_once_max_bytes_are_read(corpus_dir):
    # whole files in sorted order (the binary file skipped, not counted) until max_bytes
    # are read: at most max_bytes plus the rest of the file that reached it
    sizes = [p.stat().st_size for p in list_files(corpus_dir, "*.py")]
    for max_bytes, n_files in ((sizes[0] + sizes[1], 2), (sizes[0] + sizes[1] + 1, 3), (1, 1)):
        c = load_corpus(corpus_dir, max_bytes=max_bytes)
        got = len(c.train) + len(c.heldout)
        assert got == sum(sizes[:n_files]) and got < max_bytes + max(sizes), (max_bytes, got)
    c = load_corpus(corpus_dir, holdout_every=2, max_bytes=sizes[0] + sizes[1] + 1)
    assert (c.n_train_files, c.n_heldout_files) == (2, 1) and len(c.heldout) == sizes[1]
    c = load_corpus(corpus_dir / "f00.py", max_bytes=100)  # a single file is cut to max_bytes
    assert len(c.train) + len(c.heldout) == 100


# ------------------------------------------------------------------------------ training
def _cfg(corpus_dir, **kw):
    base = dict(model="hier", model_config=dict(TINY_HIER), data=str(corpus_dir), seq_len=64, batch_size=4,
                steps=4, eval_windows=4, progress=False, device="cpu", warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    cosine = lambda p: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))  # noqa: E731
    assert lr_at(cfg, 0, 1000) == pytest.approx(0.1 * cosine(0.0))  # warmup: 1/10
    assert lr_at(cfg, 4, 1000) == pytest.approx(0.5 * cosine(0.004))
    assert lr_at(cfg, 9, 1000) == pytest.approx(cosine(0.009))  # warmup over
    assert lr_at(cfg, 500, 1000) == pytest.approx(0.55)
    assert lr_at(cfg, 1000, 1000) == pytest.approx(0.1)
    # a short run: the warmup takes at most a tenth of it (50 steps: 5; 200 steps: 20 of 50)
    assert lr_at(cfg, 0, 50) == pytest.approx(0.2 * cosine(0.0))
    assert lr_at(cfg, 4, 50) == pytest.approx(cosine(4 / 50))
    long_warmup = TrainConfig(lr=1.0, warmup_steps=50, min_lr_ratio=0.1)
    assert lr_at(long_warmup, 9, 200) == pytest.approx(0.5 * cosine(9 / 200))
    assert lr_at(long_warmup, 19, 200) == pytest.approx(cosine(19 / 200))
    assert lr_at(long_warmup, 0, 5) == pytest.approx(cosine(0.0))  # under 10 steps: no warmup
    assert lr_at(TrainConfig(lr=1.0, schedule="linear", min_lr_ratio=0.0, warmup_steps=1), 5, 10) == pytest.approx(0.5)


def test_lr_schedule_constant():
    cfg = TrainConfig(lr=2.0, warmup_steps=10, min_lr_ratio=0.1, schedule="constant")
    assert lr_at(cfg, 0, 100) == pytest.approx(0.2)  # the warmup still applies
    for step in (9, 50, 99, 100):
        assert lr_at(cfg, step, 100) == pytest.approx(2.0)


def test_plan_steps():
    cfg = TrainConfig(time_budget=10.0)
    assert plan_steps(cfg, 0, 0.0, 0.5) == 20
    assert plan_steps(cfg, 0, 0.0, 0.3) == 33  # rounded: 10 / 0.3 = 33.3
    assert plan_steps(cfg, 7, 4.0, 2.0) == 10  # 7 done, 6 s left
    assert plan_steps(cfg, 7, 9.9, 2.0) == 8  # a step more while time is left
    assert plan_steps(cfg, 7, 10.0, 2.0) == 7 and plan_steps(cfg, 7, 12.0, 2.0) == 7  # none left
    assert plan_steps(TrainConfig(time_budget=10.0, steps=15), 0, 0.0, 0.5) == 15  # steps cap it


def _record_optimizer(monkeypatch, on_step=None):
    """Makes train() record its optimizer (a list, one per run) and call
    on_step(optimizer) just before each optimizer step (after gradient clipping)."""
    import tokcore.pooling.train as train_module

    made = []
    real = train_module._make_optimizer

    def make(model, cfg):
        opt = real(model, cfg)
        if on_step is not None:
            opt.register_step_pre_hook(lambda o, args, kwargs: on_step(o))
        made.append(opt)
        return opt

    monkeypatch.setattr(train_module, "_make_optimizer", make)
    return made


def _fake_clock(monkeypatch, step_seconds):
    """Makes train()'s perf_counter a clock under which step i (counting the timing's
    steps) takes step_seconds(i) seconds: perf_counter is called at each step's start
    and end."""
    import tokcore.pooling.train as train_module

    state = {"now": 0.0, "calls": 0}

    def perf_counter():
        if state["calls"] % 2:  # a step's end
            state["now"] += step_seconds(state["calls"] // 2)
        state["calls"] += 1
        return state["now"]

    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=perf_counter))


def _record_lrs(monkeypatch):
    """The LRs of each optimizer that train() makes, per step, in order of making."""
    lrs = {}
    made = _record_optimizer(monkeypatch, lambda o: lrs.setdefault(id(o), []).append([g["lr"] for g in o.param_groups]))
    return lambda: [lrs.get(id(o), []) for o in made]


def test_ctrl_c_while_timing_steps_says_nothing_new_is_saved(corpus_dir, monkeypatch):
    # Ctrl-C before the first training step used to end with no word of what was kept
    import tokcore.pooling.train as train_module

    calls = []

    def interrupted_step(timer):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module._StepTimer, "step", interrupted_step)
    logs = []
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(corpus_dir, steps=None, time_budget=5.0), log=logs.append)
    assert logs[-1] == "interrupted while timing steps, before training step 1: no new step to save"


def test_timing_stops_early_when_the_steps_cap_binds(corpus_dir, monkeypatch):
    # steps=3 in a 1000 s budget at 1 s a step: the cap is the plan, so the timing stops
    # at its minimum (5 steps), not after 2% of the budget (20 s) or 50 steps
    _fake_clock(monkeypatch, lambda i: 1.0)
    lrs = _record_lrs(monkeypatch)
    logs = []
    r = train(_cfg(corpus_dir, steps=3, time_budget=1000.0), log=logs.append)
    assert r["steps"] == 3 and "planned 3 steps for the 1000s budget (1s per step, the median of 5 timed steps)" in logs
    assert len(lrs()[1]) == 6  # the timing's optimizer: one untimed step, then 5 timed ones
    # a cap that may not bind (160 steps of 1 s, not twice within 300 s): timed as before,
    # until 2% of the budget (6 s)
    from tokcore.pooling.train import _StepTimer

    timer = _StepTimer.__new__(_StepTimer)  # (its done() alone: no model to time)
    timer.cfg, timer.steps_left, timer.budget_left = TrainConfig(time_budget=300.0, steps=160), 160, 300.0
    for timed, done in ((5, False), (6, True)):
        timer.times = [1.0] * timed
        assert timer.done() == done, timed
    timer.steps_left = 150  # 2 x 150 s fits: the cap binds
    timer.times = [1.0] * 5
    assert timer.done()


def test_time_budget_run_is_the_run_of_its_planned_steps(corpus_dir, monkeypatch):
    # each step takes 1 s, so a 4 s budget plans 4 steps (5 are timed: 2% of 4 s is less);
    # the run is then, to the bit, the run of steps=4: the timing, on copies with a random
    # stream of its own, leaves the model, the optimizer and the run's streams (dropout's
    # too) as they were
    _fake_clock(monkeypatch, lambda i: 1.0)
    lrs = _record_lrs(monkeypatch)
    logs = []
    mc = dict(TINY_HIER, dropout=0.1)
    budgeted = train(_cfg(corpus_dir, steps=None, time_budget=4.0, warmup_steps=1, lr=1e-3, min_lr_ratio=0.1,
                          schedule="linear", model_config=mc), log=logs.append)
    assert budgeted["steps"] == budgeted["planned_steps"] == 4 and budgeted["train_time_s"] == pytest.approx(4.0)
    assert "planned 4 steps for the 4s budget (1s per step, the median of 5 timed steps)" in logs
    run_lrs, probe_lrs = lrs()  # the run's optimizer, then the timing's
    assert len(probe_lrs) == 6  # one untimed step, then the 5 timed ones
    expected = [1e-3 * (1 - 0.9 * step / 4) for step in range(4)]  # linear from 1e-3 towards 1e-4
    assert [row[0] for row in run_lrs] == pytest.approx(expected) and all(len(set(row)) == 1 for row in run_lrs)
    stepped = train(_cfg(corpus_dir, steps=4, warmup_steps=1, lr=1e-3, min_lr_ratio=0.1, schedule="linear",
                         model_config=mc), log=lambda s: None)
    assert lrs()[2] == run_lrs and stepped["planned_steps"] is None
    assert budgeted["heldout_bpb"] == stepped["heldout_bpb"] and budgeted["train_bpb_ema"] == stepped["train_bpb_ema"]
    for (name, a), b in zip(budgeted["_model"].state_dict().items(), stepped["_model"].state_dict().values()):
        assert torch.equal(a, b), name


def test_time_budget_run_stops_when_its_steps_run_slower_than_timed(corpus_dir, monkeypatch):
    # the timing's 6 steps take 1 s each, the run's 3 s: the 8 planned steps would take
    # 24 s, and the run stops at 1.25 x 8 s, after 4 steps (12 s)
    _fake_clock(monkeypatch, lambda i: 1.0 if i < 6 else 3.0)
    logs = []
    r = train(_cfg(corpus_dir, steps=None, time_budget=8.0), log=logs.append)
    assert r["steps"] == 4 and r["planned_steps"] == 8 and r["train_time_s"] == pytest.approx(12.0)
    assert "stopped at step 4 of the 8 planned: the steps ran slower than timed, and 12s is 1.25x the 8s budget" \
        in logs


def test_resumed_time_budget_run_keeps_its_plan_unless_the_budget_changed(corpus_dir, tmp_path, monkeypatch):
    _fake_clock(monkeypatch, lambda i: 1.0)
    lrs = _record_lrs(monkeypatch)
    out = tmp_path / "run"

    def run(budget, steps=None, **kw):
        logs = []
        r = train(_cfg(corpus_dir, out=str(out), steps=steps, time_budget=budget), log=logs.append, **kw)
        return r, [line for line in logs if line.startswith("planned")]

    r, planned = run(4.0)
    assert r["steps"] == 4 and planned == ["planned 4 steps for the 4s budget (1s per step, the median of 5 timed steps)"]
    # a longer budget: timed again, the 2 s left are 2 more steps
    r, planned = run(6.0, resume=True)
    assert r["steps"] == 6 and planned == ["planned 6 steps for the 6s budget (1s per step, the median of 5 timed steps)"]
    # the same budget: the plan holds, here one made longer by hand, and nothing is timed
    path = out / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    assert ckpt["state"]["counters"]["planned_steps"] == 6 and ckpt["state"]["counters"]["plan_budget"] == [6.0, None]
    ckpt["state"]["counters"]["planned_steps"] = 8
    torch.save(ckpt, path)
    made_before = len(lrs())
    r, planned = run(6.0, resume=True)
    assert r["steps"] == 8 and planned == [] and len(lrs()) == made_before + 1  # the run's optimizer only
    # a budget that is spent plans no more steps; a step cap changes the plan too
    r, planned = run(6.0, steps=9, resume=True)
    assert r["steps"] == 8 and planned == ["planned 8 steps for the 6s budget (the budget is spent)"]
    # a checkpoint from before plans (no planned_steps) gets one
    ckpt = load_checkpoint(path)
    for k in ("planned_steps", "plan_budget"):
        del ckpt["state"]["counters"][k]
    torch.save(ckpt, path)
    r, planned = run(10.0, resume=True)
    assert r["steps"] == 10 and planned == ["planned 10 steps for the 10s budget (1s per step, the median of 5 timed steps)"]


def test_grad_clip_clips_the_gradient_norm(corpus_dir, monkeypatch):
    def total_norm(opt):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    norms = {}
    runs = []
    _record_optimizer(monkeypatch, lambda o: runs[-1].append(total_norm(o)))
    for clip in (0.0, 1e-3):  # 0: no clipping
        runs.append([])
        train(_cfg(corpus_dir, steps=2, grad_clip=clip), log=lambda s: None)
        norms[clip] = runs[-1]
    assert len(norms[0.0]) == len(norms[1e-3]) == 2
    assert min(norms[0.0]) > 0.01  # unclipped, the norm is far above the clip
    assert norms[1e-3] == pytest.approx([1e-3, 1e-3], rel=1e-3)


def _linear_output_dtypes():
    """Records (module.training, output dtype) of every nn.Linear's forward until closed."""
    seen: list[tuple[bool, torch.dtype]] = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Linear):
            seen.append((module.training, output.dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    return seen, handle


@pytest.mark.parametrize("kind,mc", [("hier", TINY_HIER), ("hier", {**TINY_HIER, "pool": "attention"}),
                                     ("byte", TINY_BYTE)])
def test_bf16_precision_trains_in_bf16_and_keeps_fp32_weights_and_evaluation(corpus_dir, monkeypatch, kind, mc):
    # bf16: the training steps' linear layers compute in bf16 (autocast), while weights,
    # gradients and optimizer state stay fp32 and the held-out evaluation runs in fp32;
    # the run stays close to the fp32 one (same seed, batches and initial weights)
    made = _record_optimizer(monkeypatch)
    reports = {}
    for precision in ("fp32", "bf16"):
        seen, handle = _linear_output_dtypes()
        try:
            reports[precision] = train(_cfg(corpus_dir, model=kind, model_config=dict(mc), steps=3,
                                            precision=precision), log=lambda s: None)
        finally:
            handle.remove()
        step_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        assert {d for training, d in seen if training} == {step_dtype}
        assert {d for training, d in seen if not training} == {torch.float32}  # evaluation
    r = reports["bf16"]
    model, opt = r["_model"], made[-1]
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    assert {v.dtype for st in opt.state.values() for v in st.values() if v.is_floating_point()} == {torch.float32}
    assert r["precision"] == "bf16" and "cpu (bf16)" in format_report(r)
    assert r["heldout_bpb"] == pytest.approx(reports["fp32"]["heldout_bpb"], rel=0.02)
    # the report's score is the fp32 evaluation of the final model
    corpus = load_corpus(str(corpus_dir), 20)
    assert evaluate(model, heldout_windows(corpus.heldout, 4, 64), 16)["bpb"] == r["heldout_bpb"]


def test_precision_is_checked(corpus_dir, monkeypatch):
    with pytest.raises(UsageError, match=r"unknown precision 'fp16'; choose from \['fp32', 'bf16'\]"):
        train(_cfg(corpus_dir, precision="fp16"), log=lambda s: None)
    check_precision("bf16", torch.device("cpu"))  # autocast runs on every CPU (fast with AVX512-BF16 or AMX)
    # a GPU older than sm_80 is refused, with its compute capability
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(UsageError, match=r"precision 'bf16' needs a GPU with bfloat16 support .*\(7, 5\)"):
        check_precision("bf16", torch.device("cuda"))
    check_precision("fp32", torch.device("cuda"))


def test_bf16_training_step_on_cuda_is_close_to_fp32(cuda_device):
    # the GPU path of bf16: autocast on CUDA around the tokcore ops (bf16 features into
    # segment_reduce / segment_expand / pack and back), close to the fp32 step
    from tokcore.pooling.train import _autocast

    for kind, mc in (("hier", TINY_HIER), ("hier", {**TINY_HIER, "pool": "attention"}), ("byte", TINY_BYTE)):
        model = build_model(kind, mc).to(cuda_device)
        b, cu = _batch([TEXT[:150], TEXT[150:], b""])
        losses = {}
        for precision in ("fp32", "bf16"):
            model.zero_grad()
            with _autocast(TrainConfig(precision=precision), torch.device(cuda_device)):
                out = model(b.to(cuda_device), cu.to(cuda_device))
            out["loss"].backward()
            losses[precision] = float(out["loss"])
            assert all(p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all())
                       for p in model.parameters())
        assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02), (kind, losses)


@pytest.mark.parametrize("kind,mc", [("hier", TINY_HIER), ("byte", TINY_BYTE)])
def test_weight_decay_applies_to_linear_weights_only(corpus_dir, monkeypatch, kind, mc):
    # decayed: the weight matrices of linear layers; not decayed: embeddings, norms,
    # biases and the learned start state
    made = _record_optimizer(monkeypatch)
    r = train(_cfg(corpus_dir, model=kind, model_config=dict(mc), steps=1, weight_decay=0.05), log=lambda s: None)
    model, (opt,) = r["_model"], made
    name_of = {id(p): n for n, p in model.named_parameters()}
    decay_of = [(name_of[id(p)], g["weight_decay"]) for g in opt.param_groups for p in g["params"]]
    linear_weights = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    assert sorted(n for n, _ in decay_of) == sorted(name_of.values())  # each parameter in one group
    assert dict(decay_of) == {n: 0.05 if n in linear_weights else 0.0 for n in name_of.values()}


def test_train_report_and_resume(corpus_dir, tmp_path):
    out = tmp_path / "run"
    r = train(_cfg(corpus_dir, out=str(out)), log=lambda s: None)
    model = r.pop("_model")
    assert r["steps"] == 4 and np.isfinite(r["heldout_bpb"]) and r["bytes_per_s"] > 0 and r["words_per_s"] > 0
    assert r["params"] == count_parameters(model) and 1 < r["backbone_seq_len"] < 64
    assert "held-out bits/byte" in format_report(r)
    assert json.loads((out / "report.json").read_text())["steps"] == 4
    # checkpoint round trip: same outputs
    loaded = load_model(out, "cpu")
    b, cu = _batch([TEXT[:80]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(b, cu)["nll"], model(b, cu)["nll"])
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["kind"] == "hier" and ckpt["state"]["counters"]["step"] == 4
    # resume to 6 steps in total
    r2 = train(_cfg(corpus_dir, out=str(out), steps=6), resume=True, log=lambda s: None)
    assert r2["steps"] == 6 and r2["train_bytes"] == 6 * 4 * 64


def test_train_refuses_to_replace_a_run_unless_told(corpus_dir, tmp_path):
    # a second train() into the same folder would silently replace the first run's
    # checkpoint and report; it raises before any work unless resume or overwrite says so
    out = tmp_path / "run"
    train(_cfg(corpus_dir, out=str(out), steps=1), log=lambda s: None)
    first = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(UsageError, match=r"already holds a run \(checkpoint.pt\); pass resume=True .* overwrite=True"):
        train(_cfg(corpus_dir, out=str(out), steps=1, seed=1), log=lambda s: None)
    assert (out / "checkpoint.pt").read_bytes() == first
    with pytest.raises(UsageError, match="resume and overwrite exclude each other"):
        train(_cfg(corpus_dir, out=str(out), steps=2), resume=True, overwrite=True, log=lambda s: None)
    r = train(_cfg(corpus_dir, out=str(out), steps=1, seed=1), overwrite=True, log=lambda s: None)
    assert r["steps"] == 1 and (out / "checkpoint.pt").read_bytes() != first
    # a folder without a checkpoint (say, one the user made) is no run
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train(_cfg(corpus_dir, out=str(empty), steps=1), log=lambda s: None)["steps"] == 1


def test_compare_refuses_to_replace_results_unless_told(corpus_dir, tmp_path):
    base = _cfg(corpus_dir, steps=1)
    out = tmp_path / "cmp"
    (out / "byte").mkdir(parents=True)
    (out / "byte" / "checkpoint.pt").write_bytes(b"a model's run of a compare that stopped early")
    with pytest.raises(UsageError, match=r"already holds the results of a compare \(byte/checkpoint.pt\)"):
        compare(base, out=out, log=lambda s: None)
    assert not (out / "hier").exists()  # refused before any training
    res = compare(base, out=out, log=lambda s: None, overwrite=True)
    assert [r["model"] for r in res["reports"]] == ["hier", "byte"]
    with pytest.raises(UsageError, match=r"\(compare.json\); pass overwrite=True"):
        compare(base, out=out, log=lambda s: None)
    # only the models asked for count
    assert compare(base, out=tmp_path / "hier_only", log=lambda s: None, models=("hier",))["reports"]


def test_resume_continues_the_training_curve(corpus_dir, tmp_path, monkeypatch):
    # a run of 4 steps, against the same run stopped after step 2 (checkpoint every step)
    # and resumed: same weights, so the same held-out score, and the same smoothed
    # training loss (its EMAs are saved with the counters)
    import tokcore.pooling.train as train_module

    whole = train(_cfg(corpus_dir), log=lambda s: None)
    out = tmp_path / "run"
    real_sample, calls = train_module.sample_batch, []

    def stop_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(train_module, "sample_batch", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(corpus_dir, out=str(out), save_every=0), log=lambda s: None)
    monkeypatch.setattr(train_module, "sample_batch", real_sample)
    resumed = train(_cfg(corpus_dir, out=str(out), save_every=0), resume=True, log=lambda s: None)
    assert resumed["steps"] == 4
    for key in ("train_bpb_ema", "train_loss_ema", "heldout_bpb"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-6), key


def test_training_sets_the_generation_context_to_its_window(corpus_dir):
    # positions past the training window were never trained: generation keeps to it
    for kind, mc in (("hier", TINY_HIER), ("byte", TINY_BYTE)):
        r = train(_cfg(corpus_dir, model=kind, model_config=dict(mc), seq_len=48, steps=1), log=lambda s: None)
        assert r["_model"].config.max_context_bytes == 48 and r["model_config"]["max_context_bytes"] == 48
    r = train(_cfg(corpus_dir, model_config=dict(TINY_HIER, max_context_bytes=100), steps=1), log=lambda s: None)
    assert r["_model"].config.max_context_bytes == 100  # unless asked otherwise


def test_generation_context_stays_within_max_context_bytes(monkeypatch):
    model = ByteLM(ByteLMConfig(**TINY_BYTE, max_context_bytes=16))
    seen = []
    real = model.logits
    monkeypatch.setattr(model, "logits", lambda b, cu, n=None, **kw: (seen.append(b.numel()), real(b, cu, n, **kw))[1])
    model.generate(b"x" * 100, max_new_bytes=3, temperature=0, use_cache=False)  # cached: test_generation.py
    assert seen == [16, 16, 16]  # 15 bytes of context + the slot that predicts the next byte
    hier = HierarchicalByteLM(HierConfig(**TINY_HIER, max_context_bytes=20))
    lengths = []
    real_states = hier.word_states
    monkeypatch.setattr(hier, "word_states", lambda b, *a, **kw: (lengths.append(b.numel()), real_states(b, *a, **kw))[1])
    hier.generate(b"ab cd ef gh ij kl mn op qr st uv wx yz " * 3, max_new_bytes=4, temperature=0, use_cache=False)
    assert lengths and max(lengths) <= 19


def test_generated_text_splits_into_the_generated_words():
    # An untrained decoder puts mass on every byte; masking keeps generation to words
    # that word_boundaries would make of the text, as the model saw in training.
    model = HierarchicalByteLM(HierConfig(**TINY_HIER)).eval()  # max_word_bytes 8
    prompts = [b"", b"def f(x):", b"hello wor", b"abcdefghijklmno", "caf\u00e9 na\u00efve".encode(), b"a, ",
               b"\xe2\x82\xac" * 4]
    for seed, prompt in enumerate(prompts):
        g = torch.Generator().manual_seed(seed)
        words, out = model._generate_words(prompt, 120, 1.0, None, g)
        text = prompt + out
        assert b"".join(words) == text and len(out) == 120
        starts = ref_split_words(text, 8)
        assert [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])] == words, (prompt, text)
    assert model._generate_words(b"ab cd", 0, 1.0, None, None) == ([b"ab", b" cd"], b"")
    # a decoder fond of whitespace and of ending words: no byte may start a word after
    # whitespace, so a word cannot end there (else nothing could follow: NaN sampling)
    with torch.no_grad():
        model.head.bias[[ord(" "), ord("\n"), EOW]] += 3.0
    for seed in range(5):
        words, out = model._generate_words(b"x = 1", 80, 0.7, 20, torch.Generator().manual_seed(seed))
        text = b"x = 1" + out
        starts = ref_split_words(text, 8)
        assert [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])] == words


def test_generate_rejects_bad_arguments_and_restores_train_mode(monkeypatch):
    import tokcore.pooling.lm as lm

    for model in (ByteLM(ByteLMConfig(**TINY_BYTE)), HierarchicalByteLM(HierConfig(**TINY_HIER))):
        model.train()
        for kwargs, name in ((dict(max_new_bytes=-1), "max_new_bytes"), (dict(temperature=float("nan")), "temperature"),
                             (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k")):
            with pytest.raises(ValueError, match=name):
                model.generate(b"ab", **{"max_new_bytes": 3, **kwargs})
            assert model.training
    # an error in the middle of generating (here from sampling) leaves train mode as it was
    def failing_sample(*args):
        raise RuntimeError("sampling failed")

    monkeypatch.setattr(lm, "_sample", failing_sample)
    for model in (ByteLM(ByteLMConfig(**TINY_BYTE)), HierarchicalByteLM(HierConfig(**TINY_HIER))):
        model.train()
        with pytest.raises(RuntimeError, match="sampling failed"):
            model.generate(b"ab", max_new_bytes=3)
        assert model.training


def _old_sample(logits, temperature, top_k, generator):
    """_sample as it was before tiny and huge temperatures worked: ordinary ones must
    still draw the very same symbols."""
    logits = logits.float()
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def test_sampling_at_ordinary_temperatures_is_unchanged():
    from tokcore.pooling.lm import _sample

    g = torch.Generator().manual_seed(7)
    for i in range(60):
        logits = torch.randn(257, generator=g) * 3
        if i % 2:
            logits[torch.rand(257, generator=g) < 0.5] = float("-inf")  # the hierarchical model's masks
        for t, k in ((0.8, 40), (1.0, None), (0.3, 10), (5.0, 1), (1e-20, None), (1e30, 7), (3e38, 5), (0.0, None)):
            seed = int(torch.randint(0, 2**31, (1,), generator=g))
            new = _sample(logits, t, k, torch.Generator().manual_seed(seed))
            assert new == _old_sample(logits, t, k, torch.Generator().manual_seed(seed)), (i, t, k)


@pytest.mark.parametrize("kind", ["hier", "byte"])
def test_generate_takes_any_finite_temperature(kind):
    # logits / temperature in float32 overflowed: a tiny temperature (inf - inf) or a
    # huge one (-inf / inf, with the hierarchical model's masked logits) made softmax
    # NaN, and multinomial raised; 10**400 made the argument check raise OverflowError
    torch.manual_seed(0)
    model = HierarchicalByteLM(HierConfig(**TINY_HIER)) if kind == "hier" else ByteLM(ByteLMConfig(**TINY_BYTE))
    greedy = model.generate(b"def f(x):", 24, temperature=0)
    for t in (1e-45, 1e-300, 5e-324, 1e-38):  # towards 0: greedy, as at 0
        for k in (None, 3):
            assert model.generate(b"def f(x):", 24, t, k, torch.Generator().manual_seed(0)) == greedy, (t, k)
    for t in (3.5e38, 1e300, sys.float_info.max, 10**400):  # huge: uniform over the allowed symbols
        for k in (None, 3):
            out = model.generate(b"def f(x):", 24, t, k, torch.Generator().manual_seed(0))
            assert len(out) == 24, (t, k)


def test_sampling_at_a_huge_temperature_is_uniform_over_the_allowed_symbols():
    from tokcore.pooling.lm import _sample

    logits = torch.arange(257, dtype=torch.float32)
    logits[[256, 250, 3]] = float("-inf")  # masked: never drawn
    g = torch.Generator().manual_seed(0)
    for t in (3.5e38, 10**400):
        drawn = {_sample(logits, t, None, g) for _ in range(3000)}
        assert drawn <= set(range(257)) - {256, 250, 3} and len(drawn) > 240, t
        # within top_k: used to be every symbol (scaled to 0, all tied with the k-th)
        assert {_sample(logits, t, 4, g) for _ in range(200)} == {255, 254, 253, 252}, t
    assert _sample(logits, 1e-45, 4, g) == 255  # greedy


def _checked_before(offsets: torch.Tensor, checked: list[torch.Tensor]) -> bool:
    """offsets equal offsets checked earlier, or derive from them as the decoder's
    stream offsets do (word_offsets[w] + w: valid whenever word_offsets are)."""
    for c in checked:
        if offsets.shape == c.shape and (torch.equal(offsets, c) or
                                         torch.equal(offsets - torch.arange(c.numel()), c)):
            return True
    return False


@pytest.fixture
def offsets_checks(recorded_pooling_ops, monkeypatch):
    """recorded_pooling_ops, with each Python check of offsets (check_segment_offsets,
    which check_word_lengths calls too) recorded among the ops' calls, as a check, in
    call order: a check either way (on CUDA each is a host sync)."""
    import tokcore.pooling.lm as lm
    real = modules.check_segment_offsets

    def checked(offsets, *args, **kwargs):
        recorded_pooling_ops.calls.append(("check_segment_offsets", offsets.detach().cpu().clone(), True))
        return real(offsets, *args, **kwargs)

    monkeypatch.setattr(modules, "check_segment_offsets", checked)
    monkeypatch.setattr(lm, "check_segment_offsets", checked)
    return recorded_pooling_ops


def _checks_of(calls, offsets: torch.Tensor) -> int:
    """How many times `offsets` were checked: by check_segment_offsets or by an op called
    with check_offsets=True (word_boundaries checks its cu_seqlens)."""
    return sum(check and torch.equal(o, offsets) for _, o, check in calls)


def _assert_unchecked_uses_were_checked_before(calls, made: list[torch.Tensor]) -> None:
    checked = list(made)  # word_boundaries' outputs: valid by construction
    for name, offsets, check in calls:
        if name == "word_boundaries":
            continue  # checks its cu_seqlens itself; its outputs are in made
        if check:
            checked.append(offsets)
        else:
            assert _checked_before(offsets, checked), (name, offsets)


@pytest.mark.parametrize("kind,pool,entry", [
    ("hier", "mean", "forward"), ("hier", "attention", "forward"), ("hier", "mean", "forward_words"),
    ("hier", "attention", "forward_words"), ("hier", "mean", "no_local_layers"), ("hier", "mean", "word_states"),
    ("hier", "attention", "word_states_no_local_layers"), ("byte", None, "forward"),
    ("byte", None, "logits")])  # the byte model has no words
def test_models_check_offsets_once_then_reuse_the_check(kind, pool, entry, offsets_checks):
    # On CUDA each offsets check is a host sync. A model checks each offsets tensor it
    # is given once (its first use, or in Python where it reads the longest segment);
    # later ops on the same offsets, on offsets derived from them, or on offsets that
    # word_boundaries made skip the check. Session 5: 18 checks per forward of the
    # small hierarchical model, 10 of the byte model; then the offsets that a Python
    # check had read were checked again by the first op (twice each).
    config = asdict(resolve_model_config(kind, "small"))
    if pool:
        config["pool"] = pool
    if "no_local_layers" in entry:
        config["n_enc_layers"] = 0  # the pooling is the encoder's first use of word_offsets
    model = build_model(kind, config)
    data = b"def f(x):\n    return x + 1  # ok\n" * 6
    b, cu = pack_sequences([data[:100], data[100:]])
    words = word_boundaries(b, cu, model.config.max_word_bytes, "space") if kind == "hier" else None
    calls = offsets_checks.calls
    calls.clear()
    offsets_checks.made_offsets.clear()  # the caller's words: the model must check them
    if entry == "forward":
        model(b, cu)
    elif entry == "logits":
        model.logits(b, cu)
    elif entry.startswith("word_states"):
        model.word_states(b, *words)
    else:
        model.forward_words(b, *words)
    _assert_unchecked_uses_were_checked_before(calls, offsets_checks.made_offsets)
    if kind == "byte":
        given = {"cu_seqlens": (cu, 1)}
    elif entry == "forward":  # word_boundaries checks cu_seqlens and makes valid words: nothing else checks
        word_offsets, word_cu = offsets_checks.made_offsets
        given = {"cu_seqlens": (cu, 1), "word_offsets": (word_offsets, 0), "word_cu_seqlens": (word_cu, 0)}
    else:  # the caller's words: word_offsets and word_cu_seqlens once each
        given = {"word_offsets": (words[0], 1), "word_cu_seqlens": (words[1], 1)}
    assert {name: _checks_of(calls, t) for name, (t, _) in given.items()} == \
        {name: n for name, (_, n) in given.items()}
    assert sum(check for _, _, check in calls) == sum(n for _, n in given.values())  # and no other checks


@pytest.mark.parametrize("rows,lengths", [(64, (32, 32)), (40, (3, 5, 2, 30))])  # packs, or rotates first
@pytest.mark.parametrize("max_len,check_max_len", [(None, True), (40, True), (None, False), (40, False)])
def test_segment_transformer_checks_its_offsets_once(rows, lengths, max_len, check_max_len, offsets_checks):
    st = SegmentTransformer(16, 2, 2, causal=True)
    x, off = torch.randn(rows, 16), torch.tensor([0, *np.cumsum(lengths)])
    assert modules.rotates_before_packing(rows, len(lengths), 40) == (len(lengths) == 4)
    offsets_checks.calls.clear()
    st(x, off, max_len, check_max_len=check_max_len)
    assert _checks_of(offsets_checks.calls, off) == 1
    _assert_unchecked_uses_were_checked_before(offsets_checks.calls, [])
    offsets_checks.calls.clear()
    st(x, off, max_len, check_offsets=False)  # vouched for: none
    assert _checks_of(offsets_checks.calls, off) == 0


def test_a_layer_with_nothing_to_attend_still_checks_its_offsets(offsets_checks):
    # no op runs in attention over an empty stream, and the later layers trust the first
    # layer's check: it used to check nothing (on CUDA no op checks them after it)
    st = SegmentTransformer(16, 2, 2, causal=False)
    x, off = torch.zeros(0, 16), torch.tensor([0, 0])
    assert st(x, off, 4, check_max_len=False).shape == (0, 16)
    assert _checks_of(offsets_checks.calls, off) == 1
    with pytest.raises(ValueError, match=r"SegmentAttention: offsets must end at 0 \(the number of rows\)"):
        st(x, torch.tensor([0, 3]), 4, check_max_len=False)


@pytest.mark.parametrize("n_layers", [0, 1])
@pytest.mark.parametrize("pool", ["mean", "attention"])
def test_encoder_checks_word_offsets_once(n_layers, pool, offsets_checks):
    enc = BytePoolingEncoder(16, n_layers, 2, max_word_bytes=8, pool=pool)
    b, cu = _batch([TEXT[:60], TEXT[60:90]])
    wo, _ = enc.segment(b, cu)
    for call in (enc, enc.encode):  # forward with the word lengths; encode by its first op
        offsets_checks.calls.clear()
        call(b, wo)
        assert _checks_of(offsets_checks.calls, wo) == 1, call
        _assert_unchecked_uses_were_checked_before(offsets_checks.calls, [])


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("kind", ["hier", "byte"])
def test_generation_checks_no_offsets(kind, use_cache, recorded_pooling_ops):
    # generation builds every offsets tensor itself; on CUDA each check would be a
    # host sync per generated byte
    model = build_model(kind, asdict(resolve_model_config(kind, "tiny")))
    out = model.generate(b"def f(x):\n    return", 12, generator=torch.Generator().manual_seed(0), use_cache=use_cache)
    assert len(out) == 12
    segment_calls = [c for c in recorded_pooling_ops.calls if c[0] != "word_boundaries"]
    # the cached byte LM runs no segment op at all (one sequence, no offsets)
    assert (segment_calls or (kind == "byte" and use_cache)) and not any(check for _, _, check in segment_calls)


def test_segment_transformer_max_len_shorter_than_a_segment_raises():
    # attention packs each segment into max_len positions: a shorter max_len would
    # drop rows silently, so it is refused (unless the caller vouches for it)
    st = SegmentTransformer(16, 1, 2, causal=True).eval()
    x, off = torch.randn(20, 16), torch.tensor([0, 11, 20])
    with pytest.raises(ValueError, match="max_len=3 is shorter than the longest segment \\(11 rows\\)"):
        st(x, off, 3)
    torch.testing.assert_close(st(x, off, 11), st(x, off))
    torch.testing.assert_close(st(x, off, 16), st(x, off))  # longer is fine (padding)
    st(x, off, 3, check_offsets=False)  # vouched for: no check, no sync on CUDA
    model = ByteLM(ByteLMConfig(**TINY_BYTE))
    b, cu = _batch([TEXT[:40], TEXT[40:60]])
    with pytest.raises(ValueError, match="max_len=8"):
        model.logits(b, cu, 8)


@pytest.mark.parametrize("entry", ["forward", "forward_words"])
def test_models_read_the_longest_segment_once_per_offsets(entry, monkeypatch):
    # each read of the longest segment is a host sync on CUDA: forward reads the
    # backbone's longest sequence of words; forward_words also checks the caller's
    # words (check_word_lengths), and the encoder's local layers trust that check.
    # The checks of the caller's offsets share these reads (check_segment_offsets).
    import tokcore.pooling.lm as lm
    import tokcore.pooling.modules as modules
    reads = []
    real, real_checked = modules.max_segment_length, modules.check_segment_offsets
    monkeypatch.setattr(modules, "max_segment_length", lambda off: (reads.append(off.numel()), real(off))[1])
    checked = lambda off, *a: (reads.append(off.numel()), real_checked(off, *a))[1]
    monkeypatch.setattr(modules, "check_segment_offsets", checked)
    monkeypatch.setattr(lm, "check_segment_offsets", checked)
    model = HierarchicalByteLM(HierConfig(**TINY_HIER))
    b, cu = _batch([TEXT[:60], TEXT[60:100]])
    if entry == "forward":
        model(b, cu)
    else:
        model.forward_words(b, *word_boundaries(b, cu, model.config.max_word_bytes, "space"))
    assert len(reads) == {"forward": 1, "forward_words": 2}[entry]


def test_words_longer_than_max_word_bytes_raise():
    model = HierarchicalByteLM(HierConfig(**TINY_HIER))  # max_word_bytes 8
    b = torch.tensor(list(b"abcdefghijklmnop"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="16 bytes, more than max_word_bytes=8"):
        model.forward_words(b, torch.tensor([0, 16]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="max_word_bytes"):
        model.encoder(b, torch.tensor([0, 16]))
    model.forward_words(b, torch.tensor([0, 8, 16]), torch.tensor([0, 2]))  # words of 8 bytes are fine


def test_encoder_compiles_with_its_word_length_check():
    # the check reads the longest word (data-dependent): skipped while tracing
    torch._dynamo.reset()
    enc = BytePoolingEncoder(16, 1, 2, max_word_bytes=8)
    b, cu = _batch([TEXT[:60]])
    wo, _ = enc.segment(b, cu)
    compiled = torch.compile(enc, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(b, wo), enc(b, wo))
    torch._dynamo.reset()


def test_inference_mode_first_then_training():
    # the rotary cache made under inference_mode must not poison later backward passes
    for model in (ByteLM(ByteLMConfig(**TINY_BYTE)), HierarchicalByteLM(HierConfig(**TINY_HIER))):
        b, cu = _batch([TEXT[:40]])
        with torch.inference_mode():
            model(b, cu)
        model(b, cu)["loss"].backward()


def test_empty_heldout_split_raises(tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_bytes(b"abcdefghijklmnopqr\n")  # 19 bytes: the last 1/20 is nothing
    with pytest.raises(cli.UsageError, match="held-out split .* is empty"):
        train(TrainConfig(model="hier", model_config=dict(TINY_HIER), data=str(f), seq_len=8, batch_size=2, steps=1,
                          progress=False, device="cpu"), log=lambda s: None)
    assert np.isnan(evaluate(ByteLM(ByteLMConfig(**TINY_BYTE)), [])["bpb"])  # nothing scored: no score


def test_save_load_byte_model(tmp_path):
    model = ByteLM(ByteLMConfig(**TINY_BYTE))
    save_checkpoint(tmp_path / "c.pt", model, None, {"counters": {}})
    loaded = load_model(tmp_path / "c.pt")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert asdict(loaded.config) == asdict(model.config)


def test_evaluate_bpb_is_code_length():
    model = HierarchicalByteLM(HierConfig(**TINY_HIER))
    windows = [np.frombuffer(TEXT[:64], np.uint8), np.frombuffer(TEXT[64:128], np.uint8)]
    ev = evaluate(model, windows, batch_size=1)
    b, cu = pack_sequences(windows)
    with torch.no_grad():
        out = model(b, cu)
    assert ev["bytes"] == 128
    assert ev["bpb"] == pytest.approx(out["nll"].item() / np.log(2) / 128, rel=1e-4)
    assert ev["bpb"] > 7  # untrained: about log2(257) bits per symbol, more than one symbol per byte


def test_compare_interrupted_keeps_each_models_run(corpus_dir, tmp_path, monkeypatch):
    # Ctrl-C in a compare: each model's steps so far are saved in its folder, where
    # `train --resume` can go on with it alone
    import os
    import signal

    import tokcore.pooling.train as train_module

    steps = []
    real_step = train_module._Run.step

    def step_then_interrupt(run):
        real_step(run)
        steps.append(run.cfg.model)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # held until the step is done, as in a terminal

    monkeypatch.setattr(train_module._Run, "step", step_then_interrupt)
    outside = signal.signal(signal.SIGINT, signal.default_int_handler)
    logs = []
    try:
        with pytest.raises(KeyboardInterrupt):
            compare(_cfg(corpus_dir, steps=50), out=tmp_path / "cmp", log=logs.append)
    finally:
        signal.signal(signal.SIGINT, outside)
    for kind in ("hier", "byte"):
        saved = load_checkpoint(tmp_path / "cmp" / kind)["state"]["counters"]["step"]
        assert saved == steps.count(kind) >= 1
        assert any(line.startswith(f"[{kind}] interrupted at step {saved}: saved in") for line in logs)


def test_compare_writes_table(corpus_dir, tmp_path):
    base = _cfg(corpus_dir, steps=2)
    res = compare(base, out=tmp_path / "cmp", log=lambda s: None)
    assert [r["model"] for r in res["reports"]] == ["hier", "byte"]
    # both models generate within the window they trained on
    assert [r["model_config"]["max_context_bytes"] for r in res["reports"]] == [base.seq_len] * 2
    assert (tmp_path / "cmp" / "compare.md").read_text().count("|") > 10
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["reports"][1]["model"] == "byte"
    assert "held-out bits/byte" in format_compare(res["reports"])
    # learning curves: one line per model (one point per step), one held-out dot each
    assert [len(r["curve"]) for r in data["reports"]] == [2, 2]
    assert "same steps" in (tmp_path / "cmp" / "compare.svg").read_text()  # the budget was steps
    svg = ET.fromstring((tmp_path / "cmp" / "compare.svg").read_text())
    ns = "{http://www.w3.org/2000/svg}"
    assert len(svg.findall(f"{ns}polyline")) == 2
    assert len(svg.findall(f"{ns}circle")) >= 2
    assert "compare.svg" in (tmp_path / "cmp" / "compare.md").read_text()


def test_compare_runs_take_turns_and_each_is_its_run_alone(corpus_dir, monkeypatch):
    # under a clock of 1 s a step, the models time their steps in turn (one untimed and 5
    # timed each), then train in turn; each model's result is, to the bit, its train()
    # alone with the same settings (dropout on, so torch's random stream counts too)
    import tokcore.pooling.train as train_module

    _fake_clock(monkeypatch, lambda i: 1.0)
    order = []
    real_step = train_module._train_step

    def step(model, opt, *args):
        order.append(model.kind)
        return real_step(model, opt, *args)

    monkeypatch.setattr(train_module, "_train_step", step)
    base = _cfg(corpus_dir, steps=None, time_budget=4.0, model_config=dict(TINY_HIER, dropout=0.1))
    logs = []
    reports = compare(base, log=logs.append)["reports"]
    assert order == ["hier", "byte"] * (6 + 4)
    assert [r["planned_steps"] for r in reports] == [4, 4]
    assert "[byte] planned 4 steps for the 4s budget (1s per step, the median of 5 timed steps)" in logs
    for r in reports:
        mc = dict(r["model_config"])
        alone = train(dataclasses.replace(base, model=r["model"], model_config=mc), log=lambda s: None)
        assert alone["model_config"] == mc and alone["steps"] == r["steps"] == 4
        assert alone["heldout_bpb"] == r["heldout_bpb"] and alone["train_bpb_ema"] == r["train_bpb_ema"], r["model"]


def test_compare_keeps_the_runs_level_while_one_steps_slower(corpus_dir, monkeypatch):
    # with the steps (given by count) taking turns by the fraction of the plan done, the
    # run with fewer planned steps waits for the other: hier 6 steps, byte 3 -> hier twice,
    # then byte once
    import tokcore.pooling.train as train_module

    order = []
    real_step = train_module._train_step
    monkeypatch.setattr(train_module, "_train_step",
                        lambda model, *args: order.append(model.kind) or real_step(model, *args))
    runs = [train_module._Run(_cfg(corpus_dir, model=kind, model_config=mc, steps=steps), None, False,
                              lambda s: None, False)
            for kind, mc, steps in (("hier", TINY_HIER, 6), ("byte", TINY_BYTE, 3))]
    train_module._take_turns(runs)
    assert order == ["hier", "byte", "hier", "hier", "byte", "hier", "hier", "byte", "hier"]
    assert [run.finish()["steps"] for run in runs] == [6, 3]


def test_line_chart_svg_scales_and_rejects_empty():
    svg = line_chart_svg({"a": [(0, 1.0), (10, 3.0)], "b": [(0, 2.0), (5, float("nan"))]},
                         points={"end": (10, 2.5)}, title="t <&>", x_label="x", y_label="y")
    root = ET.fromstring(svg)  # well-formed, title escaped
    ns = "{http://www.w3.org/2000/svg}"
    lines = root.findall(f"{ns}polyline")
    assert len(lines) == 2 and len(lines[1].get("points").split()) == 1  # the NaN point is dropped
    assert nice_ticks(0, 10) == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(2.3, 7.9)[0] <= 2.3 and nice_ticks(2.3, 7.9)[-1] >= 7.9
    with pytest.raises(ValueError, match="nothing to draw"):
        line_chart_svg({"a": []}, title="", x_label="", y_label="")


# ------------------------------------------------------------------------------ CLI and demo
def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in ("demo", "train", "compare", "generate"):
        assert name in text
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0
    assert cli.main([]) == 2


def test_cli_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "tokcore", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "train" in r.stdout


def test_cli_reports_bad_paths_without_a_traceback(tmp_path, capsys):
    # a user's mistake is one line on stderr and exit status 2
    missing = tmp_path / "missing"
    assert cli.main(["train", "--data", str(missing), "--steps", "1", "--no-progress"]) == 2
    assert f"tokcore train: error: --data: {missing} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["train", "--data", str(tmp_path / "empty"), "--steps", "1", "--no-progress"]) == 2
    assert "no readable text files" in capsys.readouterr().err
    assert cli.main(["generate", str(missing)]) == 2
    assert "tokcore generate: error: no checkpoint at" in capsys.readouterr().err
    # library callers still get the standard exception types
    with pytest.raises(FileNotFoundError):
        load_corpus(str(missing))
    with pytest.raises(ValueError):
        load_corpus(str(tmp_path / "empty"))


def test_cli_registry_rejects_duplicates():
    with pytest.raises(ValueError):
        cli.register("train", "again", lambda p: None, lambda a: 0)


def test_cli_train_and_generate(corpus_dir, tmp_path, capsys):
    out = tmp_path / "cli_run"
    argv = ["train", "--model", "hier", "--data", str(corpus_dir), "--steps", "3", "--seq-len", "64",
            "--batch-size", "2", "--eval-windows", "2", "--size", "tiny", "--d-model", "32", "--n-layers", "1",
            "--n-heads", "2", "--d-local", "16", "--no-progress", "--device", "cpu", "--out", str(out),
            "--sample", "10"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "held-out bits/byte" in text and "sample:" in text
    assert (out / "checkpoint.pt").exists()
    assert cli.main(["generate", str(out), "--prompt", "def ", "-n", "8", "--device", "cpu"]) == 0
    assert cli.main(argv[:-2] + ["--steps", "4", "--resume"]) == 0
    assert "steps                 4" in capsys.readouterr().out


def test_demo_registry(capsys):
    from tokcore.demo import DEMOS

    assert "pooling" in [d.name for d in DEMOS]
    assert cli.main(["demo", "--list"]) == 0
    assert "pooling" in capsys.readouterr().out


def test_word_boundaries_used_by_models_match_op():
    # the model's words are exactly word_boundaries(..., "space") and pool with segment_reduce
    model = HierarchicalByteLM(HierConfig(**TINY_HIER))
    b, cu = _batch([TEXT])
    wo, wcu = model.segment(b, cu)
    wo2, wcu2 = word_boundaries(b, cu, TINY_HIER["max_word_bytes"], "space")
    assert torch.equal(wo, wo2) and torch.equal(wcu, wcu2)
    lengths = segment_reduce(torch.ones(b.numel(), 1), wo, "sum").squeeze(1)
    assert int(lengths.max()) <= TINY_HIER["max_word_bytes"]


@pytest.mark.parametrize("kind,cfg", [("hier", TINY_HIER), ("byte", TINY_BYTE)])
def test_training_step_under_torch_compile(kind, cfg):
    # torch.compile(model) as users call it (graph breaks allowed: word_boundaries'
    # output size and the longest segment are read from the data): the loss and every
    # gradient of a training step match eager mode
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(kind, cfg)
    b, cu = _batch([TEXT, TEXT[:70], b"x = 1\n"])
    loss = model(b, cu)["loss"]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    compiled = torch.compile(model, backend="aot_eager")
    compiled_loss = compiled(b, cu)["loss"]
    compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    torch.testing.assert_close(compiled_loss, loss)
    for (name, _), g, cg in zip(model.named_parameters(), grads, compiled_grads):
        torch.testing.assert_close(cg, g, msg=lambda m, name=name: f"{name}: {m}")
    torch._dynamo.reset()

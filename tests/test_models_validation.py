"""The models check their arguments before they use them, and their errors name the
model's own arguments: offsets (word_offsets, cu_seqlens, word_cu_seqlens, max_words)
are checked before lengths are derived from them, constructors reject sizes that
cannot work, and generate rejects a prompt or top_k of the wrong type."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import tokcore  # noqa: F401  (loads the ops)
from tokcore.data import pack_sequences
from tokcore.pooling.lm import ByteLM, ByteLMConfig, HierarchicalByteLM, HierConfig
from tokcore.pooling.modules import BytePoolingEncoder, SegmentTransformer

from test_models import TINY_HIER  # (tests/ is on sys.path, as for reference/)

TINY_BYTE = dict(d_model=32, n_layers=1, n_heads=2)
TEXT = b"hello world, foo"  # 16 bytes; words at [0, 5, 12, 16]


def _bytes(text: bytes = TEXT) -> torch.Tensor:
    return torch.tensor(list(text), dtype=torch.uint8)


def _t(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


# ------------------------------------------------------------------------------ offsets
def test_encoder_checks_word_offsets_before_word_lengths():
    # decreasing offsets used to be reported as a word longer than max_word_bytes
    enc = BytePoolingEncoder(16, 1, 2, max_word_bytes=8)
    b = _bytes()[:10]
    with pytest.raises(ValueError, match=r"BytePoolingEncoder.forward: word_offsets must be non-decreasing, "
                                         r"but word_offsets\[1\] = -3 < word_offsets\[0\] = 0$"):
        enc(b, _t(0, -3, 10))
    with pytest.raises(ValueError, match=r"BytePoolingEncoder.forward: word_offsets must start at 0, "
                                         r"but word_offsets\[0\] = 1$"):
        enc(b, _t(1, 3, 10))
    with pytest.raises(ValueError, match=r"BytePoolingEncoder.forward: word_offsets must end at 10 \(the number "
                                         r"of bytes\), but its last entry is 8"):
        enc(b, _t(0, 3, 8))
    with pytest.raises(ValueError, match=r"BytePoolingEncoder.forward: word_offsets must be a 1-D int64"):
        enc(b, _t(0, 3, 10).int())
    with pytest.raises(ValueError, match="a word has 10 bytes, more than max_word_bytes=8"):
        enc(b, _t(0, 10))  # valid offsets: the word-length check still works
    assert enc(b, _t(0, 5, 10)).shape == (2, 16)


def test_byte_lm_names_cu_seqlens():
    # negative cu_seqlens used to come back as "segment_pack: max_len must be >= 0"
    model = ByteLM(ByteLMConfig(**TINY_BYTE))
    b = _bytes()
    with pytest.raises(ValueError, match=r"ByteLM.forward: cu_seqlens must be non-decreasing"):
        model(b, _t(0, -5))
    with pytest.raises(ValueError, match=r"ByteLM.forward: cu_seqlens must be non-decreasing, "
                                         r"but cu_seqlens\[2\] = 5 < cu_seqlens\[1\] = 10$"):
        model(b, _t(0, 10, 5, 16))
    with pytest.raises(ValueError, match=r"ByteLM.forward: cu_seqlens must start at 0"):
        model(b, _t(2, 16))
    with pytest.raises(ValueError, match=r"ByteLM.forward: cu_seqlens must end at 16 \(the number of bytes\)"):
        model(b, _t(0, 5))
    with pytest.raises(ValueError, match=r"ByteLM.logits: cu_seqlens must be non-decreasing"):
        model.logits(b, _t(0, 10, 5, 16))
    with pytest.raises(ValueError, match=r"ByteLM.logits: max_len=4 is shorter than the longest sequence \(8 bytes\)"):
        model.logits(b, _t(0, 8, 16), 4)
    assert model(b, _t(0, 8, 8, 16))["n_seqs"] == 3  # an empty sequence is fine


def test_hier_forward_words_names_its_offsets():
    model = HierarchicalByteLM(HierConfig(**TINY_HIER))
    b = _bytes()
    wo, wc = model.segment(b, _t(0, 16))
    assert wo.tolist() == [0, 5, 12, 16] and wc.tolist() == [0, 3]
    where = "HierarchicalByteLM.forward_words"
    with pytest.raises(ValueError, match=f"{where}: word_offsets must be non-decreasing, "
                                         r"but word_offsets\[2\] = 3 < word_offsets\[1\] = 5$"):
        model.forward_words(b, _t(0, 5, 3, 16), wc)  # used to read as a word of 13 bytes
    with pytest.raises(ValueError, match=f"{where}: word_offsets must end at 16"):
        model.forward_words(b, _t(0, 5, 12), _t(0, 2))
    with pytest.raises(ValueError, match=f"{where}: word_cu_seqlens must be non-decreasing"):
        model.forward_words(b, wo, _t(0, -1))  # used to be about segment_pack's max_len
    with pytest.raises(ValueError, match=f"{where}: word_cu_seqlens must end at 3 \\(the number of words"):
        model.forward_words(b, wo, _t(0, 1))  # used to be "segment_pack: offsets must end at 3"
    with pytest.raises(ValueError, match=f"{where}: word_cu_seqlens must start at 0"):
        model.forward_words(b, wo, _t(1, 3))
    with pytest.raises(ValueError, match=f"{where}: bytes must be a 1-D uint8 tensor"):
        model.forward_words(b.long(), wo, wc)
    assert model.forward_words(b, wo, _t(0, 1, 3))["n_seqs"] == 2


def test_hier_word_states_names_max_words():
    model = HierarchicalByteLM(HierConfig(**TINY_HIER))
    b = _bytes()
    wo, wc = model.segment(b, _t(0, 16))
    with pytest.raises(ValueError, match=r"HierarchicalByteLM.word_states: max_words=1 is shorter than the longest "
                                         r"sequence \(3 words\)"):
        model.word_states(b, wo, wc, max_words=1)
    with pytest.raises(ValueError, match=r"HierarchicalByteLM.word_states: word_cu_seqlens must end at 3"):
        model.word_states(b, wo, _t(0, 1))
    torch.testing.assert_close(model.word_states(b, wo, wc, max_words=3), model.word_states(b, wo, wc))
    model.word_states(b, wo, wc, max_words=1, check_offsets=False)  # vouched for: not checked


def test_segment_transformer_checks_its_offsets():
    st = SegmentTransformer(16, 1, 2, causal=True)
    x = torch.randn(10, 16)
    with pytest.raises(ValueError, match=r"SegmentTransformer: offsets must be non-decreasing"):
        st(x, _t(0, -5, 10))
    with pytest.raises(ValueError, match=r"SegmentTransformer: offsets must end at 10"):
        st(x, _t(0, 4))


def test_byte_lm_reads_its_offsets_once(monkeypatch):
    # one host read (a sync on CUDA) checks cu_seqlens and gives the longest sequence
    import tokcore.pooling.lm as lm
    import tokcore.pooling.modules as modules

    reads = []
    real, real_checked = modules.max_segment_length, modules.check_segment_offsets
    monkeypatch.setattr(modules, "max_segment_length", lambda off: (reads.append(1), real(off))[1])
    checked = lambda off, *a: (reads.append(1), real_checked(off, *a))[1]
    monkeypatch.setattr(modules, "check_segment_offsets", checked)
    monkeypatch.setattr(lm, "check_segment_offsets", checked)
    b, cu = pack_sequences([TEXT, TEXT[:5]])
    ByteLM(ByteLMConfig(**TINY_BYTE))(b, cu)
    assert len(reads) == 1


# ------------------------------------------------------------------------------ constructors
@pytest.mark.parametrize("make, needles", [
    # attention pooling splits d_model into heads even with no local layer: used to fail at forward time
    (lambda: BytePoolingEncoder(10, 0, 4, pool="attention"), ["d_model=10", "n_heads=4"]),
    (lambda: BytePoolingEncoder(16, 1, 0), ["n_heads"]),
    (lambda: BytePoolingEncoder(0, 1, 2), ["d_model"]),
    (lambda: BytePoolingEncoder(16, -1, 2), ["n_layers"]),
    (lambda: BytePoolingEncoder(16, 1, 2, d_out=0), ["d_out"]),
    (lambda: BytePoolingEncoder(12, 1, 4), ["d_model=12", "n_heads=4", "even"]),  # rotary: 3 per head
    (lambda: SegmentTransformer(16, 1, 2, causal=True, mlp_ratio=0), ["mlp_ratio"]),
    (lambda: SegmentTransformer(16, 1, 2, causal=True, dropout=1.5), ["dropout"]),
    (lambda: HierarchicalByteLM(HierConfig(**{**TINY_HIER, "n_heads": 0})), ["HierarchicalByteLM", "n_heads"]),
    (lambda: HierarchicalByteLM(HierConfig(**{**TINY_HIER, "d_model": 0})), ["HierarchicalByteLM", "d_model"]),
    (lambda: HierarchicalByteLM(HierConfig(**{**TINY_HIER, "d_model": 30})), ["d_model=30", "n_heads=2"]),
    (lambda: HierarchicalByteLM(HierConfig(**{**TINY_HIER, "d_local": 12, "n_local_heads": 5})),
     ["d_local=12", "n_local_heads=5"]),
    (lambda: HierarchicalByteLM(HierConfig(**{**TINY_HIER, "n_local_heads": 0})), ["n_local_heads"]),
    (lambda: HierarchicalByteLM(HierConfig(**{**TINY_HIER, "n_dec_layers": -1})), ["n_dec_layers"]),
    (lambda: HierarchicalByteLM(HierConfig(**{**TINY_HIER, "max_context_bytes": 0})), ["max_context_bytes"]),
    (lambda: HierarchicalByteLM(HierConfig(**{**TINY_HIER, "d_model": 32.0})), ["d_model"]),
    (lambda: ByteLM(ByteLMConfig(**{**TINY_BYTE, "d_model": -2})), ["ByteLM", "d_model"]),
    (lambda: ByteLM(ByteLMConfig(**{**TINY_BYTE, "n_layers": -1})), ["ByteLM", "n_layers"]),
    (lambda: ByteLM(ByteLMConfig(**{**TINY_BYTE, "n_heads": 0})), ["ByteLM", "n_heads"]),
    (lambda: ByteLM(ByteLMConfig(**{**TINY_BYTE, "n_heads": 32})), ["d_model=32", "n_heads=32", "even"]),
])
def test_constructors_reject_sizes_that_cannot_work(make, needles):
    with pytest.raises(ValueError) as e:
        make()
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_constructors_accept_unused_heads():
    # heads of a stack with no layer are never used: any positive count will do
    BytePoolingEncoder(10, 0, 4, pool="mean")
    HierarchicalByteLM(HierConfig(**{**TINY_HIER, "n_layers": 0, "n_heads": 3}))
    ByteLM(ByteLMConfig(d_model=30, n_layers=0, n_heads=4))


# ------------------------------------------------------------------------------ generate
@pytest.mark.parametrize("kind", ["hier", "byte"])
def test_generate_rejects_prompts_and_top_k_of_the_wrong_type(kind):
    model = HierarchicalByteLM(HierConfig(**TINY_HIER)) if kind == "hier" else ByteLM(ByteLMConfig(**TINY_BYTE))
    for prompt in (5, [97, 98], None):  # ByteLM used to take 5 as five NUL bytes
        with pytest.raises(TypeError, match="prompt must be bytes, bytearray, memoryview or str"):
            model.generate(prompt, 3)
    for top_k in (2.5, True):  # used to fail inside torch.topk (or, for True, to mean 1)
        with pytest.raises(TypeError, match="top_k"):
            model.generate(b"ab", 3, top_k=top_k)
    with pytest.raises(TypeError, match="temperature"):
        model.generate(b"ab", 3, temperature="1")

    def gen(prompt):
        return model.generate(prompt, 4, 1.0, 3, generator=torch.Generator().manual_seed(1))

    expected = gen(b"ab")
    assert gen("ab") == gen(bytearray(b"ab")) == gen(memoryview(b"ab")) == expected
    assert model.generate(b"ab", 2, top_k=torch.tensor(3).numpy()[()]) is not None  # numpy ints are ints


# ------------------------------------------------------------------------------ training settings
@pytest.mark.parametrize("setting, rule", [
    (dict(steps=-1), "steps (--steps) must be an int >= 1"),
    (dict(steps=2.5), "steps (--steps) must be an int >= 1"),
    (dict(steps=10**400), "steps (--steps) must be an int >= 1 and <= 9.0072e+15"),
    (dict(steps=None, time_budget=float("nan")), "time_budget (--time-budget) must be a finite number in (0, 1e+09]"),
    (dict(time_budget=-5.0), "time_budget (--time-budget) must be a finite number"),
    (dict(time_budget=float("inf")), "time_budget (--time-budget) must be a finite number"),
    (dict(grad_clip=-1.0), "grad_clip (--grad-clip) must be a finite number in [0, inf)"),
    (dict(min_lr_ratio=5.0), "min_lr_ratio (--min-lr-ratio) must be a finite number in [0, 1]"),
    (dict(lr=0.0), "lr (--lr) must be a finite number in (0, inf)"),
    (dict(batch_size=0), "batch_size (--batch-size) must be an int >= 1"),
    (dict(seq_len=0), "seq_len (--seq-len) must be an int >= 1"),
    (dict(eval_batch_size=0), "eval_batch_size must be an int >= 1"),
    (dict(warmup_steps=-1), "warmup_steps (--warmup) must be an int >= 0"),
    (dict(seed=-1), "seed (--seed) must be an int >= 0"),
    (dict(beta2=1.0), "beta2 must be a finite number in [0, 1)"),
    (dict(schedule="step"), "schedule (--schedule) must be one of cosine, linear, constant"),
    (dict(count_words_mwb=2), "count_words_mwb must be an int >= 4"),
])
def test_train_refuses_settings_it_cannot_use(setting, rule, tmp_path):
    # the Python API is held to the command line's rules: these used to train 0 steps and
    # report an untrained model, climb the loss (a negative grad_clip turns gradients
    # around), or fail deep inside with a ZeroDivisionError or OverflowError
    from tokcore.data import Corpus
    from tokcore.errors import UsageError
    from tokcore.pooling.train import TrainConfig, train

    text = np.frombuffer(b"def f(x):\n    return x + 1\n" * 40, dtype=np.uint8)
    corpus = Corpus(train=text.copy(), heldout=text.copy(), source="test")
    cfg = TrainConfig(model="hier", size="tiny", seq_len=32, batch_size=2, eval_windows=2, progress=False, steps=2,
                      device="cpu")
    for key, value in setting.items():
        setattr(cfg, key, value)
    with pytest.raises(UsageError, match=re.escape(rule)):
        train(cfg, corpus, log=lambda line: None)


# ------------------------------------------------------------------------------ argument types
def test_model_inputs_of_the_wrong_kind_are_named():
    # were an AttributeError ('bytes' object has no attribute 'dtype'), a bare IndexError
    # of the embedding (int64 bytes past 255), or an offsets error naming the rows
    enc = BytePoolingEncoder(16, 1, 2, max_word_bytes=8)
    offsets = _t(0, 5, 12, 16)
    with pytest.raises(TypeError, match=r"^BytePoolingEncoder.forward: bytes must be a 1-D uint8 tensor, got bytes$"):
        enc(TEXT, offsets)
    with pytest.raises(ValueError, match=r"bytes must be a 1-D uint8 tensor, got torch.int64 \(16,\)$"):
        enc(_bytes().long() + 300, offsets)
    with pytest.raises(ValueError, match=r"bytes must be a 1-D uint8 tensor, got torch.uint8 \(1, 16\)$"):
        enc(_bytes()[None], offsets)
    with pytest.raises(TypeError, match=r"word_offsets must be an int64 tensor, got list$"):
        enc(_bytes(), [0, 5, 12, 16])
    for model in (ByteLM(ByteLMConfig(**TINY_BYTE)), HierarchicalByteLM(HierConfig(**TINY_HIER))):
        name = type(model).__name__
        with pytest.raises(TypeError, match=rf"^{name}.forward: bytes must be a 1-D uint8 tensor, got list$"):
            model(list(TEXT), _t(0, 16))
        with pytest.raises(TypeError, match=rf"^{name}.forward: cu_seqlens must be a 1-D int64 tensor \[B\+1\], "
                                            r"got NoneType$"):
            model(_bytes(), None)
    st = SegmentTransformer(16, 1, 2, causal=True)
    with pytest.raises(ValueError, match=r"^SegmentTransformer: x must be \[rows, d_model=16\], got \(1, 5, 16\)$"):
        st(torch.randn(1, 5, 16), _t(0, 5))
    with pytest.raises(ValueError, match=r"got \(5, 8\)$"):
        st(torch.randn(5, 8), _t(0, 5))
    with pytest.raises(TypeError, match=r"x must be a tensor \[rows, d_model=16\], got list$"):
        st([[0.0] * 16], _t(0, 1))


def test_constructor_arguments_of_the_wrong_type_are_named():
    # were a TypeError from a comparison ('<' not supported between str and int)
    with pytest.raises(ValueError, match=r"^max_word_bytes must be an int >= 4, got '8'$"):
        BytePoolingEncoder(16, 1, 2, max_word_bytes="8")
    with pytest.raises(ValueError, match=r"^max_word_bytes must be an int >= 4, got 3$"):
        BytePoolingEncoder(16, 1, 2, max_word_bytes=3)
    with pytest.raises(ValueError, match=r"^dropout must be in \[0, 1\], got '0.1'$"):
        SegmentTransformer(16, 1, 2, causal=True, dropout="0.1")

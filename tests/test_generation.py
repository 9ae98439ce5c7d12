"""Tests of cached generation: SegmentTransformer.extend (keys and values kept between
calls) and the models' generate(use_cache=True), against the uncached path that runs
the whole context again for each step."""

from __future__ import annotations

import pytest
import torch

import tokcore  # noqa: F401  (loads the ops)
from tokcore.pooling.lm import (BOS, ByteLM, ByteLMConfig, HierarchicalByteLM, HierConfig, NonFiniteLogitsError,
                                _CachedWordContext, _sample)
from tokcore.pooling.modules import DecodeCache, SegmentTransformer

TINY_HIER = dict(d_model=32, n_layers=2, n_heads=2, d_local=16, n_local_heads=2, n_enc_layers=1, n_dec_layers=2,
                 max_word_bytes=8)
TINY_BYTE = dict(d_model=32, n_layers=2, n_heads=2)
PROMPT = (b"def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n"
          b"        self.x = x  # Na\xc3\xafve caf\xc3\xa9\n")


# ------------------------------------------------------------------ SegmentTransformer.extend
@pytest.mark.parametrize("n_layers", [0, 1, 3])
@pytest.mark.parametrize("chunks", [[70], [1] * 20, [5, 1, 1, 30, 1, 2], [0, 3, 0, 4], [1] * 70 + [100]])
def test_extend_gives_the_rows_of_the_whole_sequence(n_layers, chunks, device):
    torch.manual_seed(n_layers)
    st = SegmentTransformer(32, n_layers, 4, causal=True).eval().to(device)
    x = torch.randn(sum(chunks), 32, device=device)
    with torch.no_grad():
        full = st(x, torch.tensor([0, x.shape[0]], device=device))
        cache = st.new_cache()
        parts, start = [], 0
        for n in chunks:
            parts.append(st.extend(x[start:start + n], cache))
            start += n
            assert cache.length == start
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_extend_in_other_dtypes(dtype):
    torch.manual_seed(0)
    st = SegmentTransformer(32, 2, 4, causal=True).eval().to(dtype)
    x = torch.randn(40, 32, dtype=dtype)
    with torch.no_grad():
        full = st(x, torch.tensor([0, 40]))
        cache = st.new_cache()
        inc = torch.cat([st.extend(x[:25], cache), *(st.extend(x[i:i + 1], cache) for i in range(25, 40))])
    assert inc.dtype == dtype
    # the two run their sums in another order: a few units in the last place of the
    # outputs (LayerNorm'd, about 1 in size), in f64 at rounding level
    tol = {torch.bfloat16: 4e-2, torch.float16: 5e-3, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(inc, full, rtol=tol, atol=tol)


def test_extend_is_only_for_causal_stacks_and_their_own_caches():
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="only causal attention"):
        SegmentTransformer(16, 1, 2, causal=False).extend(x, DecodeCache(1))
    st = SegmentTransformer(16, 2, 2, causal=True)
    with pytest.raises(ValueError, match="the cache has 3 layers, the stack 2"):
        st.extend(x, DecodeCache(3))
    with pytest.raises(ValueError, match=r"x must be \[n, d_model\], got \(1, 3, 16\)"):
        st.extend(x[None], st.new_cache())


def test_extend_keeps_every_layers_keys_and_values():
    st = SegmentTransformer(16, 2, 2, causal=True).eval()
    cache = st.new_cache()
    with torch.no_grad():
        st.extend(torch.randn(5, 16), cache)
        st.extend(torch.randn(1, 16), cache)
    assert cache.length == 6
    assert [tuple(k.shape) for k in cache.keys] == [(2, 6, 8)] * 2
    assert [tuple(v.shape) for v in cache.values] == [(2, 6, 8)] * 2


# ------------------------------------------------------------------ generate(use_cache=True)
def _models():
    torch.manual_seed(0)
    return [HierarchicalByteLM(HierConfig(**TINY_HIER, max_context_bytes=4096)),
            ByteLM(ByteLMConfig(**TINY_BYTE, max_context_bytes=4096))]


@pytest.mark.parametrize("prompt", [b"", b"x", PROMPT, PROMPT * 3])
def test_cached_generation_gives_the_uncached_bytes_within_the_context(prompt, device):
    for model in _models():
        model.to(device)
        for temperature, top_k, seed in ((0, None, 0), (1.0, None, 1), (0.8, 20, 2)):
            def run(use_cache):
                return model.generate(prompt, 90, temperature, top_k, torch.Generator().manual_seed(seed),
                                      use_cache=use_cache)
            cached = run(True)
            assert len(cached) == 90 or model.kind == "hier"
            assert cached == run(False), (model.kind, prompt[:10], temperature, top_k)


@pytest.mark.parametrize("pool", ["mean", "max", "attention"])
def test_cached_generation_gives_the_uncached_words(pool):
    torch.manual_seed(0)
    model = HierarchicalByteLM(HierConfig(**TINY_HIER, pool=pool)).eval()
    for seed, prompt in enumerate([b"", b"def f(x):", b"abcdefghijklmno", b"a, "]):
        def run(use_cache):
            return model._generate_words(prompt, 100, 1.0, None, torch.Generator().manual_seed(seed), use_cache)
        assert run(True) == run(False)


def _byte_contexts(prompt_len: int, n_new: int, n_ctx: int) -> list[int]:
    """How many bytes of context ByteLM's cached generation gives each new byte: the
    last n_ctx - 1 at first (BOS + those fill the n_ctx positions), one more for each
    new byte, and when all n_ctx positions are taken the last (n_ctx - 1) // 2."""
    contexts, positions, have = [], None, prompt_len
    for _ in range(n_new):
        if positions is None:
            k = min(n_ctx - 1, have)
        elif positions < n_ctx:
            k = contexts[-1] + 1
        else:
            k = min((n_ctx - 1) // 2, have)
        positions = k + 1
        contexts.append(k)
        have += 1
    return contexts


@pytest.mark.parametrize("n_ctx,prompt_len", [(16, 100), (16, 3), (9, 0), (2, 5), (1, 5)])
def test_cached_byte_generation_restarts_from_half_the_context(n_ctx, prompt_len):
    model = ByteLM(ByteLMConfig(**TINY_BYTE, max_context_bytes=n_ctx)).eval()
    prompt = PROMPT[:prompt_len]
    out = model.generate(prompt, 40, temperature=0)
    text = prompt + out
    contexts = _byte_contexts(prompt_len, 40, n_ctx)
    assert max(contexts) <= n_ctx - 1
    if n_ctx > 2 and prompt_len >= n_ctx:
        assert min(contexts) == (n_ctx - 1) // 2 and contexts.count(n_ctx - 1) > 1  # it did restart
    with torch.no_grad():
        for i, k in enumerate(contexts):
            at = prompt_len + i  # text[at] is the i-th new byte
            window = text[at - k:at] + b"\0"  # + a slot whose logits row predicts the next byte
            logits = model.logits(torch.tensor(list(window), dtype=torch.uint8), torch.tensor([0, k + 1]))
            assert int(logits[-1].argmax()) == text[at], (i, k)


@pytest.mark.parametrize("max_words,max_bytes", [(4, 1000), (1000, 21), (1, 1000), (3, 9), (1, 9), (2, 5)])
def test_cached_word_context_holds_the_last_words_that_fit(max_words, max_bytes):
    model = HierarchicalByteLM(HierConfig(**TINY_HIER, max_context_words=max_words,
                                          max_context_bytes=max_bytes)).eval()
    words = [b"def", b" add", b"(a,", b" b):", b"\n", b"   ", b" return", b" a", b" +", b" b"] * 2
    limit_words, limit_bytes = max_words, max_bytes - 1
    restarts = 0
    with torch.no_grad():
        context = _CachedWordContext(model, words[:2], torch.device("cpu"))
        for i in range(3, len(words) + 1):
            before = context.n_words
            context.add(words[:i])
            kept = words[i - context.n_words:i]
            assert context.n_words <= limit_words and context.n_bytes == sum(map(len, kept)) <= limit_bytes
            if context.n_words != before + 1:  # restarted: the last words that fit half the limits
                restarts += 1
                half = model._words_that_fit(words[:i], (limit_words + 1) // 2, (limit_bytes + 1) // 2)
                # and at least the last word, where it fits the whole limits
                assert kept == (half or model._words_that_fit(words[i - 1:i], limit_words, limit_bytes))
            # the state is the backbone's over exactly those words, as uncached generation makes it
            torch.testing.assert_close(context.state, model._context_state(kept, torch.device("cpu")),
                                       rtol=1e-5, atol=1e-5)
    assert restarts > 0


def test_cached_word_context_starts_empty_without_words():
    model = HierarchicalByteLM(HierConfig(**TINY_HIER)).eval()
    context = _CachedWordContext(model, [], torch.device("cpu"))
    assert context.n_words == 0 and context.state is model.start
    with torch.no_grad():
        context.add([b"x"])
    assert context.n_words == 1 and context.cache.length == 1


def test_cached_generation_stays_within_the_context(monkeypatch):
    model = ByteLM(ByteLMConfig(**TINY_BYTE, max_context_bytes=16))
    lengths = []
    real = model.blocks.extend
    monkeypatch.setattr(model.blocks, "extend", lambda x, cache: (real(x, cache), lengths.append(cache.length))[0])
    model.generate(b"x" * 100, max_new_bytes=30, temperature=0)
    assert max(lengths) == 16 and lengths[0] == 16 and 8 in lengths  # BOS + 15 bytes; restarts at BOS + 7
    hier = HierarchicalByteLM(HierConfig(**TINY_HIER, max_context_bytes=20, max_context_words=6))
    states = []
    real_add = _CachedWordContext.add
    monkeypatch.setattr(_CachedWordContext, "add", lambda self, w: (real_add(self, w), states.append(
        (self.n_words, self.n_bytes, self.cache.length)))[0])
    hier.generate(b"ab cd ef gh ij kl mn op qr st uv wx yz " * 3, max_new_bytes=60, temperature=1.0,
                  generator=torch.Generator().manual_seed(0))
    assert states and all(w <= 6 and b <= 19 and length == w for w, b, length in states)


def test_generate_checks_use_cache():
    for model in _models():
        with pytest.raises(TypeError, match="use_cache must be True or False, got 'yes'"):
            model.generate(b"ab", 3, use_cache="yes")


def test_byte_generation_starts_each_context_at_bos(monkeypatch):
    # the cached path feeds BOS, then the bytes, as the uncached logits() do; a
    # restart too starts at BOS
    model = ByteLM(ByteLMConfig(**TINY_BYTE, max_context_bytes=12)).eval()
    fed = []
    real_embed = model.embed.forward
    monkeypatch.setattr(model.embed, "forward", lambda inp: (fed.append(inp.tolist()), real_embed(inp))[1])
    out = model.generate(b"abcdefghij", 4, temperature=0)
    text = b"abcdefghij" + out
    # 11 positions; one more (12: full); a restart from the last (12 - 1) // 2 = 5 of the 12
    # bytes so far; one more
    assert fed == [[BOS, *b"abcdefghij"], [out[0]], [BOS, *text[7:12]], [out[2]]]


# ------------------------------------------------------------------ streaming (on_byte)
@pytest.mark.parametrize("use_cache", [True, False])
def test_on_byte_gets_each_new_byte_in_order(use_cache):
    for model in _models():
        seen = []
        out = model.generate(PROMPT, 40, 1.0, None, torch.Generator().manual_seed(0), use_cache=use_cache,
                             on_byte=seen.append)
        assert bytes(seen) == out and len(out) > 0
        assert model.generate(PROMPT, 0, on_byte=seen.append) == b"" and bytes(seen) == out  # none for none


def test_on_byte_must_be_callable():
    for model in _models():
        with pytest.raises(TypeError, match="on_byte must be None or a callable, got int"):
            model.generate(b"ab", 3, on_byte=5)


# ------------------------------------------------------------------ non-finite logits
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generating_from_non_finite_logits_raises(bad, use_cache):
    # a diverged checkpoint: greedy printed byte 0 (argmax of NaN), sampling raised
    # torch's own multinomial error
    for model in _models():
        with torch.no_grad():
            model.head.bias[3] = bad  # one symbol: the max is NaN (or inf) all the same
        model.train()
        for temperature, top_k in ((0, None), (1.0, None), (0.8, 5), (1e-45, None), (1e300, 3)):
            seen = []
            with pytest.raises(NonFiniteLogitsError, match=r"^the model's next-byte logits are not finite "
                               r"\(NaN or inf: a diverged checkpoint\?\): the largest is (nan|inf)$"):
                model.generate(PROMPT, 5, temperature, top_k, torch.Generator().manual_seed(0),
                               use_cache=use_cache, on_byte=seen.append)
            assert seen == [] and model.training  # nothing made; the mode is restored
    assert issubclass(NonFiniteLogitsError, ValueError)


def test_sampling_refuses_non_finite_logits_and_keeps_the_masks():
    logits = torch.arange(257, dtype=torch.float32)
    logits[:200] = float("-inf")  # masked symbols: fine
    assert _sample(logits, 0, None, None) == 256
    assert 200 <= _sample(logits, 1.0, None, torch.Generator().manual_seed(0)) < 257
    for bad, largest in ((float("nan"), "nan"), (float("inf"), "inf")):
        for where in (0, 100, 256):  # wherever it is, masked or not
            spoiled = logits.clone()
            spoiled[where] = bad
            for temperature in (0, 1.0, 1e300):
                with pytest.raises(NonFiniteLogitsError, match=f"the largest is {largest}$"):
                    _sample(spoiled, temperature, None, None)
    with pytest.raises(NonFiniteLogitsError, match="the largest is -inf$"):  # nothing left to draw
        _sample(torch.full((257,), float("-inf")), 1.0, None, None)


def test_cli_generate_streams_text_that_decodes_as_a_whole(monkeypatch, capsys, tmp_path):
    # the CLI prints each byte as it comes through an incremental UTF-8 decoder: a
    # character split between prompt and output, or across bytes, and invalid bytes
    # must print as the whole text's decode(errors="replace") does
    from tokcore import cli
    import tokcore.pooling.train as train

    made = b"\xa9 ok \xe2\x82\xac\xff\xe2\x82 x\xf0\x9f\x98\x80\xc3"  # ends inside a character
    printed_before_return = []

    class FakeModel:
        def generate(self, prompt, n, temperature, top_k, generator=None, *, use_cache=True, on_byte=None):
            for b in made:
                on_byte(b)
            printed_before_return.append(capsys.readouterr().out)
            return made

    monkeypatch.setattr(train, "load_model", lambda path, device: FakeModel())
    prompt = b"caf\xc3"  # its last character is finished by the output's first byte
    rc = cli.main(["generate", str(tmp_path), "--prompt", prompt.decode("utf-8", "surrogateescape"), "--device",
                   "cpu"])
    out = printed_before_return[0] + capsys.readouterr().out
    assert rc == 0
    assert out == (prompt + made).decode("utf-8", errors="replace") + "\n"
    assert printed_before_return[0].startswith("caf\u00e9 ok \u20ac")  # streamed, not printed at the end


def test_rotary_table_does_not_grow_when_only_the_dtype_changes():
    # autocast training steps between fp32 generation used to double it each time
    st = SegmentTransformer(16, 1, 2, causal=True)
    rotary = st.blocks[0].attn.rotary
    x, off = torch.randn(40, 16), torch.tensor([0, 40])
    for _ in range(12):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            st(x, off)
        st(x, off)
        assert rotary._cache[0] == 64
    cache = st.new_cache()
    with torch.no_grad():
        for i in range(200):  # one position at a time: the table doubles as it grows
            st.extend(x[:1], cache)
    assert rotary._cache[0] == 256


def test_cli_generate_ends_the_line_when_interrupted(monkeypatch, capsys, tmp_path):
    from tokcore import cli
    import tokcore.pooling.train as train

    class InterruptedModel:
        def generate(self, prompt, n, temperature, top_k, generator=None, *, use_cache=True, on_byte=None):
            for b in b"ok \xe2\x82":  # interrupted inside a character
                on_byte(b)
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "load_model", lambda path, device: InterruptedModel())
    rc = cli.main(["generate", str(tmp_path), "--prompt", "x ", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 130 and err == "interrupted\n"
    assert out == "x ok \ufffd\n"  # the held-back bytes, then the line's end, before the message


def test_cli_generate_reports_non_finite_logits(monkeypatch, capsys, tmp_path):
    # a diverged checkpoint: one error line (exit status 1), not a traceback or NUL bytes
    from tokcore import cli
    import tokcore.pooling.train as train

    model = _models()[0]
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    monkeypatch.setattr(train, "load_model", lambda path, device: model)
    rc = cli.main(["generate", str(tmp_path), "--prompt", "x ", "--device", "cpu", "--temperature", "0"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == "x \n"  # the prompt's line ended
    assert err == ("tokcore generate: error: the model's next-byte logits are not finite (NaN or inf: a diverged "
                   "checkpoint?): the largest is nan\n")

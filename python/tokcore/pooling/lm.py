"""Byte-level language models: a hierarchical (byte -> word -> byte) LM and a plain byte LM.

Both models take a flat byte stream ``bytes uint8 [T]`` with ``cu_seqlens int64 [B+1]``
and return a dict with the summed negative log-likelihood (nats) and counts, so that
``bits per byte = nll / ln 2 / n_bytes`` is a true code length for both.

:class:`HierarchicalByteLM` ("Learn Your Tokens", "Hierarchical Autoregressive
Transformers"): words from ``word_boundaries(..., "space")``; a
:class:`~tokcore.pooling.modules.BytePoolingEncoder` makes one vector per word; a causal
word-level transformer (the backbone) runs over the words of each sequence; a small
causal byte decoder predicts each word's bytes and an end-of-word symbol (256) from the
backbone state of the *previous* word (a learned start state for the first word of a
sequence) and the word's earlier bytes. All byte <-> word movement uses the tokcore
ops; no Python loop walks over words during training or evaluation.

:class:`ByteLM`: a plain causal byte transformer, the baseline.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NonFiniteLogitsError
from .modules import (
    BytePoolingEncoder,
    SegmentTransformer,
    check_byte_tensor,
    check_dropout,
    check_segment_offsets,
    check_sizes,
    check_word_lengths,
    init_weights,
    is_int,
    max_segment_length,
    segment_lengths,
)
from .ops import segment_expand, segment_pack, segment_unpack, word_boundaries

__all__ = [
    "EOW",
    "HierConfig",
    "ByteLMConfig",
    "HierarchicalByteLM",
    "ByteLM",
    "MODEL_KINDS",
    "build_model",
    "model_config",
    "count_parameters",
    "matched_byte_config",
    "SIZES",
    "NonFiniteLogitsError",
]

EOW = 256  # end-of-word symbol of the hierarchical decoder
BOS = 256  # start-of-sequence input symbol of the byte LM
LN2 = math.log(2.0)
_F32_OVERFLOW = 2.0 ** 128 - 2.0 ** 103  # the least float that rounds to inf in float32


@dataclass
class HierConfig:
    d_model: int = 256        # backbone width
    n_layers: int = 4         # backbone layers
    n_heads: int = 4
    d_local: int = 128        # byte encoder / decoder width
    n_local_heads: int = 4
    n_enc_layers: int = 1
    n_dec_layers: int = 2
    max_word_bytes: int = 16
    pool: str = "mean"        # mean | max | attention
    mlp_ratio: int = 4
    dropout: float = 0.0
    max_context_words: int = 512  # generation: backbone context window (words)
    # generation: context window in bytes; training sets it to its window length
    # (seq_len), so that generation stays within the word positions the model saw
    max_context_bytes: int = 1024


@dataclass
class ByteLMConfig:
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    max_context_bytes: int = 1024  # generation: context window (bytes); training sets it to seq_len


# Size presets. The byte LM of each preset is sized to about the hierarchical model's
# parameter count (see `matched_byte_config`).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=128, n_layers=2, n_heads=4, d_local=64, n_local_heads=2, n_enc_layers=1, n_dec_layers=1),
    "small": dict(d_model=256, n_layers=4, n_heads=4, d_local=128, n_local_heads=4, n_enc_layers=1, n_dec_layers=2),
    "base": dict(d_model=512, n_layers=8, n_heads=8, d_local=256, n_local_heads=4, n_enc_layers=1, n_dec_layers=2),
}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_input(bytes: Tensor, cu_seqlens: Tensor, where: str) -> None:
    check_byte_tensor(bytes, where)
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"{where}: cu_seqlens must be a 1-D int64 tensor [B+1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int64 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{where}: cu_seqlens must be a 1-D int64 tensor [B+1], got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")


def _check_config(model: str, c: Any, positive: tuple[str, ...], nonnegative: tuple[str, ...]) -> None:
    """ValueError naming the config field for a size that is not an int >= 1 (>= 0 for
    layer counts), before any module is built (whose errors name other things, or are a
    ZeroDivisionError)."""
    check_sizes(1, model, **{name: getattr(c, name) for name in positive})
    check_sizes(0, model, **{name: getattr(c, name) for name in nonnegative})
    check_dropout(c.dropout, model)


def _check_heads(model: str, c: Any, width: str, heads: str, rotary: bool, split: bool = False) -> None:
    """`width` must split into `heads` heads where attention uses them (split), and into
    even head sizes where rotary embeddings do (rotary)."""
    w, h = getattr(c, width), getattr(c, heads)
    if (rotary or split) and w % h:
        raise ValueError(f"{model}: {width}={w} is not divisible by {heads}={h}")
    if rotary and (w // h) % 2:
        raise ValueError(f"{model}: {width}={w} / {heads}={h} = {w // h} per head, which must be even "
                         "(rotary embeddings)")


def _sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> int:
    """One symbol drawn from softmax(logits / temperature), from the top_k most likely
    (ties with the k-th kept); temperature 0 is greedy (argmax). Any finite temperature
    >= 0 works: where scaling the float32 logits overflows (a temperature near 0, or one
    past float32's range) the symbol is drawn from the limit the distribution is at
    there, as float32 cannot hold it: greedy near 0, uniform over the symbols allowed
    (logits above -inf, within top_k) for a huge one. -inf logits are masked symbols;
    NonFiniteLogitsError if a logit is NaN or +inf, or all are -inf."""
    logits = logits.float()
    # else argmax picks the first NaN (byte 0) and multinomial raises torch's own error.
    # The max is NaN if any logit is (isfinite() would flag the masks' -inf), and its
    # index is the greedy pick (the first largest, as argmax's): one reduction for both
    top, greedy = logits.max(dim=-1)
    if not math.isfinite(top.item()):
        raise NonFiniteLogitsError("the model's next-byte logits are not finite (NaN or inf: a diverged "
                                   f"checkpoint?): the largest is {top.item()}")
    if temperature <= 0:
        return int(greedy)
    try:
        t = float(temperature)
    except OverflowError:  # an int past float's range
        t = math.inf
    if t < _F32_OVERFLOW:  # else the divisor is inf in float32 (every finite logit scaled to 0, top_k lost)
        scaled = logits / t
        if top_k is not None and 0 < top_k < scaled.numel():
            kth = torch.topk(scaled, top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1).cpu()
        # NaN where scaling overflowed (inf - inf, -inf / inf, 0 / 0): the limits below
        if not probs.isnan().any():
            return int(torch.multinomial(probs, 1, generator=generator))
    if t < 1:  # overflowed towards 0: what temperature 0 picks (within top_k and the masks anyway)
        return int(greedy)
    allowed = logits > float("-inf")
    if top_k is not None and 0 < top_k < logits.numel():  # on the logits: scaled, they are all 0 or NaN
        allowed &= logits >= torch.topk(logits, top_k).values[-1]
    return int(torch.multinomial(allowed.cpu().float(), 1, generator=generator))


def _check_generate_args(max_new_bytes: int, temperature: float, top_k: int | None, use_cache: bool,
                         on_byte: Callable[[int], object] | None) -> None:
    if not is_int(max_new_bytes) or max_new_bytes < 0:
        raise ValueError(f"max_new_bytes must be an int >= 0, got {max_new_bytes!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    # an int is finite however large (math.isfinite would raise OverflowError past float's range)
    if temperature < 0 or (not isinstance(temperature, numbers.Integral) and not math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and not is_int(top_k):  # torch.topk would fail deep inside sampling
        raise TypeError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None or >= 1, got {top_k!r}")
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be True or False, got {use_cache!r}")
    if on_byte is not None and not callable(on_byte):
        raise TypeError(f"on_byte must be None or a callable, got {type(on_byte).__name__}")


def _prompt_bytes(prompt: bytes | bytearray | memoryview | str) -> bytes:
    """The prompt's bytes (a str as UTF-8); TypeError for anything else (bytearray(5),
    say, would be five NUL bytes)."""
    if isinstance(prompt, str):
        return prompt.encode("utf-8")
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        return bytes(prompt)
    raise TypeError(f"prompt must be bytes, bytearray, memoryview or str, got {type(prompt).__name__}")


def _last(items: list, n: int) -> list:
    """The last n items (none for n <= 0; a plain items[-n:] would give all for n = 0)."""
    return items[max(0, len(items) - n):] if n > 0 else []


# Byte classes of word_boundaries(mode="space") (DESIGN.md section 5): 0 whitespace,
# 1 punctuation, 2 word byte (ASCII letter or digit, '_', any byte >= 0x80).
_BYTE_CLASS = torch.tensor([0 if b in b" \t\n\r\v\f" else 2 if (chr(b).isascii() and chr(b).isalnum()) or b == 0x5F
                            or b >= 0x80 else 1 for b in range(256)])
# _STARTS_WORD[c][b]: byte b starts a new word after a byte of class c (whitespace
# after non-whitespace; a word byte after punctuation).
_STARTS_WORD = torch.stack([((_BYTE_CLASS == 0) & (c != 0)) | ((_BYTE_CLASS == 2) & (c == 1)) for c in range(3)])
_UTF8_CONTINUATION = torch.tensor([(b & 0xC0) == 0x80 for b in range(256)])


def _segmentation_mask(word: bytes, previous: bytes, max_word_bytes: int) -> Tensor | None:
    """Symbols [257] (bytes, then end-of-word) that the hierarchical decoder may not emit
    next if the generated text is to split into the very words generation made
    (word_boundaries' rule). Inside a word: any byte that would start a new word (the
    decoder ends the word instead), and the end of the word after whitespace (no byte
    can start a word after whitespace). As a word's first byte after a word that ended
    by choice: any byte that would not start a word. After a word cut at
    max_word_bytes: a UTF-8 continuation byte that does not start a word, when the cut
    word holds a character start past its first byte (the segmenter would have cut
    there). None: no constraint."""
    if word:
        starts = _STARTS_WORD[_BYTE_CLASS[word[-1]]]
        return torch.cat([starts, ~starts.any(dim=0, keepdim=True)])
    if not previous:
        return None
    starts_after_previous = _STARTS_WORD[_BYTE_CLASS[previous[-1]]]
    if len(previous) < max_word_bytes:  # ended by choice
        banned = ~starts_after_previous
    elif any(not _UTF8_CONTINUATION[b] for b in previous[1:max_word_bytes]):
        banned = _UTF8_CONTINUATION & ~starts_after_previous
    else:
        return None
    return torch.cat([banned, torch.ones(1, dtype=torch.bool)])  # and no empty word


def _prompt_tensor(prompt: bytes | str, device: torch.device) -> Tensor:
    return torch.tensor(list(_prompt_bytes(prompt)), dtype=torch.uint8, device=device)


class HierarchicalByteLM(nn.Module):
    kind = "hier"

    def __init__(self, config: HierConfig | None = None, **overrides: Any):
        super().__init__()
        config = dataclasses.replace(config or HierConfig(), **overrides)
        self.config = c = config
        name = type(self).__name__
        _check_config(name, c, ("d_model", "n_heads", "d_local", "n_local_heads", "max_word_bytes", "mlp_ratio",
                                "max_context_words", "max_context_bytes"), ("n_layers", "n_enc_layers", "n_dec_layers"))
        _check_heads(name, c, "d_model", "n_heads", rotary=c.n_layers > 0)
        _check_heads(name, c, "d_local", "n_local_heads", rotary=c.n_enc_layers > 0 or c.n_dec_layers > 0,
                     split=c.pool == "attention")
        self.encoder = BytePoolingEncoder(c.d_local, c.n_enc_layers, c.n_local_heads, c.max_word_bytes, c.pool,
                                          d_out=c.d_model, mlp_ratio=c.mlp_ratio, dropout=c.dropout)
        self.backbone = SegmentTransformer(c.d_model, c.n_layers, c.n_heads, causal=True, mlp_ratio=c.mlp_ratio,
                                           dropout=c.dropout)
        self.start = nn.Parameter(torch.zeros(c.d_model))
        self.ctx_proj = nn.Linear(c.d_model, c.d_local)
        self.dec_embed = nn.Embedding(256, c.d_local)
        self.decoder = SegmentTransformer(c.d_local, c.n_dec_layers, c.n_local_heads, causal=True,
                                          mlp_ratio=c.mlp_ratio, dropout=c.dropout)
        self.head = nn.Linear(c.d_local, 257)
        init_weights(self)
        nn.init.normal_(self.start, std=0.02)

    # ----------------------------------------------------------------- pieces
    def segment(self, bytes: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor]:
        """(word_offsets [W+1], word_cu_seqlens [B+1]) of a flat byte stream."""
        return word_boundaries(bytes, cu_seqlens, self.config.max_word_bytes, "space")

    def word_states(self, bytes: Tensor, word_offsets: Tensor, word_cu_seqlens: Tensor,
                    max_words: int | None = None, *, check_offsets: bool = True) -> Tensor:
        """Backbone output [W, d_model]: state of word w has seen words <= w of its sequence.
        ``max_words`` (default: read from word_cu_seqlens) must be at least the longest
        sequence's word count. Each set of offsets is checked once: word_cu_seqlens
        (with max_words) here, as the longest sequence is read, word_offsets by the
        encoder's first op (on CUDA each a host sync). ``check_offsets=False`` skips
        both, and the check of max_words, for arguments known to be valid, such as
        `segment`'s."""
        return self._word_states(bytes, word_offsets, word_cu_seqlens, max_words, check_word_offsets=check_offsets,
                                 check_word_cu_seqlens=check_offsets, where="HierarchicalByteLM.word_states")

    def _word_states(self, bytes: Tensor, word_offsets: Tensor, word_cu_seqlens: Tensor, max_words: int | None, *,
                     check_word_offsets: bool, check_word_cu_seqlens: bool, where: str) -> Tensor:
        """`word_states`, with a check flag for each set of offsets (False: checked by the
        caller, or valid by construction); `where` (the method the caller called) starts
        error messages."""
        if check_word_cu_seqlens and not torch.compiler.is_compiling():
            # the backbone reads the longest sequence anyway: the same read checks
            # word_cu_seqlens, before anything is derived from them
            longest = check_segment_offsets(word_cu_seqlens, word_offsets.numel() - 1,
                                            f"{where}: word_cu_seqlens", "words, word_offsets.numel() - 1")
            if max_words is None:
                max_words = longest
            elif max_words < longest:
                raise ValueError(f"{where}: max_words={max_words} is shorter than the longest sequence ({longest} "
                                 "words): the backbone would drop the words past it; pass max_words=None to read it")
            check_word_cu_seqlens = False  # checked: the backbone's ops need not check them again
        words = self.encoder.encode(bytes, word_offsets, check_offsets=check_word_offsets)
        return self.backbone(words, word_cu_seqlens, max_words, check_offsets=check_word_cu_seqlens,
                             check_max_len=False)

    def previous_word_context(self, h: Tensor, word_cu_seqlens: Tensor) -> Tensor:
        """[W, d_model]: row w = h[w-1] within the same sequence, the learned start state
        for the first word of each sequence (the causal shift, done on words before
        expanding/decoding)."""
        w = h.shape[0]
        prev = torch.cat([self.start[None].to(h.dtype), h[:-1]], dim=0)
        first = torch.zeros(w + 1, dtype=torch.bool, device=h.device)
        first[word_cu_seqlens[:-1]] = True  # an empty sequence points at w: harmless slot
        return torch.where(first[:w, None], self.start.to(h.dtype), prev)

    def decoder_logits(self, ctx: Tensor, bytes: Tensor, word_offsets: Tensor, *,
                       check_offsets: bool = True) -> tuple[Tensor, Tensor]:
        """Decode every word at once.

        The decoder stream holds, for each word, its context vector followed by its
        bytes: [ctx_w, b_0 .. b_{L-1}] (L+1 slots). Slot i predicts b_i for i < L and
        the end-of-word symbol at i = L. Returns (logits [T+W, 257], dec_offsets [W+1]).
        ``check_offsets=False`` skips the CUDA check of word_offsets (a host sync).
        """
        t, w = bytes.numel(), ctx.shape[0]
        lmax = self.config.max_word_bytes
        dec_offsets = word_offsets + torch.arange(w + 1, device=word_offsets.device)
        x = self.dec_embed(bytes.long())  # [T, d_local]
        packed = segment_pack(x, word_offsets, lmax, check_offsets=check_offsets)  # [W, Lmax, d_local]
        packed = torch.cat([self.ctx_proj(ctx)[:, None, :].to(packed.dtype), packed], dim=1)  # [W, Lmax+1, d]
        # dec_offsets are valid when word_offsets are: no check (on CUDA a sync) for them
        stream = segment_unpack(packed, dec_offsets, t + w, check_offsets=False)  # [T+W, d_local]
        y = self.decoder(stream, dec_offsets, lmax + 1, check_offsets=False)
        return self.head(y), dec_offsets

    def decoder_targets(self, bytes: Tensor, word_offsets: Tensor, *, check_offsets: bool = True) -> Tensor:
        """[T+W] int64: each word's bytes followed by EOW, in decoder-stream order.
        ``check_offsets=False`` skips the CUDA check of word_offsets (a host sync)."""
        t, w = bytes.numel(), word_offsets.numel() - 1
        word_index = torch.arange(w, device=bytes.device, dtype=torch.float64)[:, None]
        word_of_byte = segment_expand(word_index, word_offsets, t,
                                      check_offsets=check_offsets).squeeze(1).long()  # [T]
        targets = torch.full((t + w,), EOW, dtype=torch.long, device=bytes.device)
        targets[torch.arange(t, device=bytes.device) + word_of_byte] = bytes.long()
        return targets

    # ----------------------------------------------------------------- training
    def forward(self, bytes: Tensor, cu_seqlens: Tensor) -> dict[str, Tensor | int]:
        """Returns {"loss": mean NLL per symbol, "nll": summed NLL (nats, bytes + EOW),
        "n_symbols", "n_bytes", "n_words", "n_seqs", "backbone_tokens"}."""
        _check_input(bytes, cu_seqlens, "HierarchicalByteLM.forward")
        # word_boundaries checks cu_seqlens (naming them) before it uses them, and makes
        # valid offsets: no op checks them (a check here would be one more sync on CUDA)
        word_offsets, word_cu = self.segment(bytes, cu_seqlens)
        return self._forward_words(bytes, word_offsets, word_cu, check_word_offsets=False,
                                   check_word_cu_seqlens=False, where="HierarchicalByteLM.forward")

    def forward_words(self, bytes: Tensor, word_offsets: Tensor, word_cu_seqlens: Tensor) -> dict[str, Tensor | int]:
        """`forward` on words the caller made; ValueError for invalid offsets or a word
        longer than max_word_bytes (the decoder could not predict its extra bytes). Each
        set of offsets is checked once (on CUDA a host sync each): word_offsets with the
        word lengths, word_cu_seqlens as the backbone's longest sequence is read; no op
        checks them again."""
        where = "HierarchicalByteLM.forward_words"
        check_byte_tensor(bytes, where)
        check_word_lengths(word_offsets, self.config.max_word_bytes, bytes.numel(), f"{where}: word_offsets")
        # that checked word_offsets, except under torch.compile (where the encoder's ops check them)
        return self._forward_words(bytes, word_offsets, word_cu_seqlens,
                                   check_word_offsets=torch.compiler.is_compiling(), check_word_cu_seqlens=True,
                                   where=where)

    def _forward_words(self, bytes: Tensor, word_offsets: Tensor, word_cu_seqlens: Tensor, *,
                       check_word_offsets: bool, check_word_cu_seqlens: bool, where: str) -> dict[str, Tensor | int]:
        # _word_states checks what is still unchecked (on CUDA a host sync each); the
        # decoder's ops reuse those checks.
        h = self._word_states(bytes, word_offsets, word_cu_seqlens, None, check_word_offsets=check_word_offsets,
                              check_word_cu_seqlens=check_word_cu_seqlens, where=where)
        ctx = self.previous_word_context(h, word_cu_seqlens)
        logits, _ = self.decoder_logits(ctx, bytes, word_offsets, check_offsets=False)
        targets = self.decoder_targets(bytes, word_offsets, check_offsets=False)
        nll = F.cross_entropy(logits.float(), targets, reduction="sum")
        n_sym = targets.numel()
        n_words = word_offsets.numel() - 1
        return {
            "loss": nll / max(n_sym, 1),
            "nll": nll,
            "n_symbols": n_sym,
            "n_bytes": bytes.numel(),
            "n_words": n_words,
            "n_seqs": word_cu_seqlens.numel() - 1,
            "backbone_tokens": n_words,
        }

    # ----------------------------------------------------------------- generation
    def _context_limits(self) -> tuple[int, int]:
        """(words, bytes) the backbone's context may hold in generation: a byte of
        max_context_bytes is left for the word being decoded."""
        return self.config.max_context_words, self.config.max_context_bytes - 1

    @staticmethod
    def _words_that_fit(words: list[bytes], max_words: int, max_bytes: int) -> list[bytes]:
        """The last words of `words`, as many as fit max_words and max_bytes."""
        words = _last(words, max_words)
        budget, keep = max_bytes, 0
        while keep < len(words) and budget >= len(words[-1 - keep]):
            budget -= len(words[-1 - keep])
            keep += 1
        return _last(words, keep)

    def _word_data(self, words: list[bytes], device: torch.device) -> tuple[Tensor, Tensor]:
        """(bytes uint8, word_offsets int64) of a non-empty list of words."""
        data = torch.tensor(list(b"".join(words)), dtype=torch.uint8, device=device)
        lengths = torch.tensor([len(wd) for wd in words], dtype=torch.int64, device=device)
        return data, torch.cat([torch.zeros(1, dtype=torch.int64, device=device), lengths.cumsum(0)])

    def _context_state(self, words: list[bytes], device: torch.device) -> Tensor:
        """Backbone state [d_model] of the last word of `words` (start state if none),
        from the last words that fit max_context_words and max_context_bytes."""
        words = self._words_that_fit(words, *self._context_limits())
        if not words:
            return self.start
        data, word_offsets = self._word_data(words, device)
        word_cu = torch.tensor([0, len(words)], dtype=torch.int64, device=device)
        h = self.word_states(data, word_offsets, word_cu, len(words), check_offsets=False)  # valid by construction
        return h[-1]

    def _encode_words(self, words: list[bytes], device: torch.device) -> Tensor:
        """Encoder vectors [len(words), d_model] of a non-empty list of words (each word's
        vector depends on its own bytes alone)."""
        data, word_offsets = self._word_data(words, device)
        return self.encoder.encode(data, word_offsets, check_offsets=False)  # valid by construction

    def _next_symbol_logits(self, ctx: Tensor, word: bytes, device: torch.device) -> Tensor:
        x = torch.cat([
            self.ctx_proj(ctx)[None],
            self.dec_embed(torch.tensor(list(word), dtype=torch.long, device=device)),
        ])
        offsets = torch.tensor([0, x.shape[0]], dtype=torch.int64, device=device)
        return self.head(self.decoder(x, offsets, x.shape[0], check_offsets=False)[-1])  # valid by construction

    @torch.no_grad()
    def generate(self, prompt: bytes | str = b"", max_new_bytes: int = 200, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None, *,
                 use_cache: bool = True, on_byte: Callable[[int], object] | None = None) -> bytes:
        """Continue `prompt`; returns only the new bytes (at most `max_new_bytes`).
        ``on_byte``, if given, is called with each new byte (an int) as it is made, to
        stream the output.

        Word by word: the decoder samples bytes until end-of-word (or until the word has
        `max_word_bytes` bytes), then the word goes through encoder and backbone to give
        the next word's context. The prompt's last word counts as unfinished: the
        decoder continues it. Bytes that would make the text split into other words
        than the ones generated are masked, so the output re-segments into the words
        the model made, as in training. The context is the last words that fit
        `config.max_context_bytes` and `config.max_context_words` (training sets the
        bytes to its window length).

        ``use_cache`` (default) keeps the backbone's keys and values of the context's
        words, and the decoder's of the word being decoded, so that each new word and
        byte costs attention over what came before rather than a pass over the whole
        context. When the context is full, it restarts from the last words that fit
        half of it, and at least the last word (the context then holds about half to
        all of it).
        ``use_cache=False`` runs the whole context for every word, and so its context
        is always the last words that fit. The two give the same bytes until the first
        restart (up to rounding: the sums run in another order)."""
        prompt = _prompt_bytes(prompt)
        _check_generate_args(max_new_bytes, temperature, top_k, use_cache, on_byte)
        was_training = self.training
        self.eval()
        try:
            return self._generate_words(prompt, max_new_bytes, temperature, top_k, generator, use_cache, on_byte)[1]
        finally:
            self.train(was_training)

    def _generate_words(self, prompt: bytes | str, max_new_bytes: int, temperature: float, top_k: int | None,
                        generator: torch.Generator | None, use_cache: bool = True,
                        on_byte: Callable[[int], object] | None = None) -> tuple[list[bytes], bytes]:
        """`generate` (in eval mode, without grad), returning (the words of prompt + output
        as generation made them, the new bytes)."""
        device = self.start.device
        mwb = self.config.max_word_bytes
        data = _prompt_tensor(prompt, device)
        words: list[bytes] = []
        partial = b""
        if data.numel():
            wo, _ = self.segment(data, torch.tensor([0, data.numel()], dtype=torch.int64, device=device))
            raw, bounds = bytes(data.tolist()), wo.tolist()
            words = [raw[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            partial = words.pop()
        out = bytearray()
        context = _CachedWordContext(self, words, device) if use_cache else None
        while len(out) < max_new_bytes:
            ctx = context.state if context is not None else self._context_state(words, device)
            word = bytearray(partial)
            partial = b""
            previous = words[-1] if words else b""
            if use_cache:
                cache = self.decoder.new_cache()
                pending = self.ctx_proj(ctx)[None]  # the decoder's rows not yet run: context, then bytes
                if word:
                    pending = torch.cat([pending, self.dec_embed(torch.tensor(list(word), device=device))])
            while len(word) < mwb and len(out) < max_new_bytes:
                if use_cache:
                    logits = self.head(self.decoder.extend(pending, cache)[-1])
                else:
                    logits = self._next_symbol_logits(ctx, bytes(word), device)
                if not word:
                    logits[EOW] = float("-inf")  # no empty words
                banned = _segmentation_mask(bytes(word), previous, mwb)
                if banned is not None:
                    logits[banned.to(logits.device)] = float("-inf")
                sym = _sample(logits, temperature, top_k, generator)
                if sym == EOW:
                    break
                word.append(sym)
                out.append(sym)
                if on_byte is not None:
                    on_byte(sym)
                if use_cache:
                    pending = self.dec_embed(torch.tensor([sym], device=device))
            words.append(bytes(word))
            if context is not None and len(out) < max_new_bytes:
                context.add(words)
        if partial:  # max_new_bytes = 0: the prompt's last word was never continued
            words.append(partial)
        return words, bytes(out)


class ByteLM(nn.Module):
    """Plain causal byte transformer (next-byte prediction, BOS at each sequence start)."""

    kind = "byte"

    def __init__(self, config: ByteLMConfig | None = None, **overrides: Any):
        super().__init__()
        config = dataclasses.replace(config or ByteLMConfig(), **overrides)
        self.config = c = config
        _check_config(type(self).__name__, c, ("d_model", "n_heads", "mlp_ratio", "max_context_bytes"), ("n_layers",))
        _check_heads(type(self).__name__, c, "d_model", "n_heads", rotary=c.n_layers > 0)
        self.embed = nn.Embedding(257, c.d_model)
        self.blocks = SegmentTransformer(c.d_model, c.n_layers, c.n_heads, causal=True, mlp_ratio=c.mlp_ratio,
                                         dropout=c.dropout)
        self.head = nn.Linear(c.d_model, 256)
        init_weights(self)

    def logits(self, bytes: Tensor, cu_seqlens: Tensor, max_len: int | None = None, *,
               check_offsets: bool = True) -> Tensor:
        """[T, 256]: row t predicts bytes[t] from the bytes before it in its sequence.
        ``max_len`` (default: read from cu_seqlens) must be at least the longest
        sequence. cu_seqlens are checked once, as the longest sequence is read (on CUDA a
        host sync); ``check_offsets=False`` skips that and the check of max_len."""
        return self._logits(bytes, cu_seqlens, max_len, check_offsets=check_offsets, where="ByteLM.logits")

    def _logits(self, bytes: Tensor, cu_seqlens: Tensor, max_len: int | None, *, check_offsets: bool,
                where: str) -> Tensor:
        """`logits`; `where` (the method the caller called) starts error messages."""
        if check_offsets and not torch.compiler.is_compiling():
            # the blocks read the longest sequence anyway: the same read checks
            # cu_seqlens, before anything is derived from them
            longest = check_segment_offsets(cu_seqlens, bytes.numel(), f"{where}: cu_seqlens", "bytes")
            if max_len is None:
                max_len = longest
            elif max_len < longest:
                raise ValueError(f"{where}: max_len={max_len} is shorter than the longest sequence ({longest} bytes): "
                                 "attention would drop the bytes past it; pass max_len=None to read it")
            check_offsets = False  # checked: the blocks' ops need not check them again
        t = bytes.numel()
        inp = torch.cat([bytes.new_full((1,), 0).long(), bytes[:-1].long()]) if t else bytes.long()
        starts = cu_seqlens[:-1]
        inp[starts[starts < t]] = BOS
        x = self.embed(inp)
        return self.head(self.blocks(x, cu_seqlens, max_len, check_offsets=check_offsets, check_max_len=False))

    def forward(self, bytes: Tensor, cu_seqlens: Tensor) -> dict[str, Tensor | int]:
        _check_input(bytes, cu_seqlens, "ByteLM.forward")
        logits = self._logits(bytes, cu_seqlens, None, check_offsets=True, where="ByteLM.forward")
        nll = F.cross_entropy(logits.float(), bytes.long(), reduction="sum")
        t = bytes.numel()
        return {
            "loss": nll / max(t, 1),
            "nll": nll,
            "n_symbols": t,
            "n_bytes": t,
            "n_words": None,  # filled in by the trainer (word_boundaries) when wanted
            "n_seqs": cu_seqlens.numel() - 1,
            "backbone_tokens": t,
        }

    @torch.no_grad()
    def generate(self, prompt: bytes | str = b"", max_new_bytes: int = 200, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None, *,
                 use_cache: bool = True, on_byte: Callable[[int], object] | None = None) -> bytes:
        """Continue `prompt` byte by byte; returns only the new bytes. ``on_byte``, if
        given, is called with each new byte (an int) as it is made, to stream the
        output. The context is at most `config.max_context_bytes` positions: a start
        symbol and the last bytes (training sets it to its window length, the positions
        the model saw).

        ``use_cache`` (default) keeps every layer's keys and values, so that each new
        byte costs attention over the context rather than a pass over all of it; when
        the context is full, it restarts from the last bytes that fit half of it (the
        context then holds between half and all of it). ``use_cache=False`` runs the
        whole context for every byte, and so its context is always the last bytes that
        fit. The two give the same bytes until the first restart (up to rounding: the
        sums run in another order)."""
        prompt = _prompt_bytes(prompt)
        _check_generate_args(max_new_bytes, temperature, top_k, use_cache, on_byte)
        was_training = self.training
        self.eval()
        try:
            run = self._generate_cached if use_cache else self._generate
            return run(prompt, max_new_bytes, temperature, top_k, generator, on_byte)
        finally:
            self.train(was_training)

    def _generate_cached(self, prompt: bytes, max_new_bytes: int, temperature: float, top_k: int | None,
                         generator: torch.Generator | None, on_byte: Callable[[int], object] | None) -> bytes:
        device = self.head.weight.device
        n_ctx = self.config.max_context_bytes
        ctx = bytearray(prompt)
        out = bytearray()
        cache, h = None, None

        def restart(n_bytes: int) -> Tensor:
            """A new cache holding BOS and the last n_bytes bytes; the last row's state."""
            nonlocal cache
            cache = self.blocks.new_cache()
            inp = torch.tensor([BOS, *_last(ctx, n_bytes)], dtype=torch.long, device=device)
            return self.blocks.extend(self.embed(inp), cache)[-1]

        for _ in range(max_new_bytes):
            if h is None:
                h = restart(n_ctx - 1)  # BOS + n_ctx - 1 bytes: n_ctx positions, as without the cache
            elif cache.length < n_ctx:
                h = self.blocks.extend(self.embed(torch.tensor([ctx[-1]], device=device)), cache)[-1]
            else:  # full: keep the last bytes that fit half of it
                h = restart((n_ctx - 1) // 2)
            sym = _sample(self.head(h), temperature, top_k, generator)
            ctx.append(sym)
            out.append(sym)
            if on_byte is not None:
                on_byte(sym)
        return bytes(out)

    def _generate(self, prompt: bytes | str, max_new_bytes: int, temperature: float, top_k: int | None,
                  generator: torch.Generator | None, on_byte: Callable[[int], object] | None) -> bytes:
        device = self.head.weight.device
        ctx = bytearray(_prompt_bytes(prompt))
        out = bytearray()
        n_ctx = self.config.max_context_bytes
        for _ in range(max_new_bytes):
            window = bytes(_last(ctx, n_ctx - 1))  # + the dummy byte below: n_ctx positions
            # append a dummy byte: the logits row of the last position predicts the next byte
            data = torch.tensor(list(window) + [0], dtype=torch.uint8, device=device)
            cu = torch.tensor([0, data.numel()], dtype=torch.int64, device=device)
            logits = self.logits(data, cu, data.numel(), check_offsets=False)  # cu is valid by construction
            sym = _sample(logits[-1], temperature, top_k, generator)
            ctx.append(sym)
            out.append(sym)
            if on_byte is not None:
                on_byte(sym)
        return bytes(out)


class _CachedWordContext:
    """The hierarchical model's backbone context in cached generation: the last words
    that fit its limits, their keys and values in a DecodeCache, and the last word's
    backbone state (the start state if none)."""

    def __init__(self, model: HierarchicalByteLM, words: list[bytes], device: torch.device):
        self.model, self.device = model, device
        self.max_words, self.max_bytes = model._context_limits()
        self._restart(words, self.max_words, self.max_bytes)

    def _restart(self, words: list[bytes], max_words: int, max_bytes: int) -> None:
        kept = self.model._words_that_fit(words, max_words, max_bytes)
        self.cache = self.model.backbone.new_cache()
        self.n_bytes = sum(map(len, kept))
        self.state = self.model.start
        if kept:
            self.state = self.model.backbone.extend(self.model._encode_words(kept, self.device), self.cache)[-1]

    @property
    def n_words(self) -> int:
        """Words held: the backbone's positions in the cache, one a word."""
        return self.cache.length

    def add(self, words: list[bytes]) -> None:
        """Takes in words[-1], just finished; when it does not fit, restarts from the
        last words that fit half the limits (rounded up: a limit of one word keeps one),
        and at least from words[-1] where it fits the whole limits (a word longer than
        half the bytes would leave none)."""
        word = words[-1]
        if self.n_words < self.max_words and self.n_bytes + len(word) <= self.max_bytes:
            self.state = self.model.backbone.extend(self.model._encode_words([word], self.device), self.cache)[-1]
            self.n_bytes += len(word)
        else:
            half_bytes = max((self.max_bytes + 1) // 2, min(len(word), self.max_bytes))
            self._restart(words, (self.max_words + 1) // 2, half_bytes)


MODEL_KINDS: dict[str, tuple[type[nn.Module], type]] = {
    "hier": (HierarchicalByteLM, HierConfig),
    "byte": (ByteLM, ByteLMConfig),
}


def model_config(kind: str, config: dict[str, Any] | None = None):
    """The config dataclass of model `kind`, built from a dict (unknown keys are an error)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose from {sorted(MODEL_KINDS)}")
    cls = MODEL_KINDS[kind][1]
    config = dict(config or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(config) - names
    if unknown:
        raise ValueError(f"unknown {kind} config keys: {sorted(unknown)}")
    return cls(**config)


def build_model(kind: str, config: dict[str, Any] | None = None) -> nn.Module:
    config = model_config(kind, config)  # first: a ValueError for an unknown kind, not a KeyError
    return MODEL_KINDS[kind][0](config)


def matched_byte_config(hier: HierConfig, target_params: int | None = None) -> ByteLMConfig:
    """A ByteLM config with the hierarchical model's width whose depth gives the parameter
    count closest to `target_params` (default: the hierarchical model's count)."""
    if target_params is None:
        target_params = count_parameters(HierarchicalByteLM(hier))
    best, best_diff = None, None
    for n_layers in range(1, 65):
        cfg = ByteLMConfig(d_model=hier.d_model, n_layers=n_layers, n_heads=hier.n_heads, mlp_ratio=hier.mlp_ratio,
                           dropout=hier.dropout)
        d = cfg.d_model
        # embed + head + per block (qkv, proj, mlp, 2 LN) + final LN
        n = 257 * d + (d * 256 + 256) + n_layers * (4 * d * d + 4 * d + 2 * cfg.mlp_ratio * d * d
                                                     + cfg.mlp_ratio * d + d + 4 * d) + 2 * d
        diff = abs(n - target_params)
        if best_diff is None or diff < best_diff:
            best, best_diff = cfg, diff
    return best

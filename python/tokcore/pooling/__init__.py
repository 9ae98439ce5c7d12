"""pooling: bytes to words and back (word-pooled and hierarchical byte-level models).

Ops (see ``tokcore.pooling.ops`` for each docstring):
``word_boundaries``, ``segment_reduce``, ``segment_expand``, ``segment_pack``,
``segment_unpack``.
"""

from tokcore.pooling.ops import (
    segment_expand,
    segment_pack,
    segment_reduce,
    segment_unpack,
    word_boundaries,
)

__all__ = ["word_boundaries", "segment_reduce", "segment_expand", "segment_pack", "segment_unpack"]

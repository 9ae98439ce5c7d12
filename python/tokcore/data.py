"""Byte corpora for training and evaluation; nothing is downloaded.

The default corpus is the Python standard library's own source (``*.py`` under
``sysconfig.get_paths()["stdlib"]``, ``site-packages`` excluded): a few tens of MB of
code and English prose that every machine with Python has. Files are read in sorted
order (of their path relative to the root), and every ``holdout_every``-th file (the
20th, 40th, ...) is held out, so the split is deterministic and by file. With fewer
files than that (or one file), the last ``1/holdout_every`` of the bytes is held out.

Training batches are random fixed-length byte windows concatenated into one flat
stream with ``cu_seqlens``; evaluation uses a fixed set of evenly spaced windows of
the held-out bytes.
"""

from __future__ import annotations

import fnmatch
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .errors import InputNotFoundError, UsageError

__all__ = [
    "Corpus",
    "stdlib_dir",
    "list_files",
    "load_corpus",
    "pack_sequences",
    "sample_batch",
    "heldout_windows",
    "batched",
]

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_dir() -> Path:
    """Folder of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(root: str | os.PathLike, pattern: str = "*", errors: list[OSError] | None = None,
               repeats: list[Path] | None = None) -> list[Path]:
    """Regular files under `root` whose name matches `pattern`, in a deterministic order
    (sorted by path relative to `root`); hidden folders, ``__pycache__`` and
    ``site-packages`` are skipped, and so are folders that cannot be listed (their
    errors are appended to `errors`, if given). Symbolic links to folders are followed
    (a corpus is often put together from linked folders); a folder reached again (a
    link loop, or a second link to a folder already listed) is skipped the second time,
    in the walk's sorted order, and its path appended to `repeats`, if given."""
    root = Path(root)
    found: list[tuple[str, Path]] = []
    listed: set[tuple[int, int]] = set()  # (st_dev, st_ino) of the real folders listed
    for dirpath, dirnames, filenames in os.walk(root, onerror=errors.append if errors is not None else None,
                                                followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError as e:  # gone since os.walk listed it
            if errors is not None:
                errors.append(e)
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in listed:  # else a loop would never end, and a linked folder count twice
            if repeats is not None:
                repeats.append(Path(dirpath))
            dirnames[:] = []
            continue
        listed.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in filenames:
            if fnmatch.fnmatch(name, pattern):
                p = Path(dirpath) / name
                if p.is_file():
                    found.append((p.relative_to(root).as_posix(), p))
    found.sort()
    return [p for _, p in found]


_BINARY_PROBE = 4096  # a NUL byte among a file's first this many bytes: binary


def _looks_binary(data: bytes) -> bool:
    return b"\x00" in data[:_BINARY_PROBE]


def _tail_cut(raw: bytes, holdout_every: int, at_least: int = 0) -> int:
    """Where the held-out tail of `raw` starts: its last 1/holdout_every (at least
    `at_least` bytes), moved back to a line start where one lies in the second half."""
    cut = len(raw) - max(at_least, len(raw) // holdout_every)
    nl = raw.rfind(b"\n", 0, cut)
    if nl > len(raw) // 2:
        cut = nl + 1
    return cut


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _skipped(errors: list[OSError], what: str) -> str:
    """A note on the files or folders skipped for `errors` (naming the first)."""
    first = errors[0]
    reason = first.strerror or str(first)
    where = f"{first.filename}: {reason}" if first.filename else reason
    return f"skipped {_plural(len(errors), 'unreadable ' + what)} (first: {where})"


def _skipped_binary(binary: list[Path]) -> str:
    """A note on the files skipped as binary (naming the first: a folder of UTF-16 text,
    say, is all binary to this test)."""
    return (f"skipped {_plural(len(binary), 'binary file')} (a NUL byte in the first {_BINARY_PROBE} bytes; "
            f"first: {binary[0]})")


def _repeated_folders(repeats: list[Path]) -> str:
    return (f"skipped {_plural(len(repeats), 'folder')} reached again through a symbolic link (a loop, or a "
            f"second link to a folder already read; first: {repeats[0]})")


def _size(n_bytes: int) -> str:
    """A byte count for people: MB, or KB or bytes where MB to 2 decimals would read 0.00."""
    if n_bytes >= 10_000:
        return f"{n_bytes / 1e6:.2f} MB"
    if n_bytes >= 1000:
        return f"{n_bytes / 1e3:.1f} KB"
    return _plural(n_bytes, "byte")


def _split_at(raw: bytes, cut: int) -> tuple[np.ndarray, np.ndarray]:
    """raw[:cut] and raw[cut:] as writable uint8 arrays, each copied once."""
    whole = np.frombuffer(raw, dtype=np.uint8)  # a view of raw, read-only
    return whole[:cut].copy(), whole[cut:].copy()


def _concat(parts: list[bytes]) -> np.ndarray:
    """The parts joined into one uint8 array, copied once (b"".join, then a copy of its
    read-only buffer, would hold the bytes three times over)."""
    out = np.empty(sum(len(p) for p in parts), dtype=np.uint8)
    start = 0
    for p in parts:
        out[start:start + len(p)] = np.frombuffer(p, dtype=np.uint8)
        start += len(p)
    return out


@dataclass
class Corpus:
    """Training and held-out bytes (uint8 numpy arrays)."""

    train: np.ndarray
    heldout: np.ndarray
    source: str
    n_train_files: int = 0
    n_heldout_files: int = 0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (f"{self.source}: {_size(len(self.train))} train ({_plural(self.n_train_files, 'file')}), "
                f"{_size(len(self.heldout))} held out ({_plural(self.n_heldout_files, 'file')})")


def load_corpus(data: str | os.PathLike | None = None, holdout_every: int = 20, pattern: str | None = None,
                max_bytes: int | None = None) -> Corpus:
    """Load a byte corpus.

    data: None for the standard library's ``*.py`` files; a folder (all non-binary files
    matching `pattern`, default ``*``); or one file (its last ``1/holdout_every`` is
    held out, cut at a line start).
    holdout_every: every `holdout_every`-th file (1-based: 20, 40, ...) is held out.
    With fewer than `holdout_every` files, the last ``1/holdout_every`` of their
    concatenation is held out (at least one byte), cut at a line start.
    Files and folders that cannot be read are skipped (one unreadable file should not
    stop a run), and so are binary and empty files, and folders reached again through
    symbolic links; `Corpus.notes` says how many (of all but the empty files), and
    these splits, one log line each.
    max_bytes: stop reading files once this many bytes have been read (keeps the same
    deterministic order and split; for quick runs and tests).
    """
    if holdout_every < 2:
        raise UsageError(f"holdout_every must be >= 2, got {holdout_every}")
    if data is not None and os.fspath(data) in ("", b""):  # Path("") is ".": it would train on the current folder
        raise UsageError("--data: an empty path")
    if data is None:
        root, pattern, source = stdlib_dir(), pattern or "*.py", "python stdlib"
    else:
        root, pattern, source = Path(data), pattern or "*", str(data)
        if not root.exists():
            raise InputNotFoundError(f"--data: {root} does not exist")

    if root.is_file():
        with open(root, "rb") as f:  # only what is used: the file may be far bigger than max_bytes
            raw = f.read() if max_bytes is None else f.read(max(0, max_bytes))
        return Corpus(*_split_at(raw, _tail_cut(raw, holdout_every)), source, 1, 1, ["single file: split by position"])

    train_parts: list[bytes] = []
    held_parts: list[bytes] = []
    total = 0
    index = 0
    folder_errors: list[OSError] = []
    file_errors: list[OSError] = []
    repeats: list[Path] = []
    binary: list[Path] = []
    empty: list[Path] = []
    for path in list_files(root, pattern, folder_errors, repeats):
        try:
            raw = path.read_bytes()
        except OSError as e:
            file_errors.append(e)
            continue
        if not raw or _looks_binary(raw):
            (binary if raw else empty).append(path)
            continue
        index += 1
        (held_parts if index % holdout_every == 0 else train_parts).append(raw)
        total += len(raw)
        if max_bytes is not None and total >= max_bytes:
            break
    notes = [_skipped(errors, what) for errors, what in ((file_errors, "file"), (folder_errors, "folder")) if errors]
    if binary:
        notes.append(_skipped_binary(binary))
    if repeats:
        notes.append(_repeated_folders(repeats))
    if not train_parts:  # (empty files, which hold nothing to miss, are named only here: the stdlib has 28)
        raise UsageError(f"--data: no readable text files matching {pattern!r} under {root}"
                         + "".join(f"; {note}" for note in notes + ([f"skipped {_plural(len(empty), 'empty file')}"]
                                                                     if empty else [])))
    if not held_parts:
        # fewer than holdout_every files: hold out the tail of them all, not of the last
        # file alone (which may be a byte long)
        return _split_tail(train_parts, holdout_every, source, notes)
    return Corpus(_concat(train_parts), _concat(held_parts), source, len(train_parts), len(held_parts), notes)


def _split_tail(parts: list[bytes], holdout_every: int, source: str, notes: list[str]) -> Corpus:
    """The Corpus of `parts` (fewer than holdout_every files) whose held-out split is the
    tail of their concatenation; a file cut in two counts on both sides. Empties `parts`
    once they are joined (the caller's list: else the bytes are held three times over)."""
    lengths = [len(p) for p in parts]
    raw = b"".join(parts)
    parts.clear()
    cut = _tail_cut(raw, holdout_every, at_least=1)
    ends = np.cumsum(lengths)
    n_train = sum(1 for n, end in zip(lengths, ends) if end - n < cut)  # parts are not empty
    n_held = sum(1 for end in ends if end > cut)
    at_line = cut == 0 or raw[cut - 1:cut] == b"\n"
    notes.append(f"{_plural(len(lengths), 'text file')}, fewer than holdout_every={holdout_every}: "
                 f"held out the last {len(raw) - cut} of their {len(raw)} bytes (about 1/{holdout_every}, "
                 f"{'at a line start, ' if at_line else ''}from {_plural(n_held, 'file')})")
    return Corpus(*_split_at(raw, cut), source, n_train, n_held, notes)


def pack_sequences(seqs: Sequence[bytes | np.ndarray], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate byte sequences: (bytes uint8 [T], cu_seqlens int64 [B+1])."""
    arrays = [np.frombuffer(s, dtype=np.uint8) if isinstance(s, (bytes, bytearray)) else np.asarray(s, np.uint8)
              for s in seqs]
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    cu = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.uint8)
    return (torch.from_numpy(flat.copy()).to(device), torch.from_numpy(cu).to(device))


def sample_batch(data: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows of `seq_len` bytes of `data`, packed."""
    if len(data) < seq_len:
        raise UsageError(f"corpus has {len(data)} bytes, fewer than seq_len={seq_len}")
    starts = rng.integers(0, len(data) - seq_len + 1, size=batch_size)
    windows = data[starts[:, None] + np.arange(seq_len)[None, :]]
    flat = torch.from_numpy(windows.reshape(-1))
    cu = torch.arange(batch_size + 1, dtype=torch.int64) * seq_len
    return flat.to(device), cu.to(device)


def heldout_windows(data: np.ndarray, n: int, seq_len: int) -> list[np.ndarray]:
    """`n` fixed windows of `seq_len` bytes, evenly spaced over `data` (non-overlapping
    when the data is long enough; fewer and shorter when it is short)."""
    if len(data) == 0 or n <= 0:
        return []
    seq_len = min(seq_len, len(data))
    n = min(n, max(1, len(data) // seq_len))
    starts = np.linspace(0, len(data) - seq_len, n).astype(np.int64)
    return [data[s:s + seq_len] for s in starts]


def batched(windows: Sequence[np.ndarray], batch_size: int,
            device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(windows), batch_size):
        yield pack_sequences(windows[i:i + batch_size], device)

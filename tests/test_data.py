"""load_corpus: the held-out split of a folder with few files, unreadable, binary and
empty files and unreadable folders (skipped, and said so in Corpus.notes), linked
folders (followed, loops skipped), max_bytes on a single file, an empty --data, and
Corpus.describe."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tokcore.data import Corpus, list_files, load_corpus
from tokcore.errors import UsageError


def _lines(n: int, tag: str) -> bytes:
    return b"".join(b"%s_%d = %d\n" % (tag.encode(), i, i * i) for i in range(n))


@pytest.fixture
def two_files(tmp_path) -> tuple[Path, bytes]:
    """A folder with a 400 KB a.py and a 1-byte z.txt (the review's repro), and the two
    files' bytes in reading order."""
    folder = tmp_path / "two"
    folder.mkdir()
    a = _lines(20_000, "value")
    assert len(a) > 400_000
    (folder / "a.py").write_bytes(a)
    (folder / "z.txt").write_bytes(b"x")
    return folder, a + b"x"


def test_few_files_hold_out_the_tail_of_them_all(two_files):
    # used to hold out the tail of the last file only: here its one byte
    folder, raw = two_files
    c = load_corpus(folder)
    held = c.heldout.tobytes()
    assert c.train.tobytes() + held == raw  # nothing lost, nothing repeated
    assert len(raw) // 20 <= len(held) < len(raw) // 20 + 30  # about 1/20, moved back to a line start
    assert held.startswith(b"value_") and c.train.tobytes().endswith(b"\n")
    assert (c.n_train_files, c.n_heldout_files) == (1, 2)
    assert c.notes == [f"2 text files, fewer than holdout_every=20: held out the last {len(held)} of their "
                       f"{len(raw)} bytes (about 1/20, at a line start, from 2 files)"]
    c4 = load_corpus(folder, holdout_every=4)
    assert len(raw) // 4 <= len(c4.heldout) < len(raw) // 4 + 30


def test_few_files_hold_out_at_least_a_byte(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"abc")  # 1/20 of 3 bytes is none
    c = load_corpus(tmp_path)
    assert (c.train.tobytes(), c.heldout.tobytes()) == (b"ab", b"c")
    assert (c.n_train_files, c.n_heldout_files) == (1, 1)
    assert "1 text file, fewer than holdout_every=20: held out the last 1 of their 3 bytes" in c.notes[0]


def test_few_files_within_max_bytes(two_files, tmp_path):
    # max_bytes still stops the reading after the file that reaches it; the tail of
    # what was read is held out
    folder, raw = two_files
    (folder / "b.py").write_bytes(_lines(100, "b"))  # between a.py and z.txt
    c = load_corpus(folder, max_bytes=1000)
    assert c.train.tobytes() + c.heldout.tobytes() == raw[:-1]  # a.py alone
    assert (c.n_train_files, c.n_heldout_files) == (1, 1) and len(raw) // 20 - 30 < len(c.heldout) < len(raw) // 19


def test_enough_files_keep_the_split_by_file(tmp_path):
    # every holdout_every-th file (sorted by path) is held out, whole, as before
    files = [_lines(5 + i, f"f{i}") for i in range(7)]
    for i, data in enumerate(files):
        (tmp_path / f"f{i}.py").write_bytes(data)
    c = load_corpus(tmp_path, holdout_every=3)
    assert c.train.tobytes() == b"".join(files[i] for i in (0, 1, 3, 4, 6))
    assert c.heldout.tobytes() == files[2] + files[5]
    assert (c.n_train_files, c.n_heldout_files, c.notes) == (5, 2, [])


def test_unreadable_files_are_skipped_and_counted(tmp_path, monkeypatch):
    # (root ignores file modes: read_bytes is made to fail instead)
    for name in ("a.py", "b.py", "c.py", "d.py"):
        (tmp_path / name).write_bytes(_lines(50, name[0]))
    unreadable = {tmp_path / "b.py", tmp_path / "d.py"}
    real = Path.read_bytes

    def read_bytes(self):
        if self in unreadable:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    c = load_corpus(tmp_path, holdout_every=2)
    # used to be skipped without a word
    assert c.notes == [f"skipped 2 unreadable files (first: {tmp_path / 'b.py'}: Permission denied)"]
    assert (c.train.tobytes(), c.heldout.tobytes()) == (_lines(50, "a"), _lines(50, "c"))
    unreadable.discard(tmp_path / "d.py")
    notes = load_corpus(tmp_path, holdout_every=2).notes
    assert notes == [f"skipped 1 unreadable file (first: {tmp_path / 'b.py'}: Permission denied)"]
    unreadable.update(tmp_path / name for name in ("a.py", "c.py", "d.py"))
    with pytest.raises(UsageError, match=r"no readable text files .*; skipped 4 unreadable files \(first: "):
        load_corpus(tmp_path)


def test_unreadable_folders_are_skipped_and_counted(tmp_path, monkeypatch):
    # os.walk skips a folder it cannot list; list_files hands its error on
    (tmp_path / "a.py").write_bytes(_lines(50, "a"))
    locked = tmp_path / "locked"
    real_walk = os.walk

    def walk(top, onerror=None, **kwargs):
        if onerror is not None:
            onerror(PermissionError(13, "Permission denied", str(locked)))
        yield from real_walk(top, onerror=onerror, **kwargs)

    monkeypatch.setattr(os, "walk", walk)
    errors: list[OSError] = []
    assert list_files(tmp_path, "*", errors) == [tmp_path / "a.py"] and len(errors) == 1
    assert list_files(tmp_path) == [tmp_path / "a.py"]  # without a list: skipped, as before
    c = load_corpus(tmp_path)
    assert f"skipped 1 unreadable folder (first: {locked}: Permission denied)" in c.notes


def test_an_empty_data_path_is_a_usage_error(tmp_path, monkeypatch):
    # Path("") is ".": it used to train on the current folder
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.py").write_bytes(_lines(50, "a"))
    for data in ("", b""):
        with pytest.raises(UsageError, match="^--data: an empty path$"):
            load_corpus(data)


def test_symlinked_folders_are_followed_and_loops_skipped(tmp_path):
    # os.walk did not follow links to folders (links to files were): a corpus made of
    # linked folders lost them without a note, or was "no readable text files"
    corp = tmp_path / "corp"
    (corp / "sub").mkdir(parents=True)
    (corp / "a.py").write_bytes(_lines(30, "a"))
    (corp / "sub" / "b.py").write_bytes(_lines(30, "b"))
    only_linked = tmp_path / "linked"
    only_linked.mkdir()
    (only_linked / "code").symlink_to(corp, target_is_directory=True)
    c = load_corpus(only_linked)
    assert c.train.tobytes() + c.heldout.tobytes() == _lines(30, "a") + _lines(30, "b")
    assert not any("symbolic link" in note for note in c.notes)

    mixed = tmp_path / "mixed"
    (mixed / "real").mkdir(parents=True)
    (mixed / "real" / "c.py").write_bytes(_lines(30, "c"))
    (mixed / "code").symlink_to(corp, target_is_directory=True)
    (mixed / "real" / "loop").symlink_to(mixed, target_is_directory=True)  # a loop: listed once
    (mixed / "zz").symlink_to(mixed / "real", target_is_directory=True)  # a second link to real: listed once
    repeats: list[Path] = []
    files = list_files(mixed, "*", repeats=repeats)
    assert [p.relative_to(mixed).as_posix() for p in files] == ["code/a.py", "code/sub/b.py", "real/c.py"]
    assert repeats == [mixed / "real" / "loop", mixed / "zz"]  # in the walk's sorted order
    assert list_files(mixed) == files  # deterministic, and without a list the same files
    c = load_corpus(mixed, holdout_every=3)
    assert (c.train.tobytes(), c.heldout.tobytes()) == (_lines(30, "a") + _lines(30, "b"), _lines(30, "c"))
    assert c.notes == [f"skipped 2 folders reached again through a symbolic link (a loop, or a second link to a "
                       f"folder already read; first: {mixed / 'real' / 'loop'})"]


def test_a_single_file_reads_only_max_bytes(tmp_path):
    # the whole file was read, then cut to max_bytes: 3 GB held to use 100 KB
    import tracemalloc

    head = _lines(200, "v")
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.write(head)
        f.truncate(50_000_000)  # sparse: quick to make, 50 MB to read
    tracemalloc.start()
    try:
        c = load_corpus(big, max_bytes=1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert c.train.tobytes() + c.heldout.tobytes() == head[:1000]
    assert len(c.heldout) >= 1000 // 20 and c.heldout.tobytes().startswith(b"v_")  # cut at a line start
    assert peak < 1_000_000, peak
    assert c.train.flags.writeable and c.heldout.flags.writeable  # copies, as before, not views of read-only bytes
    small = tmp_path / "small.txt"
    small.write_bytes(head)
    whole = load_corpus(small, max_bytes=10 * len(head))  # more than the file: all of it
    assert whole.train.tobytes() + whole.heldout.tobytes() == head


def test_binary_files_are_counted(tmp_path):
    # skipped without a word, unlike unreadable files: a folder of UTF-16 text (NUL
    # bytes) was mostly dropped silently. Empty files, which hold nothing to miss, are
    # named only when no text is left (the stdlib has 28 empty __init__.py files)
    (tmp_path / "a.py").write_bytes(_lines(50, "a"))
    (tmp_path / "b.txt").write_bytes("utf-16 text".encode("utf-16"))
    (tmp_path / "c.bin").write_bytes(b"\x00\x01" * 100)
    (tmp_path / "d.py").write_bytes(b"")
    (tmp_path / "e.py").write_bytes(_lines(50, "e"))
    c = load_corpus(tmp_path, holdout_every=2)
    assert (c.train.tobytes(), c.heldout.tobytes()) == (_lines(50, "a"), _lines(50, "e"))
    assert c.notes == [f"skipped 2 binary files (a NUL byte in the first 4096 bytes; first: {tmp_path / 'b.txt'})"]
    (tmp_path / "e.py").unlink()
    (tmp_path / "c.bin").unlink()
    (tmp_path / "f.py").write_bytes(b"")
    c = load_corpus(tmp_path, holdout_every=2)
    assert "skipped 1 binary file (a NUL byte in the first 4096 bytes; first: " in c.notes[0]
    assert c.notes[0].endswith("b.txt)") and "empty" not in " ".join(c.notes)
    (tmp_path / "a.py").unlink()
    with pytest.raises(UsageError,
                       match=r"no readable text files .*; skipped 1 binary file .*; skipped 2 empty files$"):
        load_corpus(tmp_path)
    (tmp_path / "b.txt").unlink()
    with pytest.raises(UsageError, match=r"; skipped 2 empty files$"):
        load_corpus(tmp_path)


def test_describe_shows_small_splits_and_one_file():
    # "0.00 MB held out (1 files)" read as empty for a few KB
    z = lambda n: np.zeros(n, dtype=np.uint8)  # noqa: E731
    assert (Corpus(z(2_500_000), z(4_321), "src", 7, 1).describe()
            == "src: 2.50 MB train (7 files), 4.3 KB held out (1 file)")
    assert (Corpus(z(10_000), z(999), "src", 1, 2).describe()
            == "src: 0.01 MB train (1 file), 999 bytes held out (2 files)")
    assert Corpus(z(1), z(0), "src", 1, 0).describe() == "src: 1 byte train (1 file), 0 bytes held out (0 files)"

"""load_corpus: the held-out split of a folder with few files, unreadable files and
folders (skipped, and said so in Corpus.notes), and an empty --data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tokcore.data import list_files, load_corpus
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

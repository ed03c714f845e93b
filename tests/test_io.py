"""hyperlora._io: atomic writes leave the target either complete-new or exactly-old."""
import os

import pytest

from hyperlora._io import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_text


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_write_text_creates_and_replaces(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "one\n")
    assert target.read_text() == "one\n"
    atomic_write_text(target, "two\r\nthree\n")
    assert target.read_bytes() == b"two\r\nthree\n"
    assert _siblings(target) == ["a.txt"]  # no temp file left behind


def test_unencodable_text_leaves_target_byte_identical(tmp_path):
    target = tmp_path / "a.txt"
    target.write_bytes(b"old content\n")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(target, "ok\n\ud800\n")
    assert target.read_bytes() == b"old content\n"
    assert _siblings(target) == ["a.txt"]


def test_write_bytes_keeps_existing_mode(tmp_path):
    target = tmp_path / "b.bin"
    target.write_bytes(b"x")
    os.chmod(target, 0o600)
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert target.stat().st_mode & 0o777 == 0o600


def test_atomic_path_failure_keeps_old_file(tmp_path):
    target = tmp_path / "c.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("writer crashed")
    assert target.read_text() == "old"
    assert _siblings(target) == ["c.json"]
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_atomic_dir_replaces_whole_directory(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
        assert not target.exists()
    assert (target / "weights").read_text() == "v1"
    (target / "stale").write_text("from v1")
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v2")
    assert sorted(p.name for p in target.iterdir()) == ["weights"]
    assert (target / "weights").read_text() == "v2"
    assert _siblings(target) == ["ckpt"]


def test_atomic_dir_failure_keeps_old_directory(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "weights").write_text("v1")
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("partial")
            raise ValueError("export failed")
    assert (target / "weights").read_text() == "v1"
    assert _siblings(target) == ["ckpt"]


def test_atomic_dir_refuses_a_file_target(tmp_path):
    target = tmp_path / "f"
    target.write_text("x")
    with pytest.raises(NotADirectoryError):
        with atomic_dir(target):
            pass
    assert target.read_text() == "x"

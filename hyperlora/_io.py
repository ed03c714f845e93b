"""Atomic file writes, usable from every layer (this module imports nothing from hyperlora).

A write either leaves the complete new content at the target or leaves the target exactly as it was:
the bytes go to a temporary file in the target's own directory (same filesystem, so the rename is
atomic), are flushed and fsync'ed, and only then `os.replace`d onto the target. If anything fails
before the rename (an encoding error, a full disk, an exception from the caller's code), the
temporary file is removed and the target is untouched.

    atomic_write_text(path, text)          # one text file
    atomic_write_bytes(path, data)         # one binary file
    with atomic_path(path) as tmp: ...     # a library that insists on writing a path itself
    with atomic_dir(path) as tmp: ...      # a whole directory (e.g. a checkpoint or PEFT export)
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["atomic_write_text", "atomic_write_bytes", "atomic_path", "atomic_dir", "save_figure"]


def _fsync_dir(directory: Path) -> None:
    """Best-effort fsync of a directory entry (makes the rename durable on POSIX; a no-op elsewhere)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_sibling(target: Path, *, directory: bool = False) -> Path:
    """A fresh, unique temporary path beside `target` (hidden, named after it)."""
    parent = target.parent
    prefix = f".{target.name}."
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=parent)
    os.close(fd)
    return Path(name)


def _keep_mode(tmp: Path, target: Path) -> None:
    """Give the new file the permissions of the file it replaces, or the usual umask-based default."""
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    with contextlib.suppress(OSError):
        os.chmod(tmp, mode)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; on a clean exit it replaces `path` atomically.

    For writers that only accept a filename (matplotlib's savefig, safetensors' save_file, ...).
    On an exception the temporary file is deleted and `path` is left as it was.
    """
    target = Path(path)
    tmp = _tmp_sibling(target)
    try:
        yield tmp
        _keep_mode(tmp, target)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically: the target holds either all of `data` or its old content."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8", newline: str | None = "") -> None:
    """Write `text` to `path` atomically.

    The text is encoded before anything touches the disk, so an un-encodable string (e.g. a lone
    surrogate under UTF-8) raises `UnicodeEncodeError` and leaves `path` untouched. `newline=""`
    (the default) writes line endings exactly as they are in `text`; pass None for the platform's.
    """
    if newline is None:
        text = text.replace("\n", os.linesep)
    atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `path`; on a clean exit it becomes `path`.

    An existing directory at `path` is moved aside, the new one renamed in, and the old one removed,
    so readers see either the old complete directory or the new complete one (there is a short window
    in which `path` does not exist; two renames, no partial content). On an exception the temporary
    directory is removed and `path` is left as it was. `path` must not be an existing regular file.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    tmp = _tmp_sibling(target, directory=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
    old: Path | None = None
    try:
        if target.exists():
            old = _tmp_sibling(target, directory=True)
            old.rmdir()
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


def save_figure(plt: Any, fig: Any, path: PathLike, dpi: int = 110) -> Path:
    """Write a matplotlib ``fig`` to ``path`` as PNG atomically and close it (also on error); returns the path.
    ``plt`` is the caller's ``matplotlib.pyplot`` (matplotlib stays an optional import of the caller)."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return path

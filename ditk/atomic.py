"""Atomic file and directory writes: write next to the target, fsync, then rename.

A reader (or a pre-empted job) never sees half a file: either the old one or the new one. The data is
fsynced before the rename and the folder after it, so this holds across a power cut too, not only a
killed process. Temporary names start with '.' and end in '.tmp'; `clean_temp` removes the leftovers of
a write that was killed (call it where one process owns the folder: under the run-directory lock).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file of a folder, then the folder itself (before it is renamed into place)."""
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            fsync_file(p)
    fsync_dir(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in the target's folder; on success fsync it and rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder beside `path`; on success it replaces `path` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old.tmp")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_temp(folder: str | os.PathLike, log=None, older_than: float = 0.0) -> list[Path]:
    """Remove the '.<name>.*.tmp' files and folders that killed atomic writes left in `folder` (not recursive).
    Call it where no other process is writing into `folder` (under a lock), or with `older_than` seconds
    where one might be (a write in progress is seconds old). Returns what was removed."""
    import time

    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    now = time.time()
    for p in sorted(folder.glob(".*.tmp")):
        try:
            if older_than and now - p.lstat().st_mtime < older_than:
                continue
        except FileNotFoundError:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    if removed:
        (log or (lambda m: print(f"[ditk] {m}", file=sys.stderr, flush=True)))(
            f"removed {len(removed)} temporary leftover(s) of an interrupted write in {folder}")
    return removed

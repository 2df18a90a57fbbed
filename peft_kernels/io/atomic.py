"""Atomic replacement of a directory of files (checkpoints, adapters).

A save writes every file into a staging directory next to the target, fsyncs them, and
then swaps the staging directory into place with one rename, so a reader (or a crash)
sees either the old set of files or the new one, never a mix: per-file ``os.replace``
would leave a window where a new ``adapter_config.json`` sits next to old weights.
Files in the target that the save does not own (a README, a tokenizer, other adapters'
subdirectories) are carried over by hard link.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange_flag = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange_flag) == 0


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def target_path(directory: str | os.PathLike) -> Path:
    """The absolute directory a save replaces: through a symlink to the directory it points to."""
    directory = Path(directory)
    if directory.is_symlink():
        directory = directory.resolve()  # replace the directory it points to, not the link
    # abspath also folds "." and "..", whose .name/.parent would put staging inside the target.
    directory = Path(os.path.abspath(directory))
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    return directory


def publish_directory(staging: Path, directory: Path, *, owned: Callable[[str], bool],
                      exchange: Callable[[Path, Path], bool] | None = None) -> None:
    """Move the finished ``staging`` directory to ``directory`` in one step.

    Entries of an existing ``directory`` for which ``owned(name)`` is False and that
    ``staging`` does not hold are carried over; owned ones (the old checkpoint) go.
    """
    if not directory.exists():
        os.rename(staging, directory)
        fsync_dir(directory.parent)
        return
    for entry in directory.iterdir():
        if not owned(entry.name) and not (staging / entry.name).exists():
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, staging / entry.name, symlinks=True, copy_function=_link_or_copy)
            elif entry.is_symlink():
                os.symlink(os.readlink(entry), staging / entry.name)
            else:
                _link_or_copy(str(entry), str(staging / entry.name))
    exchange = exchange or rename_exchange
    if exchange(staging, directory):
        shutil.rmtree(staging)  # now holds the old files
    else:
        # No atomic exchange here: two renames; between them `directory` is briefly absent
        # (never half-written), and the old copy is kept until the new one is in place.
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        os.rmdir(old)
        os.rename(directory, old)
        os.rename(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(directory.parent)


@contextmanager
def replace_directory(directory: str | os.PathLike, *, owned: Callable[[str], bool]) -> Iterator[Path]:
    """Yield an empty staging directory; on success it atomically becomes ``directory``.

    The caller writes (and fsyncs) its files into the yielded path. On an exception the
    staging directory is removed and ``directory`` is left exactly as it was.
    """
    directory = target_path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield staging
        fsync_dir(staging)
        publish_directory(staging, directory, owned=owned)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

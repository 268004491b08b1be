"""Files the project writes: one atomic write, the cleanup of what a killed run left, write probes.

Every file a run writes for later use (checkpoints, results CSV/JSON, index caches, thresholds,
the exemplar memory, figures) goes through :func:`atomic_write`: the content is written to a
temporary file in the target's folder, named ``.<name>.css-tmp-<12 hex digits>``, flushed and
fsynced, then renamed over the target (``os.replace``, atomic on POSIX within one file system)
and the folder is fsynced so that the rename itself survives a crash. A reader sees the old file
or the new one, never a half-written one. A process killed mid-write leaves only such a temporary
file; :func:`remove_orphan_temp_files` deletes them (and nothing else) at the start of a run.
"""
from __future__ import annotations

import os
import re
import secrets
import stat
import time
from typing import Callable, Optional

__all__ = [
    "TEMP_MARKER",
    "temp_path_for",
    "is_temp_file_name",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "remove_orphan_temp_files",
    "check_writable",
]

TEMP_MARKER = ".css-tmp-"
_TEMP_NAME = re.compile(r"^\..+" + re.escape(TEMP_MARKER) + r"[0-9a-f]{12}$")


def temp_path_for(path: str) -> str:
    """A fresh temporary path beside ``path``: ``<folder>/.<name>.css-tmp-<12 hex digits>``."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}{TEMP_MARKER}{secrets.token_hex(6)}")


def is_temp_file_name(name: str) -> bool:
    """Whether a file name follows :func:`temp_path_for`'s pattern."""
    return bool(_TEMP_NAME.match(name))


def _open_new(path: str, mode: int) -> int:
    # O_EXCL: never write into a file someone else created under the same name
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    return os.open(path, flags, mode)


def atomic_write(path, write_to_file: Callable) -> None:
    """Create or replace ``path`` atomically (module docstring).

    ``write_to_file(handle)`` writes the content to a binary file handle. The new file gets the
    permissions a plain ``open(path, "w")`` would give it: those of the file it replaces, else
    ``0o666 & ~umask`` (the kernel applies the umask when the temporary file is created;
    ``tempfile.mkstemp`` would give 0600). If anything raises, the temporary file is removed and
    ``path`` is left as it was.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    tmp_path = temp_path_for(path)
    fd = _open_new(tmp_path, 0o666)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            fd = None  # owned by the handle now
            write_to_file(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    _fsync_folder(folder)


def atomic_write_bytes(path, data: bytes) -> None:
    """:func:`atomic_write` of ``data``."""
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> None:
    """:func:`atomic_write` of ``text`` encoded with ``encoding``."""
    atomic_write_bytes(path, text.encode(encoding))


def _fsync_folder(folder: str) -> None:
    # Makes the rename durable; not every platform can open a directory.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_orphan_temp_files(folder, min_age_s: float = 0.0) -> list:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` (not its subfolders):
    regular files named ``.<name>.css-tmp-<12 hex digits>`` whose last change is at least
    ``min_age_s`` seconds old (0: all of them; give a few minutes when another run may be writing
    into the same folder). Nothing else is touched. Returns the removed paths, sorted; a missing
    folder removes nothing."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    now = time.time()
    removed = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if not is_temp_file_name(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime < min_age_s:
                    continue
                os.remove(entry.path)
            except FileNotFoundError:  # removed meanwhile (its writer finished)
                continue
            removed.append(entry.path)
    return sorted(removed)


def check_writable(folder, option: Optional[str] = None, create: bool = True) -> str:
    """Make sure files can be created in ``folder``; returns its absolute path.

    ``create=True``: the folder is created when missing, then probed. ``create=False``: nothing
    is created; the folder, or its nearest existing ancestor when it does not exist yet, is probed
    (the folder could then be created there). A probe file (temporary-file pattern, so a crash
    leaves nothing :func:`remove_orphan_temp_files` would not remove) is created and removed.

    Raises ``ValueError`` naming ``option`` (e.g. ``"--checkpoint"``) and the folder when the path
    is an existing file, a part of it is a file, or the folder cannot be created or written to.
    """
    folder = os.path.abspath(os.fspath(folder))
    what = f"{option} {folder}" if option else folder
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{what}: this path is a file, not a folder; pass a folder "
                         f"(or move the file away)")
    existing = _nearest_existing(folder)
    if not os.path.isdir(existing):
        raise ValueError(f"{what}: cannot create the folder, a part of the path ({existing}) is a "
                         f"file; pass another folder")
    target = folder if create else existing
    if create:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            raise ValueError(f"{what}: cannot create the folder ({error.strerror or error}); "
                             f"pass a folder you can write to") from None
    probe = temp_path_for(os.path.join(target, "write-probe"))
    try:
        os.close(_open_new(probe, 0o666))
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"{what}: cannot write into the folder ({error.strerror or error}); "
                         f"pass a folder you can write to") from None
    return folder


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path

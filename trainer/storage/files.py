"""Atomic file writes and safe names: the rules every stage's files follow.

A write goes to a temporary name in the same folder and is renamed over the target, so a killed
process leaves either the old file or the new one, never half of one. The temporary is
``.<name>.<pid>.<random>.tmp``: what a killed writer leaves (up to the size of the file) is removed
the next time the same file is written, and only when its pid no longer runs, so a live writer's
temporary is never touched.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .locks import process_alive


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_DEFAULT_FILE_MODE = _default_file_mode()
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]*")  # fullmatch: `$` would let a final newline through
MAX_NAME = 128
_TEMPORARY_SUFFIX = ".tmp"
_TEMPORARY_TAIL = re.compile(r"(\d{1,9})\.[a-z0-9_]{8}")  # <pid>.<mkstemp's 8 random characters>


def _new_temporary(target: Path) -> tuple[int, str]:
    """Create ``target``'s folder and a temporary file beside ``target`` named for this process; first
    remove the temporaries of ``target`` that writers which no longer run left behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(target)
    return tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=_TEMPORARY_SUFFIX)


def remove_dead_temporaries(target: str | os.PathLike[str]) -> int:
    """Delete the temporaries of ``target`` whose writer's pid is gone (a killed write); return how many."""
    target = Path(target)
    prefix = f".{target.name}."
    removed = 0
    with os.scandir(target.parent) as entries:  # a dataset folder holds thousands of files: one cheap pass
        for entry in entries:
            name = entry.name
            if not (name.startswith(prefix) and name.endswith(_TEMPORARY_SUFFIX)):
                continue
            match = _TEMPORARY_TAIL.fullmatch(name[len(prefix):-len(_TEMPORARY_SUFFIX)])
            if match is None or process_alive(int(match[1])) or not entry.is_file(follow_symlinks=False):
                continue
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it is flushed, fsynced and renamed to ``path``."""
    target = Path(path)
    handle, temporary_name = _new_temporary(target)
    os.chmod(temporary_name, _DEFAULT_FILE_MODE)  # mkstemp makes 0600; a finished file gets the usual mode
    binary = "b" in mode
    try:
        with os.fdopen(handle, mode, encoding=None if binary else encoding) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary_name, target)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that want a file name (safetensors); renamed on success."""
    target = Path(path)
    handle, temporary_name = _new_temporary(target)
    os.close(handle)
    os.chmod(temporary_name, _DEFAULT_FILE_MODE)
    try:
        yield Path(temporary_name)
        with open(temporary_name, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary_name, target)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w") as stream:
        stream.write(text)


def atomic_write_json(path: str | os.PathLike[str], value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def check_output_file(path: str | os.PathLike[str], field: str) -> Path:
    """Return ``path`` if a file can be written there; else raise a ``ValueError`` naming ``field`` and the path.

    Refused before any work: a folder, a path under a file, a folder this process may not write in
    (read-only disk, no permission). Missing folders are fine: the write creates them.
    """
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{field}: {target} is a folder; expected the path of a file to write")
    _check_writable_parent(target, field)
    return target


def check_output_folder(path: str | os.PathLike[str], field: str) -> Path:
    """Return ``path`` if it is, or can be made, a folder this process may write in; else raise naming ``field``."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{field}: {folder} is a file; expected a folder (it is created if missing)")
    if folder.is_dir():
        _check_writable(folder, field)
    else:
        _check_writable_parent(folder, field)
    return folder


def _check_writable_parent(path: Path, field: str) -> None:
    """The nearest folder above ``path`` that exists must be a folder this process may write in."""
    existing = path.absolute().parent
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{field}: {existing} is a file, so {path} cannot be written in it; expected a path in a "
                         "folder")
    _check_writable(existing, field)


def _check_writable(folder: Path, field: str) -> None:
    if os.access(folder, os.W_OK | os.X_OK):
        return
    read_only = hasattr(os, "statvfs") and bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    reason = "a read-only file system" if read_only else "no write permission"
    raise ValueError(f"{field}: cannot write in {folder} ({reason}); expected a folder you can write to")


def check_name(name: str, field: str) -> str:
    """Return ``name`` if it is a plain file or folder name; raise naming ``field`` otherwise.

    Names come from widgets and flags and are joined onto folders we own, so ``..``, path
    separators and absolute paths are refused rather than silently escaping that folder.
    """
    if not name or not _SAFE_NAME.fullmatch(name) or ".." in name:
        shown = repr(name if len(name) <= 60 else name[:60] + "…")
        raise ValueError(
            f"{field}: {shown} is not a plain name; expected letters, digits, '.', '_', '-' or spaces, "
            "starting with a letter or digit, with no '..' and no path separator"
        )
    if len(name) > MAX_NAME:
        raise ValueError(f"{field}: a name of {len(name)} characters; expected at most {MAX_NAME} (the file "
                         "system's limit, with room for the suffixes and temporary names added to it)")
    return name

"""Atomic file writes and safe names: the rules every stage's files follow.

A write goes to a temporary name in the same folder and is renamed over the target, so a killed
process leaves either the old file or the new one, never half of one.
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

def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_DEFAULT_FILE_MODE = _default_file_mode()
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]*")  # fullmatch: `$` would let a final newline through
MAX_NAME = 128


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it is flushed, fsynced and renamed to ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
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
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
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

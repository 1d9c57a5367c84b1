"""One writer per file: an exclusive lock held in ``<name>.lock`` beside the file it guards.

Two processes appending to one prompt set (or rendering into one dataset, training into one run)
would each keep its own view of the file and interleave their writes. :func:`exclusive_lock`
makes the second one fail at once with the first one's pid, instead of waiting or mixing.

POSIX: ``fcntl.flock`` on the lock file, which holds the holder's pid. The kernel drops a flock
when its process dies, however it dies, so a lock file left by a killed process is simply taken
over. Where ``fcntl`` is missing (Windows), the lock file is created with ``O_EXCL`` and a lock
whose pid no longer runs is stale and taken over. Either way the lock file is removed on release.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_SUFFIX = ".lock"
_TAKEOVER_ATTEMPTS = 5


class LockHeldError(OSError):
    """Another process (``pid``; None when it has not written its pid yet) holds the lock on ``target``."""

    def __init__(self, target: Path, pid: int | None) -> None:
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"{target}: in use by {holder} (its lock is {lock_path_for(target)}); wait for it to "
                         "finish or stop it, then run again")
        self.target = target
        self.pid = pid


@dataclass(frozen=True)
class HeldLock:
    """A lock this process holds: the lock file, and the pid of a dead holder it took over (None if none)."""

    path: Path
    previous_pid: int | None


def lock_path_for(target: str | os.PathLike[str]) -> Path:
    """``<name>.lock`` beside ``target``."""
    target = Path(target)
    return target.with_name(target.name + LOCK_SUFFIX)


@contextmanager
def exclusive_lock(target: str | os.PathLike[str]) -> Iterator[HeldLock]:
    """Hold the lock on ``target`` for the ``with`` block; raise :class:`LockHeldError` at once if it is taken.

    The lock is per open lock file, not per process: the same process asking twice is refused too.
    The folder of ``target`` is created if needed.
    """
    target = Path(target)
    lock_path = lock_path_for(target)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    acquire = _acquire_flock if fcntl is not None else _acquire_pid_file
    descriptor, previous_pid = acquire(target, lock_path)
    try:
        yield HeldLock(lock_path, previous_pid)
    finally:
        try:
            lock_path.unlink(missing_ok=True)  # while still holding it: a waiting process re-checks the inode
        finally:
            os.close(descriptor)


def _read_pid(descriptor: int) -> int | None:
    os.lseek(descriptor, 0, os.SEEK_SET)
    text = os.read(descriptor, 64).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _write_pid(descriptor: int) -> None:
    os.lseek(descriptor, 0, os.SEEK_SET)
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{os.getpid()}\n".encode("ascii"))
    os.fsync(descriptor)


def _acquire_flock(target: Path, lock_path: Path) -> tuple[int, int | None]:
    while True:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(descriptor)
            os.close(descriptor)
            raise LockHeldError(target, holder) from None
        except BaseException:
            os.close(descriptor)
            raise
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        opened = os.fstat(descriptor)
        if current is None or (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
            os.close(descriptor)  # the holder released and removed the file between our open and flock
            continue
        previous_pid = _read_pid(descriptor)  # a pid left here belongs to a holder that died
        _write_pid(descriptor)
        return descriptor, previous_pid


def _acquire_pid_file(target: Path, lock_path: Path) -> tuple[int, int | None]:
    previous_pid = None
    for _ in range(_TAKEOVER_ATTEMPTS):
        try:
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                with open(lock_path, "rb") as stream:
                    text = stream.read(64).decode("ascii", "replace").strip()
            except FileNotFoundError:
                continue  # released meanwhile: try again
            holder = int(text) if text.isdigit() else None
            if holder is None or process_alive(holder):
                raise LockHeldError(target, holder) from None
            previous_pid = holder
            lock_path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        _write_pid(descriptor)
        return descriptor, previous_pid
    raise LockHeldError(target, None)


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs; on Windows through OpenProcess, since ``os.kill(pid, 0)`` would signal it there."""
    if pid == os.getpid():
        return True
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # ERROR_ACCESS_DENIED: it exists
        try:
            exit_code = ctypes.c_ulong()
            kernel32.GetExitCodeProcess(handle, ctypes.byref(exit_code))
            return exit_code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True

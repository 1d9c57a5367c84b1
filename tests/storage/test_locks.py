"""``exclusive_lock``: one writer per file across processes; a killed holder's lock is taken over.

Every case runs twice: with ``fcntl.flock`` (POSIX) and with the O_EXCL pid file used where
``fcntl`` is missing (Windows), forced here by hiding ``fcntl`` from the module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from comfyui_selma.trainer.storage import locks
from comfyui_selma.trainer.storage.locks import LockHeldError, exclusive_lock, lock_path_for


@pytest.fixture(params=["flock", "pid_file"])
def method(request, monkeypatch):
    if request.param == "pid_file":
        monkeypatch.setattr(locks, "fcntl", None)
    return request.param


def _holder(target, method: str) -> subprocess.Popen:
    """A process that takes the lock on ``target``, says so, and holds it until its stdin closes."""
    script = textwrap.dedent(f"""
        import sys
        from comfyui_selma.trainer.storage import locks
        if {method == "pid_file"}:
            locks.fcntl = None
        with locks.exclusive_lock({str(target)!r}):
            print("held", flush=True)
            sys.stdin.readline()
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_the_lock_file_sits_beside_the_target_and_is_gone_after_the_block(tmp_path, method):
    target = tmp_path / "set.jsonl"
    assert lock_path_for(target) == tmp_path / "set.jsonl.lock"
    with exclusive_lock(target) as held:
        assert held.path == lock_path_for(target)
        assert lock_path_for(target).read_text().strip() == str(os.getpid())
        assert held.previous_pid is None
    assert not lock_path_for(target).exists()
    with exclusive_lock(target):  # and it can be taken again
        pass


def test_a_second_process_holding_the_lock_is_refused_with_its_pid(tmp_path, method):
    target = tmp_path / "set.jsonl"
    holder = _holder(target, method)
    try:
        with pytest.raises(LockHeldError, match=rf"{target}: in use by process {holder.pid}") as error:
            with exclusive_lock(target):
                pytest.fail("the lock was granted twice")
        assert error.value.pid == holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with exclusive_lock(target):
        pass


def test_a_killed_holders_lock_is_taken_over(tmp_path, method):
    target = tmp_path / "set.jsonl"
    holder = _holder(target, method)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert lock_path_for(target).exists()  # the killed process could not clean up
    with exclusive_lock(target) as held:
        assert held.previous_pid == holder.pid
        assert lock_path_for(target).read_text().strip() == str(os.getpid())
    assert not lock_path_for(target).exists()


def test_the_same_process_cannot_take_a_lock_it_holds(tmp_path, method):
    target = tmp_path / "set.jsonl"
    with exclusive_lock(target):
        with pytest.raises(LockHeldError, match=f"in use by process {os.getpid()}"):
            with exclusive_lock(target):
                pass


def test_the_lock_is_released_when_the_block_raises(tmp_path, method):
    target = tmp_path / "set.jsonl"
    with pytest.raises(RuntimeError):
        with exclusive_lock(target):
            raise RuntimeError("work failed")
    with exclusive_lock(target):
        pass


def test_a_lock_held_error_is_an_os_error_so_every_cli_reports_it_plainly(tmp_path):
    assert issubclass(LockHeldError, OSError)

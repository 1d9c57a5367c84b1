"""Atomic writes and safe names, the rules every stage's files follow."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import pytest

from comfyui_selma.trainer.storage.files import atomic_open, atomic_write_json, atomic_write_text, check_name


def test_atomic_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert [path.name for path in target.parent.iterdir()] == ["file.txt"]


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "data.json"
    atomic_write_json(target, {"kept": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(target) as stream:
            stream.write('{"kept": ')
            raise RuntimeError("killed")
    assert target.read_text() == '{\n  "kept": 1\n}\n'
    assert [path.name for path in tmp_path.iterdir()] == ["data.json"]


def test_finished_files_get_the_usual_permissions_not_mkstemps_private_ones(tmp_path):
    target = tmp_path / "shared.txt"
    atomic_write_text(target, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("name", ["expert_counting", "my lora.v2", "SD15-base"])
def test_plain_names_are_accepted(name):
    assert check_name(name, "lora_name") == name


@pytest.mark.parametrize("name", ["", "..", "../escape", "a/b", "a\\b", "/abs", ".hidden", "a..b", "notes\n",
                                  "a\nb", "a\0b", "-rf", "n" * 129])
def test_names_that_could_leave_their_folder_are_refused_naming_the_field(name):
    with pytest.raises(ValueError, match="lora_name"):
        check_name(name, "lora_name")


def test_atomic_path_gives_a_writer_a_file_name_and_renames_it_on_success(tmp_path):
    from comfyui_selma.trainer.storage.files import atomic_path

    target = tmp_path / "lora.safetensors"
    with atomic_path(target) as temporary:
        temporary.write_bytes(b"weights")
        assert not target.exists()
    assert target.read_bytes() == b"weights"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    with pytest.raises(OSError):
        with atomic_path(target) as temporary:
            raise OSError("disk full")
    assert target.read_bytes() == b"weights" and [path.name for path in tmp_path.iterdir()] == ["lora.safetensors"]


# --- what a killed writer leaves ---------------------------------------------------------------------------------

DIES_WRITING = """
import os, signal, sys
from comfyui_selma.trainer.storage.files import atomic_path
with atomic_path(sys.argv[1]) as temporary:
    temporary.write_bytes(b"half of a large file" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""
WRITES_WHEN_TOLD = """
import sys
from comfyui_selma.trainer.storage.files import atomic_open
with atomic_open(sys.argv[1]) as stream:
    stream.write("from the slow writer")
    print("writing", flush=True)
    sys.stdin.readline()
"""


def _hidden(folder):
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def test_a_killed_writers_temporary_is_removed_when_the_file_is_written_next(tmp_path):
    target = tmp_path / "merged.safetensors"
    killed = subprocess.Popen([sys.executable, "-c", DIES_WRITING, str(target)])
    assert killed.wait() == -signal.SIGKILL
    left = _hidden(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".merged.safetensors.{killed.pid}."), "the writer's pid names it"
    assert (tmp_path / left[0]).stat().st_size == len(b"half of a large file" * 1000)
    atomic_write_text(target, "the next run")
    assert [path.name for path in tmp_path.iterdir()] == ["merged.safetensors"]


def test_a_live_writers_temporary_and_other_files_temporaries_are_left_alone(tmp_path):
    target = tmp_path / "prompts.jsonl"
    other = tmp_path / "other.jsonl"
    subprocess.run([sys.executable, "-c", DIES_WRITING, str(other)])
    other_left = _hidden(tmp_path)
    slow = subprocess.Popen([sys.executable, "-c", WRITES_WHEN_TOLD, str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert slow.stdout.readline() == "writing\n"
        live = [name for name in _hidden(tmp_path) if name not in other_left]
        assert len(live) == 1 and live[0].startswith(f".prompts.jsonl.{slow.pid}.")
        atomic_write_text(target, "from the fast writer")
        assert sorted(_hidden(tmp_path)) == sorted(other_left + live)
    finally:
        slow.communicate("\n")
    assert slow.returncode == 0 and target.read_text() == "from the slow writer"
    assert _hidden(tmp_path) == other_left

"""Atomic writes and safe names, the rules every stage's files follow."""

from __future__ import annotations

import os
import stat

import pytest

from comfyui_selma.trainer.files import atomic_open, atomic_write_json, atomic_write_text, check_name


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
    from comfyui_selma.trainer.files import atomic_path

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

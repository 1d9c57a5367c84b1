"""The training run folder: what cannot hold a run is refused before any model loads, one writer at a time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from train_helpers import CAPTIONS, one_torch_thread, tiny_config, write_dataset  # noqa: F401 (fixture)
from unwritable import read_only_folder  # noqa: F401 (fixture)

from comfyui_selma.trainer import cli
from comfyui_selma.trainer.storage.locks import LockHeldError
from comfyui_selma.trainer.train.loop import train
from comfyui_selma.trainer.train.config import CONFIG_FILE, read_config
from comfyui_selma.trainer.train.launch import absolute_paths, prepare_run_folder, run_folder_lock

CHEAP = ["--resolution", "64", "--max-train-steps", "1", "--train-batch-size", "1",
         "--gradient-accumulation-steps", "1", "--network-dim", "2"]

UNUSABLE_RUN_FOLDERS = {
    "--out that is a file": (lambda tmp_path, read_only: ["--out", str(tmp_path / "notes.txt")],
                             r"run folder: .*/notes.txt is a file; expected a folder"),
    "--out in a read-only folder": (lambda tmp_path, read_only: ["--out", str(read_only / "run")],
                                    r"run folder: cannot write in .*/read-only \(.*\); expected a folder you can "
                                    "write to"),
    "--out under a file": (lambda tmp_path, read_only: ["--out", str(tmp_path / "notes.txt" / "run")],
                           r"run folder: .*/notes.txt is a file, so .*/run cannot be written in it"),
    "--config that is a folder": (lambda tmp_path, read_only: ["--config", str(tmp_path)],
                                  r"is a folder; expected a run's config.toml file"),
}


@pytest.mark.parametrize("case", list(UNUSABLE_RUN_FOLDERS))
def test_a_run_folder_that_cannot_hold_the_run_is_refused_before_any_model_loads(case, tmp_path, tiny_sd1_folder,
                                                                                 capsys, read_only_folder):
    flags, message = UNUSABLE_RUN_FOLDERS[case]
    (tmp_path / "notes.txt").write_text("someone's notes")
    dataset = write_dataset(tmp_path / "dataset", captions=CAPTIONS[:1])
    model_flags = [] if case.startswith("--config") else ["--dataset", str(dataset), "--model", str(tiny_sd1_folder)]
    code = cli.main(["train", *model_flags, *flags(tmp_path, read_only_folder), "--cache-dir",
                     str(tmp_path / "cache"), *CHEAP])
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error
    assert re.search(message, error), error
    assert not (tmp_path / "cache").exists(), "nothing was loaded or cached"
    assert (tmp_path / "notes.txt").read_text() == "someone's notes"


HOLDS_THE_LOCK = """
import sys
from comfyui_selma.trainer.train.launch import run_folder_lock
with run_folder_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def lock_holder() -> Iterator[Callable[[Path], subprocess.Popen]]:
    """Start a process that holds a run folder's lock until the test ends (or lets it go)."""
    holders: list[subprocess.Popen] = []

    def hold(run_dir: Path) -> subprocess.Popen:
        holder = subprocess.Popen([sys.executable, "-c", HOLDS_THE_LOCK, str(run_dir)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        holders.append(holder)
        assert holder.stdout.readline() == "held\n"
        return holder

    yield hold
    for holder in holders:
        if holder.poll() is None:
            holder.communicate("\n")


def test_a_second_trainer_of_a_run_folder_is_refused_naming_the_first_and_the_run_starts_once_it_is_done(
        tmp_path, tiny_sd1_folder, capsys, lock_holder):
    dataset = write_dataset(tmp_path / "dataset", captions=CAPTIONS[:1])
    run_dir = tmp_path / "run"
    command = ["train", "--dataset", str(dataset), "--model", str(tiny_sd1_folder), "--out", str(run_dir),
               "--cache-dir", str(tmp_path / "cache"), *CHEAP]
    holder = lock_holder(run_dir)
    assert cli.main(command) == 2
    error = capsys.readouterr().err
    assert f"run: in use by process {holder.pid}" in error and "Traceback" not in error
    assert not run_dir.exists() and not (tmp_path / "cache").exists(), "nothing written, nothing loaded"
    holder.communicate("\n")
    assert cli.main(command) == 0
    assert (run_dir / "selma-expert.safetensors").is_file() and not (tmp_path / "run.lock").exists()


def test_the_trainer_process_refuses_a_run_folder_this_process_holds(tmp_path, tiny_sd1_folder):
    """What ``accelerate launch -m trainer.train.loop`` (and so the node's child) runs: ``train`` on a written config."""
    dataset = write_dataset(tmp_path / "dataset", captions=CAPTIONS[:1])
    config = absolute_paths(tiny_config(tiny_sd1_folder, dataset, tmp_path / "cache", max_train_steps=1))
    run_dir = tmp_path / "run"
    prepare_run_folder(config, run_dir)
    with run_folder_lock(run_dir):
        with pytest.raises(LockHeldError, match=f"in use by process {os.getpid()}"):
            train(read_config(run_dir / CONFIG_FILE), run_dir, echo=lambda line: None)
    assert sorted(path.name for path in run_dir.iterdir()) == [CONFIG_FILE]


def test_a_malformed_source_date_epoch_is_refused_before_any_model_loads(tmp_path, tiny_sd1_folder, capsys,
                                                                         monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")  # every saved LoRA's modelspec.date reads it
    dataset = write_dataset(tmp_path / "dataset", captions=CAPTIONS[:1])
    code = cli.main(["train", "--dataset", str(dataset), "--model", str(tiny_sd1_folder), "--out",
                     str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), *CHEAP])
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error and "SOURCE_DATE_EPOCH" in error
    assert not (tmp_path / "cache").exists(), "nothing was loaded or cached"

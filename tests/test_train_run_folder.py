"""The training run folder: what cannot hold a run is refused before any model loads, one writer at a time."""

from __future__ import annotations

import re

import pytest
from train_helpers import CAPTIONS, one_torch_thread, write_dataset  # noqa: F401 (fixture)
from unwritable import read_only_folder  # noqa: F401 (fixture)

from comfyui_selma.trainer import cli

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

"""``selma demo``: every stage runs on the embedded default and writes everything under --out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open
from unwritable import read_only_folder  # noqa: F401 (fixture)

from comfyui_selma.trainer import cli

SKILLS = ("counting", "everyday_objects")
PROMPTS_PER_SKILL = 4


def _demo(out_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "selma"), "demo", "--out", str(out_dir),
                           "--skills", ",".join(SKILLS), "--prompts-per-skill", str(PROMPTS_PER_SKILL),
                           "--training-steps", "2"], capture_output=True, text=True, cwd=out_dir.parent)


def _stage_files(out_dir: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for folder in ("prompts", "datasets", "runs") for path in
            (out_dir / folder).rglob("*") if path.is_file() and path.name != "log.jsonl"}


@pytest.mark.slow
def test_demo_runs_every_stage_under_out_ends_with_the_merged_lora_and_resumes(tmp_path):
    out_dir = tmp_path / "demo"
    first = _demo(out_dir)
    assert first.returncode == 0, first.stderr[-3000:]

    for skill in SKILLS:
        records = [json.loads(line) for line in (out_dir / "prompts" / f"{skill}.jsonl").read_text().splitlines()]
        assert len(records) == PROMPTS_PER_SKILL and {record["skill"] for record in records} == {skill}
        dataset = out_dir / "datasets" / skill
        assert len(list(dataset.glob("*.png"))) == len(list(dataset.glob("*.txt"))) == PROMPTS_PER_SKILL
        assert (out_dir / "runs" / skill / f"expert-{skill}.safetensors").is_file()

    merged_path = out_dir / "selma-multi-skill.safetensors"
    with safe_open(str(merged_path), framework="pt") as merged:
        metadata = merged.metadata()
        assert all(key.startswith("lora_unet_") for key in merged.keys())
    assert all(f"expert-{skill}" in metadata["modelspec.merged_from"] for skill in SKILLS)
    sheet = Image.open(out_dir / "contact_sheet.png")
    assert sheet.size == (64 * PROMPTS_PER_SKILL * len(SKILLS), 64)
    assert first.stdout.rstrip().splitlines()[-2] == f"merged LoRA: {merged_path}"
    assert (out_dir / "cache").is_dir(), "the trainer's caches belong under --out too"

    before = _stage_files(out_dir)
    again = _demo(out_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _stage_files(out_dir) == before


BAD_SETTINGS = {
    "no skills": (["--skills", ","], "skills: empty; expected comma-separated skill presets"),
    "an unknown skill": (["--skills", "counting,juggling"], "skills: unknown skill 'juggling'; expected presets"),
    "the custom skill": (["--skills", "custom"], "skills: unknown skill 'custom'"),
    "a skill twice": (["--skills", "counting,counting"], "skills: 'counting' is listed twice"),
    "fewer prompts than seed prompts": (["--prompts-per-skill", "2"],
                                        "prompts_per_skill: 2; expected at least 3 (the seed prompts"),
    "a resolution no VAE takes": (["--resolution", "60"], "resolution: 60; expected a positive multiple of 8"),
    "no resolution": (["--resolution", "0"], "resolution: 0; expected a positive multiple of 8"),
    "no sampling steps": (["--sampling-steps", "0"], "sampling_steps: 0; expected a whole number >= 1"),
    "no training steps": (["--training-steps", "0"], "training_steps: 0; expected a whole number >= 1"),
    "rank 0": (["--rank", "0"], "rank: 0; expected a whole number >= 1"),
    "a negative seed": (["--seed", "-1"], "seed: -1; expected a whole number from 0 to 2**63 - 1"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_a_bad_setting_is_refused_before_the_demo_makes_any_folder_or_model(case, tmp_path, capsys):
    flags, message = BAD_SETTINGS[case]
    out_dir = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out_dir), *flags]) == 2
    error = capsys.readouterr().err
    assert f"selma demo: {message}" in error and "Traceback" not in error
    assert not out_dir.exists() and list(tmp_path.iterdir()) == []


def test_an_out_folder_that_cannot_be_written_is_refused_before_anything_is_made(tmp_path, capsys, read_only_folder):
    (tmp_path / "notes.txt").write_text("someone's notes")
    for out, message in ((tmp_path / "notes.txt", "out: " + str(tmp_path / "notes.txt") + " is a file; expected a "
                                                  "folder"),
                         (read_only_folder / "demo", f"out: cannot write in {read_only_folder} (")):
        assert cli.main(["demo", "--out", str(out)]) == 2
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error
    assert (tmp_path / "notes.txt").read_text() == "someone's notes"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt", "read-only"]

"""``selma demo``: every stage runs on the embedded default and writes everything under --out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image
from safetensors import safe_open

SKILLS = ("counting", "everyday_objects")
PROMPTS_PER_SKILL = 4


def _demo(out_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "selma"), "demo", "--out", str(out_dir),
                           "--skills", ",".join(SKILLS), "--prompts-per-skill", str(PROMPTS_PER_SKILL),
                           "--training-steps", "2"], capture_output=True, text=True, cwd=out_dir.parent)


def _stage_files(out_dir: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for folder in ("prompts", "datasets", "runs") for path in
            (out_dir / folder).rglob("*") if path.is_file() and path.name != "log.jsonl"}


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

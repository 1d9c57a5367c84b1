"""``selma demo``: every built stage runs on the embedded default and writes under --out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _selma(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "selma"), *arguments], capture_output=True, text=True)


def test_demo_writes_every_stage_under_out_and_resumes(tmp_path):
    out_dir = tmp_path / "demo"
    first = _selma("demo", "--out", str(out_dir), "--skills", "counting,everyday_objects", "--prompts-per-skill", "6")
    assert first.returncode == 0, first.stderr
    for skill in ("counting", "everyday_objects"):
        records = [json.loads(line) for line in (out_dir / "prompts" / f"{skill}.jsonl").read_text().splitlines()]
        assert len(records) == 6 and {record["skill"] for record in records} == {skill}
    assert str(out_dir / "prompts" / "counting.jsonl") in first.stdout

    before = {path: path.read_bytes() for path in out_dir.rglob("*.jsonl")}
    again = _selma("demo", "--out", str(out_dir), "--skills", "counting,everyday_objects", "--prompts-per-skill", "6")
    assert again.returncode == 0, again.stderr
    assert {path: path.read_bytes() for path in out_dir.rglob("*.jsonl")} == before

"""``selma prompts generate|filter|skills``: the same engine from the command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from openai_server import MODEL, openai_server  # noqa: F401

from comfyui_selma.trainer import cli
from comfyui_selma.trainer.prompts.prompt_set import read_prompt_set
from comfyui_selma.trainer.prompts.skills import SKILLS

SELMA = Path(sys.executable).parent / "selma"


def _write_jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": prompt, "skill": "counting", "source": "llm", "max_rouge_l": 0.0})
                            + "\n" for prompt in prompts))
    return path


def test_generate_with_templates_writes_the_prompt_set_and_says_what_it_kept(tmp_path, capsys):
    output = tmp_path / "counting.jsonl"
    code = cli.main(["prompts", "generate", "--backend", "template", "--skill", "counting", "--count", "40",
                     "--out", str(output), "--quiet"])
    assert code == 0
    records = read_prompt_set(output)
    assert len(records) == 40 and {record.skill for record in records} == {"counting"}
    assert [record.source for record in records[:4]] == ["seed", "seed", "seed", "template"]
    assert f"kept 40 of 40 prompts in {output}" in capsys.readouterr().out


def test_generate_runs_as_the_installed_selma_command(tmp_path):
    output = tmp_path / "text.jsonl"
    result = subprocess.run([str(SELMA), "prompts", "generate", "--backend", "template", "--skill", "text_rendering",
                             "--count", "25", "--out", str(output)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(read_prompt_set(output)) == 25
    assert "kept 25 of 25 prompts" in result.stdout


def test_generate_a_custom_skill_from_seed_prompts_against_an_openai_endpoint(tmp_path, openai_server, monkeypatch,
                                                                             capsys):
    monkeypatch.setenv("SELMA_TEST_KEY", "sk-cli-test-key")
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("A whisk on a marble counter.\n\nA cast-iron pan on a gas stove.\n")
    output = tmp_path / "kitchen.jsonl"
    code = cli.main(["prompts", "generate", "--skill", "custom", "--description", "Photos of kitchen tools.",
                     "--seed-prompt", "A wooden spoon in a ceramic jar.", "--seeds-file", str(seeds),
                     "--backend", "openai", "--base-url", openai_server.base_url, "--model", MODEL, "--api", "chat",
                     "--api-key-env", "SELMA_TEST_KEY", "--count", "13", "--out", str(output), "--quiet"])
    assert code == 0, capsys.readouterr().err
    records = read_prompt_set(output)
    assert [record.prompt for record in records[:3]] == [
        "A wooden spoon in a ceramic jar.", "A whisk on a marble counter.", "A cast-iron pan on a gas stove."]
    assert len(records) == 13 and records[0].skill == "custom"
    assert "Photos of kitchen tools." in openai_server.requests[0]["body"]["messages"][0]["content"]
    assert "tokens: 50 prompt + 200 completion" in capsys.readouterr().out


def test_generate_exits_2_when_the_request_budget_runs_out(tmp_path, capsys):
    code = cli.main(["prompts", "generate", "--backend", "template", "--count", "500", "--max-requests", "2",
                     "--out", str(tmp_path / "objects.jsonl"), "--quiet"])
    assert code == 2
    assert "request budget spent: 2 of max_requests=2 requests reached 43 of 500 prompts" in capsys.readouterr().out


@pytest.mark.parametrize("arguments, message", [
    (["--threshold", "0"], r"threshold: 0\.0 is outside \(0, 1\]"),
    (["--threshold", "1.5"], r"threshold: 1\.5 is outside \(0, 1\]"),
    (["--skill", "custom", "--description", "Tools.", "--seed-prompt", "a", "--seed-prompt", "b"],
     r"seeds: 2 seed prompt\(s\) given for skill 'custom'; expected at least 3"),
    (["--skill", "custom", "--seed-prompt", "a", "--seed-prompt", "b", "--seed-prompt", "c"],
     r"skill 'custom' needs a description"),
    (["--skill", "custom", "--description", "Tools.", "--seed-prompt", "a", "--seed-prompt", "b", "--seed-prompt", "c"],
     r"backend 'template' writes prompts for the preset skills only"),
    (["--count", "0"], r"count: 0; expected a whole number >= 1"),
    (["--count", "2"], r"count: 2 is fewer than the 3 seed prompts"),
    (["--seeds-file", "/nonexistent/seeds.txt"], r"--seeds-file: cannot read"),
])
def test_generate_refuses_bad_settings_with_a_clear_message_and_writes_nothing(tmp_path, capsys, arguments, message):
    output = tmp_path / "objects.jsonl"
    code = cli.main(["prompts", "generate", "--backend", "template", "--out", str(output), "--quiet", *arguments])
    error = capsys.readouterr().err
    assert code == 1 and error.startswith("selma prompts generate: error: ")
    assert re.search(message, error), error
    assert not output.exists()


def test_an_unknown_skill_is_refused_listing_the_known_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prompts", "generate", "--skill", "juggling", "--out", str(tmp_path / "x.jsonl")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'juggling'" in error
    assert all(name in error for name in SKILLS)


def test_filter_keeps_lines_in_file_order_and_recomputes_max_rouge_l(tmp_path, capsys):
    source = _write_jsonl(tmp_path / "in.jsonl", [
        "Two red apples on a wooden table.",
        "Two red apples on a wooden table!",  # duplicate
        "Two green apples on a wooden table.",  # similar (6 of 7 tokens)
        "A single lantern above a doorway.",
        "",  # empty
        "Three photos of the benchmark prompt here.",  # blocklisted
    ])
    blocklist = tmp_path / "benchmark.txt"
    blocklist.write_text("three photos of the benchmark prompt\n")
    output = tmp_path / "out.jsonl"
    code = cli.main(["prompts", "filter", str(source), "--out", str(output), "--blocklist", str(blocklist)])
    assert code == 0
    kept = [json.loads(line) for line in output.read_text().splitlines()]
    assert [record["prompt"] for record in kept] == ["Two red apples on a wooden table.",
                                                     "A single lantern above a doorway."]
    assert kept[0]["max_rouge_l"] == 0.0 and 0 < kept[1]["max_rouge_l"] < 0.5
    assert kept[0]["skill"] == "counting" and kept[0]["source"] == "llm"
    out = capsys.readouterr().out
    assert "kept 2 of 6 prompts" in out and "duplicate 1" in out and "similar 1" in out and "empty 1" in out
    assert "blocklisted 1" in out


def test_filter_with_a_lower_threshold_keeps_fewer(tmp_path):
    prompts = [f"A {colour} kite above a {place}." for colour in ("red", "blue", "green")
               for place in ("beach", "lighthouse", "field")]
    source = _write_jsonl(tmp_path / "in.jsonl", prompts)
    counts = {}
    for threshold in ("0.8", "0.5"):
        output = tmp_path / f"out-{threshold}.jsonl"
        assert cli.main(["prompts", "filter", str(source), "--out", str(output), "--threshold", threshold]) == 0
        counts[threshold] = len(output.read_text().splitlines())
    assert counts["0.8"] > counts["0.5"] >= 1


@pytest.mark.parametrize("text, line", [
    ('{"prompt": "a cat"}\n{"prompt": oops}\n{"prompt": "a dog"}\n', 2),
    # A torn last line without its newline is reported like any other, never silently dropped.
    ('{"prompt": "a cat"}\n{"prompt": "a dog"}\n{"prompt": "a bird", "sk', 3),
])
def test_filter_names_the_file_and_line_of_a_malformed_line(tmp_path, capsys, text, line):
    source = tmp_path / "in.jsonl"
    source.write_text(text)
    output = tmp_path / "out.jsonl"
    assert cli.main(["prompts", "filter", str(source), "--out", str(output)]) == 1
    assert f"{source}:{line}: not valid JSON" in capsys.readouterr().err
    assert not output.exists()


def test_filter_refuses_a_threshold_outside_zero_to_one(tmp_path, capsys):
    source = _write_jsonl(tmp_path / "in.jsonl", ["a cat"])
    assert cli.main(["prompts", "filter", str(source), "--out", str(tmp_path / "o.jsonl"), "--threshold", "0"]) == 1
    assert "threshold: 0.0 is outside (0, 1]" in capsys.readouterr().err


def test_skills_lists_every_preset_and_custom(capsys):
    assert cli.main(["prompts", "skills"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}: " in out for name in SKILLS) and "custom:" in out

"""Files a slip must not destroy: a file that is not a prompt set, filter's input, damaged lines, a second writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from comfyui_selma.trainer import cli
from comfyui_selma.trainer.prompts.prompt_set import PromptRecord, PromptSetWriter, read_prompt_set
from comfyui_selma.trainer.prompts.generate import PromptConfig, expand_prompts, summary_path_for


def _generate(*arguments: str) -> int:
    return cli.main(["prompts", "generate", "--backend", "template", "--quiet", *arguments])


def _config(**overrides) -> PromptConfig:
    settings = dict(backend="template", skill="counting", count=40, seed=3)
    settings.update(overrides)
    return PromptConfig(**settings)


# --- generate never overwrites what is not a prompt set ------------------------------------------------


@pytest.mark.parametrize("content", [b"my notes for tomorrow", b"first line\nsecond line", b'{"prompt": "x"}'])
def test_generate_refuses_an_existing_file_that_is_not_a_prompt_set_and_leaves_it_alone(tmp_path, capsys, content):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(content)
    assert _generate("--out", str(notes)) == 1
    error = capsys.readouterr().err
    assert f"{notes}:" in error and "my notes" not in error and "second line" not in error
    assert notes.read_bytes() == content
    assert not summary_path_for(notes).exists()


def test_generate_refuses_to_replace_a_file_at_the_summary_path_that_is_not_a_summary(tmp_path, capsys):
    output = tmp_path / "notes.jsonl"
    other = summary_path_for(output)
    other.write_text("my own notes.summary.json, not written by selma\n")
    assert _generate("--out", str(output)) == 1
    assert f"{other}: not a prompt-run summary" in capsys.readouterr().err
    assert other.read_text() == "my own notes.summary.json, not written by selma\n" and not output.exists()


def test_a_damaged_last_line_without_a_newline_is_reported_by_file_and_line_and_nothing_changes(tmp_path, capsys):
    output = tmp_path / "objects.jsonl"
    expand_prompts(_config(count=20), output)
    output.write_bytes(output.read_bytes()[:-25])
    before = output.read_bytes()
    assert _generate("--skill", "counting", "--seed", "3", "--count", "30", "--out", str(output)) == 1
    assert f"{output}:20: not valid JSON" in capsys.readouterr().err
    assert output.read_bytes() == before


def test_a_whole_last_line_without_a_newline_is_continued(tmp_path):
    output = tmp_path / "objects.jsonl"
    expand_prompts(_config(count=20), output)
    output.write_bytes(output.read_bytes()[:-1])
    first = read_prompt_set(output)
    expand_prompts(_config(count=30), output)
    records = read_prompt_set(output)
    assert len(records) == len({record.prompt for record in records}) == 30 and records[:20] == first
    assert output.read_bytes().endswith(b"}\n")


def _reference(tmp_path, **overrides):
    path = tmp_path / "reference.jsonl"
    expand_prompts(_config(**overrides), path)
    return path


def test_a_failed_write_leaves_no_partial_line(tmp_path, monkeypatch):
    output = tmp_path / "objects.jsonl"
    writer = PromptSetWriter(output)
    writer.write(PromptRecord("Two cats on a sofa.", "counting", "seed", 0.0))
    real_write = os.write

    def disk_full_halfway(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full_halfway)
    with pytest.raises(OSError, match="No space left"):
        writer.write(PromptRecord("Three dogs in a field.", "counting", "llm", 0.2))
    monkeypatch.setattr(os, "write", real_write)
    writer.close()
    assert [record.prompt for record in read_prompt_set(output)] == ["Two cats on a sofa."]


# --- filter never overwrites its input; every malformed line is reported --------------------------------


def _prompt_file(path, prompts):
    path.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in prompts))
    return path


@pytest.mark.parametrize("spelling", ["same", "relative", "symlink"])
def test_filter_refuses_to_write_over_its_input(tmp_path, capsys, monkeypatch, spelling):
    source = _prompt_file(tmp_path / "set.jsonl", ["a cat", "a cat!", "a dog"])
    before = source.read_bytes()
    monkeypatch.chdir(tmp_path)
    output = {"same": str(source), "relative": "./sub/../set.jsonl", "symlink": str(tmp_path / "link.jsonl")}[spelling]
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.jsonl").symlink_to(source)
    assert cli.main(["prompts", "filter", str(source), "--out", output]) == 1
    assert "is also the input" in capsys.readouterr().err
    assert source.read_bytes() == before


# --- settings that cannot work are refused before anything runs ------------------------------------------


def test_an_empty_seeds_file_is_refused_rather_than_replaced_by_the_presets_seeds(tmp_path, capsys):
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("\n  \n")
    output = tmp_path / "x.jsonl"
    assert _generate("--seeds-file", str(seeds), "--out", str(output)) == 1
    assert f"--seeds-file: {seeds} holds no seed prompts" in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "nan", "temperature: nan; expected a number >= 0"),
    ("--temperature", "inf", "temperature: inf; expected a number >= 0"),
    ("--temperature", "-1", "temperature: -1.0; expected a number >= 0"),
    ("--top-p", "nan", r"top_p: nan; expected a number in \(0, 1\]"),
    ("--request-timeout", "inf", "request_timeout: inf; expected seconds > 0"),
    ("--request-timeout", "nan", "request_timeout: nan; expected seconds > 0"),
    ("--threshold", "nan", r"threshold: nan is outside \(0, 1\]"),
])
def test_non_finite_numbers_are_refused_with_the_setting_named(tmp_path, capsys, flag, value, message):
    import re

    output = tmp_path / "x.jsonl"
    assert _generate(flag, value, "--out", str(output)) == 1
    error = capsys.readouterr().err
    assert re.search(message, error) and "Traceback" not in error, error
    assert not output.exists()


# --- continuing checks that the same settings made the set -----------------------------------------------


@pytest.mark.parametrize("change, named", [
    (dict(threshold=0.7), "threshold 0.8 -> 0.7"),
    (dict(seed=4), "seed 3 -> 4"),
    (dict(backend="openai", base_url="http://127.0.0.1:9/v1", model="m"), "backend 'template' -> 'openai'"),
    (dict(max_words=12), "max_words 30 -> 12"),
    (dict(seeds=["One red kite.", "Two blue boats.", "Three green cups."]), "seeds differ"),
])
def test_continuing_with_other_settings_is_refused_naming_what_differs(tmp_path, change, named):
    output = tmp_path / "objects.jsonl"
    expand_prompts(_config(count=20), output)
    before = output.read_bytes()
    with pytest.raises(ValueError, match="made with other settings") as error:
        expand_prompts(_config(count=30, **change), output)
    assert named in str(error.value) and "nothing was changed" in str(error.value)
    assert output.read_bytes() == before


def test_a_blocklist_added_when_continuing_is_refused_not_silently_skipped(tmp_path):
    output = tmp_path / "objects.jsonl"
    expand_prompts(_config(count=20), output)
    kept = [record.prompt for record in read_prompt_set(output)]
    blocklist = tmp_path / "eval.txt"
    blocklist.write_text(kept[7] + "\n")
    before = output.read_bytes()
    with pytest.raises(ValueError, match=r"blocklist none -> .*eval\.txt \(1 prompt\)") as error:
        expand_prompts(_config(count=30, blocklist=str(blocklist)), output)
    assert kept[7] not in str(error.value)
    assert output.read_bytes() == before


def test_raising_count_and_max_requests_still_continues(tmp_path):
    output = tmp_path / "objects.jsonl"
    assert not expand_prompts(_config(count=40, max_requests=1), output).reached_target
    summary = expand_prompts(_config(count=40, max_requests=10, max_retries=1, request_timeout=9.0), output)
    assert summary.reached_target
    assert read_prompt_set(output) == read_prompt_set(_reference(tmp_path, count=40))
    assert expand_prompts(_config(count=60), output).kept == 60


def test_a_set_without_recorded_settings_is_checked_against_the_blocklist_before_it_continues(tmp_path):
    output = tmp_path / "objects.jsonl"
    expand_prompts(_config(count=20), output)
    summary_path_for(output).unlink()  # e.g. the output of `selma prompts filter`, or a set from an older version
    kept = [record.prompt for record in read_prompt_set(output)]
    blocklist = tmp_path / "eval.txt"
    blocklist.write_text("unrelated\n" + kept[11] + "\n")
    before = output.read_bytes()
    with pytest.raises(ValueError, match=r"objects\.jsonl: 1 kept prompt \(line 12\) has ROUGE-L above 0\.8 against "
                                         r"the blocklist .*eval\.txt \(line 2\)") as error:
        expand_prompts(_config(count=30, blocklist=str(blocklist)), output)
    assert kept[11] not in str(error.value)
    assert output.read_bytes() == before

    blocklist.write_text("A photo of an astronaut riding a horse on the moon.\n")
    summary = expand_prompts(_config(count=30, blocklist=str(blocklist)), output)
    assert summary.kept == 30
    assert json.loads(summary_path_for(output).read_text())["settings"]["blocklist"]["prompts"] == 1


# --- one writer at a time -----------------------------------------------------------------------------------


def test_a_second_writer_of_the_same_prompt_set_is_refused_with_the_first_ones_pid(tmp_path, capsys):
    output = tmp_path / "objects.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from comfyui_selma.trainer.storage.locks import exclusive_lock
        with exclusive_lock({str(output)!r}):
            print("held", flush=True)
            sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _generate("--out", str(output)) == 1
        assert f"in use by process {holder.pid}" in capsys.readouterr().err
        assert not output.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert _generate("--count", "10", "--out", str(output)) == 0


def test_a_blocklist_is_applied_to_a_set_by_filtering_it_into_a_new_file_and_continuing_that(tmp_path):
    output = tmp_path / "objects.jsonl"
    expand_prompts(_config(count=30), output)
    kept = [record.prompt for record in read_prompt_set(output)]
    blocklist = tmp_path / "eval.txt"
    blocklist.write_text(kept[9] + "\n" + kept[20] + "\n")
    filtered = tmp_path / "filtered.jsonl"
    assert cli.main(["prompts", "filter", str(output), "--blocklist", str(blocklist), "--out", str(filtered)]) == 0
    summary = expand_prompts(_config(count=40, blocklist=str(blocklist)), filtered)
    prompts = [record.prompt for record in read_prompt_set(filtered)]
    assert summary.reached_target and len(prompts) == 40
    assert kept[9] not in prompts and kept[20] not in prompts
    assert expand_prompts(_config(count=45, blocklist=str(blocklist)), filtered).kept == 45  # settings now recorded

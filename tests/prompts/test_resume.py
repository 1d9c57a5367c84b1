"""A prompt run that stops — cancelled, out of budget, killed — continues to the same file.

A damaged last line, other settings and a second writer are specified in ``test_prompts_files.py``.
"""

from __future__ import annotations

import json

import pytest

from comfyui_selma.trainer.prompts.prompt_set import PromptSetError, read_prompt_set
from comfyui_selma.trainer.prompts.generate import PromptConfig, expand_prompts, summary_path_for


class Cancelled(Exception):
    pass


def _config(**overrides) -> PromptConfig:
    settings = dict(backend="template", skill="commonsense_defying", count=150, seed=4)
    settings.update(overrides)
    return PromptConfig(**settings)


def _cancel_after(reports: int):
    seen = []

    def progress(update) -> None:
        seen.append(update)
        if len(seen) == reports:
            raise Cancelled()
    return progress, seen


def test_interrupted_then_rerun_ends_with_the_same_file_as_an_uninterrupted_run(tmp_path):
    uninterrupted = tmp_path / "whole.jsonl"
    expand_prompts(_config(), uninterrupted)

    resumed = tmp_path / "resumed.jsonl"
    for reports in (2, 3):  # cancelled twice, between requests
        progress, seen = _cancel_after(reports)
        with pytest.raises(Cancelled):
            expand_prompts(_config(), resumed, progress=progress)
        assert len(read_prompt_set(resumed)) == seen[-1].kept < 150
    summary = expand_prompts(_config(), resumed)

    assert resumed.read_bytes() == uninterrupted.read_bytes()
    whole_summary = json.loads(summary_path_for(uninterrupted).read_text())
    resumed_summary = json.loads(summary_path_for(resumed).read_text())
    assert {**resumed_summary, "path": ""} == {**whole_summary, "path": ""}
    assert summary.kept == 150 and summary.reached_target


@pytest.mark.parametrize("damage, message", [
    (lambda lines: lines[:5] + ["{not json"] + lines[5:], r":6: not valid JSON"),
    (lambda lines: lines[:2] + [""] + lines[2:], r":3: empty line"),
    (lambda lines: lines[:4] + ['["a list"]'] + lines[4:], r":5: expected a JSON object"),
    (lambda lines: lines[:1] + ['{"prompt": "", "skill": "commonsense_defying", "source": "llm", "max_rouge_l": 0}']
     + lines[1:], r":2: field 'prompt' is empty"),
    (lambda lines: lines[:3] + ['{"prompt": "x", "skill": "commonsense_defying", "source": "gpt", "max_rouge_l": 0}']
     + lines[3:], r":4: field 'source' is missing or unknown; expected one of seed, llm, template"),
])
def test_a_damaged_line_before_the_end_is_an_error_naming_file_and_line_and_nothing_is_changed(tmp_path, damage,
                                                                                              message):
    output = tmp_path / "objects.jsonl"
    expand_prompts(_config(count=10), output)
    output.write_text("\n".join(damage(output.read_text().splitlines())) + "\n")
    before = output.read_bytes()
    with pytest.raises(PromptSetError, match=str(output).replace(".", r"\.") + message):
        expand_prompts(_config(count=20), output)
    assert output.read_bytes() == before


def test_continuing_a_file_of_another_skill_is_refused(tmp_path):
    output = tmp_path / "objects.jsonl"
    expand_prompts(_config(count=10), output)
    with pytest.raises(PromptSetError, match="holds prompts of skill 'commonsense_defying', not 'counting'"):
        expand_prompts(_config(count=20, skill="counting"), output)


def test_a_spent_request_budget_continues_when_it_is_raised(tmp_path):
    output = tmp_path / "objects.jsonl"
    first = expand_prompts(_config(count=100, max_requests=2), output)
    assert not first.reached_target and first.requests == 2
    again = expand_prompts(_config(count=100, max_requests=2), output)
    assert again.requests == 2 and again.kept == first.kept  # the budget counts over resumed runs
    final = expand_prompts(_config(count=100, max_requests=50), output)
    assert final.reached_target and len(read_prompt_set(output)) == 100
    assert read_prompt_set(output) == read_prompt_set(_uninterrupted(tmp_path, count=100))


def _uninterrupted(tmp_path, **overrides):
    path = tmp_path / "reference.jsonl"
    expand_prompts(_config(**overrides), path)
    return path


class NoRequests:
    source = "template"

    def complete(self, request: str, next_number: int, request_index: int):
        raise AssertionError("a finished set must not make a request")

    def close(self) -> None:
        pass


def test_a_finished_set_is_returned_without_requests(tmp_path):
    output = tmp_path / "objects.jsonl"
    expand_prompts(_config(count=30), output)
    before = output.read_bytes()
    summary = expand_prompts(_config(count=30), output, backend=NoRequests())
    assert summary.reached_target and output.read_bytes() == before

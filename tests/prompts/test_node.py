"""The SELMA Skill Prompts node: outputs, progress, cancel and re-queue, and a key that stays in the environment.

What a workflow may make the node do with keys and files is specified in ``test_prompts_security.py``.
"""

from __future__ import annotations

import json

import pytest
from comfy_standins import InterruptProcessingException
from openai_server import MODEL, openai_server, status  # noqa: F401

import comfyui_selma
from comfyui_selma.nodes.prompts import SelmaSkillPrompts
from comfyui_selma.trainer.prompts.prompt_set import PromptSet, read_prompt_set

KEY = "sk-node-secret-9f8e7d6c5b4a3210"


def _inputs(**overrides) -> dict:
    """Widget values as a saved workflow holds them (hidden unique_id comes from ComfyUI, not the workflow)."""
    values = {name: spec[1].get("default") for section in ("required", "optional")
              for name, spec in SelmaSkillPrompts.INPUT_TYPES()[section].items()}
    values["skill"] = "counting"
    values["backend"] = "template"
    values["count"] = 60
    values.update(overrides)
    return values


def _run(**overrides):
    return SelmaSkillPrompts().generate(**_inputs(**overrides), unique_id="7")


def test_node_is_registered_with_its_display_name_and_category():
    assert comfyui_selma.NODE_CLASS_MAPPINGS["SelmaSkillPrompts"] is SelmaSkillPrompts
    assert comfyui_selma.NODE_DISPLAY_NAME_MAPPINGS["SelmaSkillPrompts"] == "SELMA Skill Prompts"
    assert SelmaSkillPrompts.CATEGORY == "SELMA/1 prompts"
    assert SelmaSkillPrompts.RETURN_TYPES == ("SELMA_PROMPTS", "STRING")
    assert len(SelmaSkillPrompts.OUTPUT_TOOLTIPS) == len(SelmaSkillPrompts.RETURN_TYPES)


def test_the_seed_widget_gets_no_randomising_control_and_no_widget_is_for_a_key():
    inputs = SelmaSkillPrompts.INPUT_TYPES()
    assert inputs["required"]["seed"][1]["control_after_generate"] is False
    assert inputs["required"]["base_url"][1]["default"] == "openai"  # the built-in endpoint, with its own key
    assert inputs["required"]["api_key_env"][1]["default"] == ""
    widget_names = set(inputs["required"]) | set(inputs["optional"])
    assert not {name for name in widget_names if "key" in name} - {"api_key_env"}


def test_node_writes_the_prompt_set_under_the_output_folder_and_outputs_it(comfy):
    prompt_set, path = _run()
    assert path == str(comfy.output_dir / "selma" / "prompts" / "counting.jsonl")
    assert isinstance(prompt_set, PromptSet) and prompt_set.skill == "counting" and prompt_set.path == path
    assert len(prompt_set) == 60
    assert list(prompt_set.prompts) == [record.prompt for record in read_prompt_set(path)]


def test_progress_shows_kept_of_target_and_events_carry_the_latest_prompts(comfy):
    _run(count=50)
    assert comfy.progress[0] == (3, 50) and comfy.progress[-1] == (50, 50)
    kept = [value for value, _ in comfy.progress]
    assert kept == sorted(kept)
    updates = [data for event, data in comfy.events if event == "selma.prompts" and not data.get("done")]
    assert updates[-1]["kept"] == 50 and updates[-1]["target"] == 50 and updates[-1]["node"] == "7"
    assert updates[-1]["latest"] and set(updates[-1]["latest"]) <= set(read_prompt_set(
        comfy.output_dir / "selma" / "prompts" / "counting.jsonl")[i].prompt for i in range(50))
    (done,) = [data for event, data in comfy.events if data.get("done")]
    assert done["kept"] == 50 and done["reached_target"] and set(done["rejected"]) == {
        "empty", "too_long", "duplicate", "blocklisted", "similar"}


def test_cancel_keeps_accepted_prompts_and_a_requeue_continues_to_the_uninterrupted_result(comfy):
    comfy.cancel_after_updates = 3
    with pytest.raises(InterruptProcessingException):
        _run(count=80, name="cancelled")
    path = comfy.output_dir / "selma" / "prompts" / "cancelled.jsonl"
    kept_when_cancelled = len(read_prompt_set(path))
    assert 3 < kept_when_cancelled < 80

    comfy.cancel_after_updates = None
    prompt_set, _ = _run(count=80, name="cancelled")
    assert len(prompt_set) == 80
    reference, _ = _run(count=80, name="uninterrupted")
    assert prompt_set.prompts == reference.prompts


def _configure_endpoint(comfy, base_url: str, api_key_env: str) -> None:
    """What the server's owner does: bind a key variable to an endpoint in ComfyUI/user/selma/endpoints.toml."""
    settings = comfy.base_dir / "user" / "selma" / "endpoints.toml"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(f'[endpoints.local]\nbase_url = "{base_url}"\napi_key_env = "{api_key_env}"\n')


def test_the_key_from_the_environment_is_used_but_never_written_anywhere(comfy, openai_server, monkeypatch):
    monkeypatch.setenv("SELMA_NODE_KEY", KEY)
    _configure_endpoint(comfy, openai_server.base_url, "SELMA_NODE_KEY")
    widgets = _inputs(skill="everyday_objects", backend="openai", base_url="local", model=MODEL,
                      api="chat", api_key_env="", count=45, name="objects")
    prompt_set, path = SelmaSkillPrompts().generate(**widgets, unique_id="3")
    assert len(prompt_set) == 45
    assert all(request["headers"]["authorization"] == f"Bearer {KEY}" for request in openai_server.requests)

    workflow = json.dumps({"3": {"class_type": "SelmaSkillPrompts", "inputs": widgets}})  # what a saved graph holds
    assert KEY not in workflow
    assert KEY not in json.dumps(comfy.events)
    written = [file for file in comfy.base_dir.rglob("*") if file.is_file()]
    assert any(file.suffix == ".jsonl" for file in written) and any(file.name.endswith(".summary.json")
                                                                     for file in written)
    for file in written:
        assert KEY.encode() not in file.read_bytes(), f"{file} holds the key"


def test_a_refused_key_fails_without_showing_it_and_keeps_the_seeds(comfy, openai_server, monkeypatch):
    monkeypatch.setenv("SELMA_NODE_KEY", KEY)
    _configure_endpoint(comfy, openai_server.base_url, "SELMA_NODE_KEY")
    openai_server.script = [status(401, f"Incorrect API key provided: {KEY}")]
    with pytest.raises(Exception) as error:
        _run(skill="everyday_objects", backend="openai", base_url="local", model=MODEL, api="chat",
             api_key_env="", name="refused")
    assert KEY not in str(error.value) and "SELMA_NODE_KEY" in str(error.value)
    assert len(read_prompt_set(comfy.output_dir / "selma" / "prompts" / "refused.jsonl")) == 3


def test_a_custom_skill_takes_its_description_and_seeds_from_multiline_widgets(comfy, openai_server):
    prompt_set, _ = _run(skill="custom", backend="openai", base_url=openai_server.base_url, model=MODEL, api="chat",
                         api_key_env="", count=10, name="tools",
                         description="Photos of garden tools.", seeds="A rake.\n\nA spade in soil.\nA hose reel.\n")
    assert prompt_set.skill == "custom" and prompt_set.prompts[:3] == ("A rake.", "A spade in soil.", "A hose reel.")
    assert "Photos of garden tools." in openai_server.requests[0]["body"]["messages"][0]["content"]


@pytest.mark.parametrize("overrides, message", [
    ({"name": "../escape"}, "name: '../escape' is not a plain name"),
    ({"name": "sub/dir"}, "name: 'sub/dir' is not a plain name"),
    ({"threshold": 0.0}, r"threshold: 0\.0 is outside \(0, 1\]"),
    ({"skill": "custom", "description": "Tools.", "seeds": "one\ntwo"}, "expected at least 3"),
    ({"skill": "juggling"}, "unknown skill 'juggling'; known skills: everyday_objects, paragraph_captions"),
    ({"backend": "openai", "api_key_env": "sk-pasted-key-material"}, "NAME of an environment variable"),
])
def test_bad_widget_values_are_clear_errors_and_write_nothing(comfy, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        _run(**overrides)
    assert "pasted-key-material" not in str(error.value)
    assert not list(comfy.output_dir.rglob("*.jsonl"))


def test_an_empty_name_uses_the_skill_name_and_a_jsonl_suffix_is_not_doubled(comfy):
    _, default_path = _run(count=10, name="")
    _, named_path = _run(count=10, name="mine.jsonl")
    assert default_path.endswith("/selma/prompts/counting.jsonl") and named_path.endswith("/selma/prompts/mine.jsonl")

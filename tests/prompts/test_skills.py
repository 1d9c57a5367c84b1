"""Skill presets, the request text, reply parsing and the offline template writer."""

from __future__ import annotations

import re

import pytest

from comfyui_selma.trainer.backends.llm import parse_numbered_list
from comfyui_selma.trainer.prompts.filter import PromptFilter
from comfyui_selma.trainer.prompts.skills import SKILLS, get_skill, request_text, skill_names
from comfyui_selma.trainer.backends.templates import template_prompts

PAPER_SKILLS = {"everyday_objects", "paragraph_captions", "detailed_prompts", "counting", "commonsense_defying"}
COUNTS_ABOVE_THREE = re.compile(r"\b(four|five|six|seven|eight|nine|ten|eleven|twelve|dozen|[4-9]|\d{2,})\b", re.I)


def test_the_five_selma_skills_and_three_evaluation_skills_are_presets():
    assert set(SKILLS) == PAPER_SKILLS | {"spatial_relations", "attribute_binding", "text_rendering"}
    assert skill_names()[-1] == "custom"


@pytest.mark.parametrize("name", sorted(SKILLS))
def test_each_preset_has_three_distinct_seeds_within_its_word_limit(name):
    skill = SKILLS[name]
    assert len(skill.seeds) == 3 == len(set(skill.seeds))
    assert all(len(seed.split()) <= skill.max_words for seed in skill.seeds)
    assert all(verdict.accepted for verdict in PromptFilter(0.8).consider_many(list(skill.seeds)))


def test_counting_never_asks_for_or_writes_counts_above_three():
    skill = SKILLS["counting"]
    assert "never more than three" in skill.instruction(20)
    assert not any(COUNTS_ABOVE_THREE.search(seed) for seed in skill.seeds)
    written = [prompt for request in range(30) for prompt in template_prompts("counting", 0, request, 20)]
    assert not [prompt for prompt in written if COUNTS_ABOVE_THREE.search(prompt)]


def test_a_request_shows_the_instruction_then_the_examples_numbered_from_one():
    skill = SKILLS["text_rendering"]
    text = request_text(skill, ["ex one", "ex two", "ex three"], 20)
    assert text.startswith("Write 20 new, diverse image descriptions")
    assert "legible text" in text and "at most 30 words" in text
    assert text.endswith("Examples:\n1. ex one\n2. ex two\n3. ex three\n")


def test_a_custom_skill_needs_a_description_and_at_least_three_distinct_seeds():
    skill = get_skill("custom", "Photos of garden tools.", ["a rake", " ", "a spade", "a hose"])
    assert skill.seeds == ("a rake", "a spade", "a hose") and skill.max_words == 0
    assert "Photos of garden tools." in skill.instruction(20)
    with pytest.raises(ValueError, match="needs a description"):
        get_skill("custom", "  ", ["a", "b", "c"])
    with pytest.raises(ValueError, match="2 seed prompt"):
        get_skill("custom", "Tools.", ["a", "b"])
    with pytest.raises(ValueError, match="repeat a prompt"):
        get_skill("custom", "Tools.", ["a", "b", "a"])


def test_seeds_given_with_a_preset_replace_its_own():
    assert get_skill("counting", seeds=["one cup", "two cups", "three cups"]).seeds == ("one cup", "two cups",
                                                                                       "three cups")
    with pytest.raises(ValueError, match="at least 3"):
        get_skill("counting", seeds=["one cup"])


def test_an_unknown_skill_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown skill 'juggling'; known skills: everyday_objects, .*, custom"):
        get_skill("juggling")


def test_numbered_replies_parse_in_the_styles_llms_write():
    reply = ("Sure! Here are 20 more:\n4. A heron on a post.\n5) \"Two trams in snow.\"\n**6.** A quilt.\n"
             "  7.   A kite  \n8.\nThis line has no number.\n3.5 is not an item\n")
    assert parse_numbered_list(reply) == ["A heron on a post.", "Two trams in snow.", "A quilt.", "A kite", ""]
    assert parse_numbered_list("I cannot help with that.") == []


@pytest.mark.parametrize("name", sorted(SKILLS))
def test_the_template_writer_is_deterministic_and_reaches_a_thousand_diverse_prompts(name):
    assert template_prompts(name, 3, 7, 20) == template_prompts(name, 3, 7, 20)
    assert template_prompts(name, 3, 7, 20) != template_prompts(name, 3, 8, 20)
    prompt_filter = PromptFilter(0.8, max_words=SKILLS[name].max_words)
    for seed in SKILLS[name].seeds:
        prompt_filter.keep(seed)
    request = 0
    while prompt_filter.kept_count < 1000 and request < 120:
        prompt_filter.consider_many(template_prompts(name, 0, request, 20),
                                    accept_at_most=1000 - prompt_filter.kept_count)
        request += 1
    assert prompt_filter.kept_count == 1000, dict(prompt_filter.rejected)


def test_the_template_writer_refuses_a_custom_skill():
    with pytest.raises(ValueError, match="preset skills only"):
        template_prompts("custom", 0, 0, 20)

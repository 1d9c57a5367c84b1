"""Prompt expansion against a real HTTP server on loopback that speaks the OpenAI API."""

from __future__ import annotations

import json
import re
import socket

import pytest
from openai_server import MODEL, fresh_prompts, junk, numbered, openai_server, reply, stall, status  # noqa: F401

from comfyui_selma.trainer.backends.llm import LLMError, api_key_from_environment
from comfyui_selma.trainer.prompts.prompt_set import read_prompt_set
from comfyui_selma.trainer.prompts.generate import PromptConfig, expand_prompts, summary_path_for
from comfyui_selma.trainer.prompts.skills import SKILLS

KEY = "sk-selma-test-0123456789abcdef"
SEEDS = SKILLS["everyday_objects"].seeds


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("SELMA_TEST_KEY", KEY)


def _config(server, **overrides) -> PromptConfig:
    settings = dict(backend="openai", base_url=server.base_url, model=MODEL, api="chat", api_key_env="SELMA_TEST_KEY",
                    count=43, max_retries=2, request_timeout=5.0)
    settings.update(overrides)
    return PromptConfig(**settings)


def _examples_in(request_body: dict) -> list[str]:
    text = request_body["messages"][0]["content"] if "messages" in request_body else request_body["prompt"]
    return re.findall(r"^\d+\. (.+)$", text.split("Examples:\n", 1)[1], flags=re.MULTILINE)


@pytest.mark.slow
def test_chat_run_keeps_count_prompts_written_by_the_llm_and_adds_up_reported_tokens(openai_server, tmp_path):
    output = tmp_path / "objects.jsonl"
    summary = expand_prompts(_config(openai_server), output)
    records = read_prompt_set(output)
    assert len(records) == 43 and summary.kept == 43 and summary.reached_target
    assert [record.source for record in records] == ["seed"] * 3 + ["llm"] * 40
    assert [record.prompt for record in records[:3]] == list(SEEDS)
    assert records[3].prompt == fresh_prompts(0)[0]
    assert summary.requests == 2
    assert (summary.prompt_tokens, summary.completion_tokens) == (100, 400)
    assert json.loads(summary_path_for(output).read_text())["requests"] == 2
    assert all(request["headers"]["authorization"] == f"Bearer {KEY}" for request in openai_server.requests)


def test_each_request_shows_the_instruction_and_three_examples_sampled_from_all_kept_prompts(openai_server,
                                                                                             tmp_path):
    output = tmp_path / "objects.jsonl"
    expand_prompts(_config(openai_server, count=200, prompts_per_request=20), output)
    bodies = [request["body"] for request in openai_server.requests]
    assert len(bodies) >= 10
    for body in bodies:
        text = body["messages"][0]["content"]
        assert text.startswith("Write 20 new, diverse image descriptions")
        assert "at most 30 words" in text
        assert len(_examples_in(body)) == 3
        assert body["temperature"] == 1.0 and body["top_p"] == 1.0 and body["model"] == MODEL
    later_examples = {example for body in bodies[3:] for example in _examples_in(body)}
    assert later_examples - set(SEEDS), "examples must come from every kept prompt, not only the seeds"
    kept = {record.prompt for record in read_prompt_set(output)}
    assert later_examples <= kept


def test_completions_api_continues_the_numbered_list_of_examples(openai_server, tmp_path):
    # a completion model continues after "4." without repeating it
    openai_server.script = [reply(" A heron on a frozen lake.\n5. Two trams in a snowy square.\n6. A quilt on a "
                                  "washing line.")]
    output = tmp_path / "objects.jsonl"
    expand_prompts(_config(openai_server, api="completions", count=6), output)
    (request,) = openai_server.requests
    assert request["path"] == "/v1/completions"
    assert request["body"]["prompt"].endswith("\n3. " + _examples_in(request["body"])[2] + "\n4.")
    assert [record.prompt for record in read_prompt_set(output)][3:] == [
        "A heron on a frozen lake.", "Two trams in a snowy square.", "A quilt on a washing line."]


def test_rate_limits_and_server_errors_are_retried_and_the_run_completes(openai_server, tmp_path):
    openai_server.script = [status(429, "Rate limit reached"), status(500), status(503)]
    summary = expand_prompts(_config(openai_server, max_retries=3, count=23), tmp_path / "objects.jsonl")
    assert summary.reached_target and summary.requests == 1
    assert len(openai_server.requests) == 4  # three failures, then the reply


def test_a_timeout_is_retried(openai_server, tmp_path):
    openai_server.script = [stall(1.0)]
    summary = expand_prompts(_config(openai_server, request_timeout=0.3, max_retries=1, count=23),
                             tmp_path / "objects.jsonl")
    assert summary.reached_target and len(openai_server.requests) == 2


def test_retries_running_out_is_a_clear_error_that_keeps_accepted_prompts_and_a_rerun_continues(openai_server,
                                                                                               tmp_path):
    output = tmp_path / "objects.jsonl"
    openai_server.script = [reply(numbered(fresh_prompts(0)))] + [status(500, "upstream overloaded")] * 3
    with pytest.raises(LLMError, match=r"HTTP 500 after 2 retries.*upstream overloaded") as error:
        expand_prompts(_config(openai_server, count=43), output)
    assert openai_server.base_url in str(error.value) and MODEL in str(error.value)
    assert len(read_prompt_set(output)) == 23  # the 3 seeds and the first reply's 20 prompts
    summary = expand_prompts(_config(openai_server, count=43), output)
    assert summary.reached_target and summary.requests == 2
    prompts = [record.prompt for record in read_prompt_set(output)]
    assert len(prompts) == len(set(prompts)) == 43


def test_a_reply_without_a_numbered_list_is_counted_and_the_run_goes_on(openai_server, tmp_path):
    openai_server.script = [reply("I'm sorry, I can't help with image descriptions today."), reply("")]
    summary = expand_prompts(_config(openai_server, count=23), tmp_path / "objects.jsonl")
    assert summary.reached_target and summary.requests == 3 and summary.replies_without_list == 2
    assert "2 replies had no numbered list" in summary.message()


def test_duplicates_echoed_examples_and_near_copies_are_counted_as_rejections(openai_server, tmp_path):
    fresh = fresh_prompts(0, 4)
    openai_server.script = [reply(numbered([
        SEEDS[0],  # an echoed example
        fresh[0], fresh[0].upper(),  # a duplicate in other letters
        fresh[1], fresh[1] + " again",  # a near copy
        "", fresh[2], "   ", fresh[3],
    ], start=4))]
    summary = expand_prompts(_config(openai_server, count=7, max_requests=1), tmp_path / "objects.jsonl")
    assert summary.kept == 7 and summary.reached_target
    assert summary.rejected == {"empty": 2, "too_long": 0, "duplicate": 2, "blocklisted": 0, "similar": 1}


def test_a_body_that_is_not_the_api_is_a_clear_error(openai_server, tmp_path):
    openai_server.script = [junk()]
    with pytest.raises(LLMError, match="not an OpenAI API response.*502 Bad Gateway"):
        expand_prompts(_config(openai_server), tmp_path / "objects.jsonl")
    assert len(read_prompt_set(tmp_path / "objects.jsonl")) == 3


def test_an_unknown_model_is_a_clear_error_naming_model_and_url(openai_server, tmp_path):
    with pytest.raises(LLMError, match=r"'gpt-nonexistent'.*404 Not Found: the model 'gpt-nonexistent' or the base "
                                       r"URL is wrong.*does not exist") as error:
        expand_prompts(_config(openai_server, model="gpt-nonexistent"), tmp_path / "objects.jsonl")
    assert openai_server.base_url in str(error.value)


def test_a_base_url_without_the_api_path_is_a_clear_error(openai_server, tmp_path):
    base_without_v1 = openai_server.base_url.removesuffix("/v1")
    with pytest.raises(LLMError, match=r"404 Not Found.*usually ends in /v1"):
        expand_prompts(_config(openai_server, base_url=base_without_v1), tmp_path / "objects.jsonl")


def test_an_unreachable_endpoint_is_a_clear_error(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = PromptConfig(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", model=MODEL, api="chat",
                          api_key_env="SELMA_TEST_KEY", max_retries=0, count=10)
    with pytest.raises(LLMError, match=r"cannot connect.*check base_url and that the server is running"):
        expand_prompts(config, tmp_path / "objects.jsonl")
    assert len(read_prompt_set(tmp_path / "objects.jsonl")) == 3


def test_a_refused_key_is_reported_without_the_key(openai_server, tmp_path):
    openai_server.script = [status(401, f"Incorrect API key provided: {KEY}.")]
    with pytest.raises(LLMError, match="refused the API key.*SELMA_TEST_KEY") as error:
        expand_prompts(_config(openai_server), tmp_path / "objects.jsonl")
    assert KEY not in str(error.value) and "***" in str(error.value)


def test_when_the_request_budget_is_spent_the_summary_says_how_many_were_reached(openai_server, tmp_path):
    openai_server.default = lambda number: numbered(list(SEEDS), start=4)  # nothing new, ever
    summary = expand_prompts(_config(openai_server, count=50, max_requests=3), tmp_path / "objects.jsonl")
    assert not summary.reached_target and summary.kept == 3 and summary.requests == 3
    assert "request budget spent: 3 of max_requests=3 requests reached 3 of 50 prompts" in summary.message()
    assert summary.rejected["duplicate"] == 9


def test_the_key_variable_must_be_set_for_openai_itself_but_not_for_local_servers(monkeypatch):
    monkeypatch.delenv("SELMA_UNSET_KEY", raising=False)
    with pytest.raises(LLMError, match="environment variable SELMA_UNSET_KEY is not set"):
        api_key_from_environment("SELMA_UNSET_KEY", "https://api.openai.com/v1")
    assert api_key_from_environment("SELMA_UNSET_KEY", "http://127.0.0.1:11434/v1") == "not-needed"


@pytest.mark.parametrize("pasted", [KEY, KEY.replace("-", "_"), "hf_AbCdEf0123456789AbCdEf0123456789"])
def test_a_key_pasted_where_the_variable_name_belongs_is_refused_without_echoing_it(tmp_path, pasted):
    config = PromptConfig(backend="openai", api_key_env=pasted, count=5)
    with pytest.raises(ValueError, match="NAME of an environment variable") as error:
        expand_prompts(config, tmp_path / "objects.jsonl")
    assert pasted not in str(error.value) and "0123456789" not in str(error.value)
    assert not (tmp_path / "objects.jsonl").exists()

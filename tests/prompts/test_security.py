"""What a shared workflow can make the Skill Prompts node do: every widget value is untrusted input.

A workflow may pick one of the endpoints the server's owner configured, or call a URL of its own
without any key; it never chooses both where a key goes and which key. A blocklist path reads only
ComfyUI's input and output folders, and no message quotes a file the user named.
"""

from __future__ import annotations

import json
import socket

import pytest
from openai_server import MODEL, openai_server, status  # noqa: F401

from comfyui_selma.nodes.prompts import SelmaSkillPrompts
from comfyui_selma.trainer import cli
from comfyui_selma.trainer.prompts.prompt_set import read_prompt_set

SERVER_SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
LAB_KEY = "sk-lab-endpoint-0011223344556677"


@pytest.fixture
def comfy_user_folder(comfy, monkeypatch):
    """ComfyUI's user directory (``folder_paths.get_user_directory``), where the endpoints file lives."""
    monkeypatch.delenv("SELMA_ENDPOINTS", raising=False)
    return comfy.base_dir / "user"


def _endpoints_file(folder, text: str):
    path = folder / "selma" / "endpoints.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _run(**overrides):
    values = {name: spec[1].get("default") for section in ("required", "optional")
              for name, spec in SelmaSkillPrompts.INPUT_TYPES()[section].items()}
    values.update(skill="everyday_objects", backend="template", count=23, name="shared")
    values.update(overrides)
    return SelmaSkillPrompts().generate(**values, unique_id="5")


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- keys: bound to the endpoints the owner configured -------------------------------------------------


def test_a_workflow_cannot_send_a_server_variable_to_a_url_it_chooses(comfy, comfy_user_folder, openai_server,
                                                                     monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SERVER_SECRET)
    with pytest.raises(ValueError, match="api_key_env") as error:
        _run(backend="openai", base_url=openai_server.base_url, model=MODEL, api="chat",
             api_key_env="AWS_SECRET_ACCESS_KEY")
    assert openai_server.requests == []
    assert SERVER_SECRET not in str(error.value)
    assert "endpoints" in str(error.value) and "without a key" in str(error.value)


def test_a_url_of_the_workflows_own_is_called_without_any_key(comfy, comfy_user_folder, openai_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SERVER_SECRET)
    prompt_set, _ = _run(backend="openai", base_url=openai_server.base_url, model=MODEL, api="chat", api_key_env="")
    assert len(prompt_set) == 23
    assert openai_server.requests
    assert all(SERVER_SECRET not in json.dumps(request["headers"]) for request in openai_server.requests)


def test_a_configured_endpoint_named_in_base_url_gets_its_own_key(comfy, comfy_user_folder, openai_server,
                                                                  monkeypatch):
    monkeypatch.setenv("LAB_KEY", LAB_KEY)
    _endpoints_file(comfy_user_folder, f'[endpoints.lab]\nbase_url = "{openai_server.base_url}"\n'
                                       'api_key_env = "LAB_KEY"\napi = "chat"\n')
    prompt_set, _ = _run(backend="openai", base_url="lab", model=MODEL, api="chat", api_key_env="")
    assert len(prompt_set) == 23
    assert {request["headers"]["authorization"] for request in openai_server.requests} == {f"Bearer {LAB_KEY}"}


def test_the_endpoints_file_can_come_from_selma_endpoints(comfy, comfy_user_folder, openai_server, monkeypatch,
                                                          tmp_path):
    monkeypatch.setenv("LAB_KEY", LAB_KEY)
    settings = tmp_path / "owner" / "endpoints.toml"
    settings.parent.mkdir()
    settings.write_text(f'[endpoints.lab]\nbase_url = "{openai_server.base_url}"\napi_key_env = "LAB_KEY"\n')
    monkeypatch.setenv("SELMA_ENDPOINTS", str(settings))
    _run(backend="openai", base_url="lab", model=MODEL, api="chat", api_key_env="")
    assert openai_server.requests[0]["headers"]["authorization"] == f"Bearer {LAB_KEY}"


def test_a_saved_workflow_naming_the_endpoints_url_and_its_variable_still_gets_the_key(comfy, comfy_user_folder,
                                                                                      openai_server, monkeypatch):
    monkeypatch.setenv("LAB_KEY", LAB_KEY)
    _endpoints_file(comfy_user_folder, f'[endpoints.lab]\nbase_url = "{openai_server.base_url}"\n'
                                       'api_key_env = "LAB_KEY"\n')
    _run(backend="openai", base_url=openai_server.base_url + "/", model=MODEL, api="chat", api_key_env="LAB_KEY")
    assert openai_server.requests[0]["headers"]["authorization"] == f"Bearer {LAB_KEY}"


def test_a_workflow_cannot_swap_the_key_of_a_configured_endpoint(comfy, comfy_user_folder, openai_server,
                                                                 monkeypatch):
    monkeypatch.setenv("LAB_KEY", LAB_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SERVER_SECRET)
    _endpoints_file(comfy_user_folder, f'[endpoints.lab]\nbase_url = "{openai_server.base_url}"\n'
                                       'api_key_env = "LAB_KEY"\n')
    for base_url in ("lab", openai_server.base_url):
        with pytest.raises(ValueError, match="api_key_env: AWS_SECRET_ACCESS_KEY") as error:
            _run(backend="openai", base_url=base_url, model=MODEL, api="chat", api_key_env="AWS_SECRET_ACCESS_KEY")
        assert SERVER_SECRET not in str(error.value)
    assert openai_server.requests == []


def test_an_unknown_endpoint_name_lists_the_configured_ones_and_where_they_are_set(comfy, comfy_user_folder):
    with pytest.raises(ValueError, match=r"base_url: 'lab' is neither an endpoint configured on this server "
                                         r"\(configured: openai; built-in only; .*endpoints\.toml does not exist\) "
                                         r"nor an http\(s\) URL"):
        _run(backend="openai", base_url="lab", api_key_env="")


def test_a_key_is_never_sent_over_plain_http_to_another_host(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SELMA_TEST_KEY", SERVER_SECRET)
    output = tmp_path / "objects.jsonl"
    code = cli.main(["prompts", "generate", "--backend", "openai", "--base-url", "http://192.0.2.10:8000/v1",
                     "--api-key-env", "SELMA_TEST_KEY", "--model", MODEL, "--count", "10", "--out", str(output),
                     "--quiet"])
    error = capsys.readouterr().err
    assert code == 1 and "plain http" in error and "SELMA_TEST_KEY" in error and SERVER_SECRET not in error
    assert not output.exists()


def test_an_endpoint_that_would_send_its_key_over_plain_http_is_refused(comfy, comfy_user_folder, monkeypatch):
    monkeypatch.setenv("LAB_KEY", LAB_KEY)
    settings = _endpoints_file(comfy_user_folder, '[endpoints.lab]\nbase_url = "http://192.0.2.10/v1"\n'
                                                  'api_key_env = "LAB_KEY"\n')
    with pytest.raises(ValueError, match=rf"{settings}: endpoint 'lab': .*plain http"):
        _run(backend="openai", base_url="lab", api_key_env="")


# --- messages never show secrets ----------------------------------------------------------------------


def test_credentials_inside_a_base_url_are_redacted_from_errors(tmp_path, monkeypatch):
    from comfyui_selma.trainer.backends.llm import LLMError
    from comfyui_selma.trainer.prompts.generate import PromptConfig, expand_prompts

    base_url = f"http://reader:{SERVER_SECRET}@127.0.0.1:{_closed_port()}/v1?api_key={LAB_KEY}"
    config = PromptConfig(backend="openai", base_url=base_url, model=MODEL, api="chat", api_key_env="",
                          max_retries=0, count=10)
    with pytest.raises(LLMError, match="cannot connect") as error:
        expand_prompts(config, tmp_path / "objects.jsonl")
    assert SERVER_SECRET not in str(error.value) and LAB_KEY not in str(error.value)
    assert "127.0.0.1" in str(error.value)


def test_a_server_reply_echoing_the_urls_credentials_is_redacted(tmp_path, openai_server):
    from comfyui_selma.trainer.backends.llm import LLMError
    from comfyui_selma.trainer.prompts.generate import PromptConfig, expand_prompts

    base_url = openai_server.base_url.replace("http://", f"http://{LAB_KEY}:{SERVER_SECRET}@")
    openai_server.script = [status(400, f"bad request to {base_url}")]
    config = PromptConfig(backend="openai", base_url=base_url, model=MODEL, api="chat", api_key_env="",
                          max_retries=0, count=10)
    with pytest.raises(LLMError, match="HTTP 400") as error:
        expand_prompts(config, tmp_path / "objects.jsonl")
    assert SERVER_SECRET not in str(error.value) and LAB_KEY not in str(error.value)


def test_the_openai_clients_environment_headers_never_reach_an_endpoint(comfy, comfy_user_folder, openai_server,
                                                                         monkeypatch):
    monkeypatch.setenv("OPENAI_CUSTOM_HEADERS", f"X-Team-Token: {SERVER_SECRET}")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-private-0123")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-private-4567")
    _run(backend="openai", base_url=openai_server.base_url, model=MODEL, api="chat", api_key_env="")
    sent = json.dumps([request["headers"] for request in openai_server.requests])
    assert SERVER_SECRET not in sent and "org-private" not in sent and "proj-private" not in sent


def test_a_blocklist_line_close_to_a_seed_is_named_by_its_line_never_quoted(tmp_path, capsys):
    secrets = tmp_path / "server.env"
    secrets.write_text(f"HOME=/home/comfy\nOPENAI_API_KEY={SERVER_SECRET}\n")
    code = cli.main(["prompts", "generate", "--backend", "template", "--skill", "counting", "--threshold", "0.01",
                     "--seed-prompt", "openai api key", "--seed-prompt", "two cats", "--seed-prompt", "one dog",
                     "--blocklist", str(secrets), "--out", str(tmp_path / "leak.jsonl"), "--quiet"])
    error = capsys.readouterr().err
    assert code == 1 and f"line 2 of the blocklist {secrets}" in error and "seed prompt 1" in error
    assert SERVER_SECRET not in error and "OPENAI_API_KEY=" not in error


def test_a_malformed_jsonl_blocklist_is_reported_by_line_without_its_content(tmp_path, capsys):
    blocklist = tmp_path / "benchmark.jsonl"
    blocklist.write_text(json.dumps({"prompt": "a cat"}) + "\n" + json.dumps({"prompt": {"key": SERVER_SECRET}})
                         + "\n")
    code = cli.main(["prompts", "generate", "--backend", "template", "--count", "10", "--blocklist", str(blocklist),
                     "--out", str(tmp_path / "x.jsonl"), "--quiet"])
    error = capsys.readouterr().err
    assert code == 1 and f"{blocklist}:2: field 'prompt'" in error and SERVER_SECRET not in error


# --- files: a blocklist path reads ComfyUI's input and output folders only -----------------------------


@pytest.mark.parametrize("where", ["absolute", "relative", "proc"])
def test_the_node_refuses_a_blocklist_outside_comfyuis_input_and_output_folders(comfy, tmp_path, where):
    secrets = tmp_path / "server.env"
    secrets.write_text(f"OPENAI_API_KEY={SERVER_SECRET}\n")
    (comfy.base_dir / "input").mkdir(exist_ok=True)
    value = {"absolute": str(secrets), "relative": "../../server.env", "proc": "/proc/self/environ"}[where]
    with pytest.raises(ValueError, match=r"blocklist: .* is outside ComfyUI's input and output folders") as error:
        _run(blocklist=value, seeds="openai api key\ntwo cats\none dog", threshold=0.01)
    assert SERVER_SECRET not in str(error.value)
    assert not list(comfy.output_dir.rglob("*.jsonl"))


def test_a_symlink_out_of_the_input_folder_is_refused(comfy, tmp_path):
    secrets = tmp_path / "server.env"
    secrets.write_text(f"OPENAI_API_KEY={SERVER_SECRET}\n")
    (comfy.base_dir / "input").mkdir(exist_ok=True)
    (comfy.base_dir / "input" / "benchmark.txt").symlink_to(secrets)
    with pytest.raises(ValueError, match="outside ComfyUI's input and output folders"):
        _run(blocklist="benchmark.txt")


def test_the_node_reads_a_blocklist_from_the_input_folder_or_the_output_folder(comfy):
    (comfy.base_dir / "input" / "benchmarks").mkdir(parents=True)
    (comfy.base_dir / "input" / "benchmarks" / "eval.txt").write_text("A photo of three dogs on a beach.\n")
    prompt_set, _ = _run(skill="counting", blocklist="benchmarks/eval.txt", name="from-input", count=30)
    assert len(prompt_set) == 30
    _, reference = _run(skill="counting", name="reference", count=30)
    own_seeds = "A red kite above one tall tree.\nTwo boats under a bridge at night.\nThree candles on a cake."
    prompt_set, _ = _run(skill="counting", blocklist=reference, seeds=own_seeds, name="from-output", count=30, seed=1)
    kept = {record.prompt for record in read_prompt_set(reference)}
    assert not kept & set(prompt_set.prompts[3:])

"""The endpoints file and the one rule it serves: a workflow never chooses both where a key goes and which key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfyui_selma.trainer.backends.endpoints import (
    BUILTIN_ENDPOINTS,
    EndpointError,
    Route,
    endpoints_file,
    load_endpoints,
    redact_url,
    route_for_workflow,
)

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows" / "api"


def _file(tmp_path, text: str) -> Path:
    path = tmp_path / "endpoints.toml"
    path.write_text(text)
    return path


def test_without_a_file_only_the_builtin_openai_endpoint_exists():
    endpoints = load_endpoints(None).by_name
    assert endpoints == BUILTIN_ENDPOINTS
    assert endpoints["openai"].base_url == "https://api.openai.com/v1"
    assert endpoints["openai"].api_key_env == "OPENAI_API_KEY"


def test_a_missing_file_is_the_same_as_none(tmp_path):
    assert load_endpoints(tmp_path / "absent.toml").by_name == BUILTIN_ENDPOINTS


def test_the_file_adds_endpoints_and_may_replace_openai(tmp_path):
    path = _file(tmp_path, '[endpoints.openai]\nbase_url = "https://proxy.example/v1"\napi_key_env = "PROXY_KEY"\n'
                           '[endpoints.ollama]\nbase_url = "http://127.0.0.1:11434/v1"\napi = "chat"\n')
    endpoints = load_endpoints(path).by_name
    assert set(endpoints) == {"openai", "ollama"}
    assert endpoints["openai"].api_key_env == "PROXY_KEY"
    assert endpoints["ollama"].api_key_env == "" and endpoints["ollama"].api == "chat"


@pytest.mark.parametrize("text, message", [
    ("not toml = = 1", "not a TOML file"),
    ('[endpoints.lab]\napi_key_env = "LAB_KEY"\n', "endpoint 'lab': base_url is missing"),
    ('[endpoints.lab]\nbase_url = "ftp://x/v1"\n', "endpoint 'lab': base_url must be an http(s) URL"),
    ('[endpoints.lab]\nbase_url = "https://x/v1"\napi_key_env = "sk-abc123"\n', "NAME of an environment variable"),
    ('[endpoints.lab]\nbase_url = "https://x/v1"\napi = "embeddings"\n', "endpoint 'lab': api 'embeddings'"),
    ('[endpoints.lab]\nbase_url = "https://x/v1"\ncolour = "red"\n', "endpoint 'lab': unknown field 'colour'"),
    ('[endpoints."a b"]\nbase_url = "https://x/v1"\n', "endpoint name 'a b'"),
    ('[endpoints.lab]\nbase_url = "http://10.1.2.3/v1"\napi_key_env = "LAB_KEY"\n', "plain http"),
    ('[endpoints.lab]\nbase_url = "https://user:pw@x/v1"\n', "credentials in base_url"),
    ('endpoint = 1\n', "expected only an [endpoints] table"),
])
def test_a_bad_endpoints_file_is_a_clear_error_naming_file_and_endpoint(tmp_path, text, message):
    path = _file(tmp_path, text)
    with pytest.raises(EndpointError) as error:
        load_endpoints(path)
    assert str(path) in str(error.value) and message in str(error.value)
    assert "abc123" not in str(error.value)


def test_selma_endpoints_names_the_file_else_the_callers_default(monkeypatch, tmp_path):
    monkeypatch.delenv("SELMA_ENDPOINTS", raising=False)
    assert endpoints_file(tmp_path / "default.toml") == tmp_path / "default.toml"
    monkeypatch.setenv("SELMA_ENDPOINTS", str(tmp_path / "owner.toml"))
    assert endpoints_file(tmp_path / "default.toml") == tmp_path / "owner.toml"


LAB = '[endpoints.lab]\nbase_url = "https://llm.lab.example/v1"\napi_key_env = "LAB_KEY"\napi = "chat"\n'


@pytest.mark.parametrize("base_url, api_key_env, api, expected", [
    ("openai", "", "completions", Route("https://api.openai.com/v1", "OPENAI_API_KEY", "openai")),
    ("https://api.openai.com/v1", "OPENAI_API_KEY", "chat",
     Route("https://api.openai.com/v1", "OPENAI_API_KEY", "openai")),
    ("HTTPS://API.openai.com/v1/", "", "chat", Route("https://api.openai.com/v1", "OPENAI_API_KEY", "openai")),
    ("lab", "LAB_KEY", "chat", Route("https://llm.lab.example/v1", "LAB_KEY", "lab")),
    ("http://127.0.0.1:11434/v1", "", "chat", Route("http://127.0.0.1:11434/v1", "", "")),
    ("https://elsewhere.example/v1", "", "completions", Route("https://elsewhere.example/v1", "", "")),
])
def test_a_workflow_picks_a_configured_endpoint_or_calls_its_own_url_without_a_key(tmp_path, base_url, api_key_env,
                                                                                   api, expected):
    endpoints = load_endpoints(_file(tmp_path, LAB))
    assert route_for_workflow(base_url, api_key_env, api, endpoints) == expected


@pytest.mark.parametrize("base_url, api_key_env, api, message", [
    ("https://evil.example/v1", "OPENAI_API_KEY", "chat", "api_key_env: OPENAI_API_KEY"),
    ("openai", "LAB_KEY", "chat", "api_key_env: LAB_KEY is not the key of endpoint 'openai'"),
    ("https://api.openai.com/v1", "AWS_SECRET_ACCESS_KEY", "chat", "api_key_env: AWS_SECRET_ACCESS_KEY"),
    ("lab", "", "completions", "api: 'completions', but endpoint 'lab' serves the chat API"),
    ("nonsense", "", "chat", "base_url: 'nonsense' is neither an endpoint configured on this server"),
])
def test_a_workflow_that_would_choose_the_key_is_refused(tmp_path, base_url, api_key_env, api, message):
    endpoints = load_endpoints(_file(tmp_path, LAB))
    with pytest.raises(EndpointError) as error:
        route_for_workflow(base_url, api_key_env, api, endpoints)
    assert message in str(error.value)


def test_the_shipped_workflows_resolve_to_the_builtin_openai_endpoint():
    endpoints = load_endpoints(None)
    for path in sorted(WORKFLOWS.glob("*.json")):
        for node in json.loads(path.read_text()).values():
            if node["class_type"] == "SelmaSkillPrompts":
                inputs = node["inputs"]
                route = route_for_workflow(inputs["base_url"], inputs["api_key_env"], inputs["api"], endpoints)
                assert route.endpoint == "openai", path


@pytest.mark.parametrize("url, shown", [
    ("http://user:s3cretpass@host:8080/v1", "http://***@host:8080/v1"),
    ("https://host/v1?api_key=s3cretpass&v=2", "https://host/v1?api_key=***&v=***"),
    ("https://s3cretpass@host/v1", "https://***@host/v1"),
    ("https://host/v1", "https://host/v1"),
])
def test_credentials_in_a_url_are_redacted(url, shown):
    assert redact_url(url) == shown

"""Where candidate prompts come from: an OpenAI-compatible endpoint, a local transformers model, or templates.

Every backend answers one request (the instruction plus numbered examples, see
:func:`.skills.request_text`) with one reply text holding a numbered list; :func:`parse_numbered_list`
turns that text into candidates. Completion-style models (the completions API, a local model without
a chat template) get the request ending in the next number (``"4."``) so they continue the list, and
that number is put back in front of the reply before parsing.

The openai client does the retrying: ``max_retries`` attempts on connection errors, timeouts, 408,
409, 429 and 5xx, with exponential backoff and the server's ``retry-after`` honoured. What is still
failing after that becomes an :class:`LLMError` that says what to check. An API key is only ever read
from the environment, never sent over plain http to another machine, and redacted from every
message, as are credentials written into the base URL. The client sends only its own headers: the
``OPENAI_ORG_ID``, ``OPENAI_PROJECT_ID`` and ``OPENAI_CUSTOM_HEADERS`` the openai package would add
from the environment never reach an endpoint (which endpoint gets which key is :mod:`.endpoints`'s
business, and a workflow may name the URL).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from .endpoints import APIS, check_env_name, key_transport_problem, redact, redact_url, url_secrets
from .templates import template_prompts

BACKENDS = ("openai", "transformers", "template")
_NUMBERED_LINE = re.compile(r"^\s*(?:\*\*)?\(?(\d{1,4})\s*[.):](?:\*\*)?(?:\s+|$)(.*?)\s*$")
_QUOTES = "\"'“”‘’`"
# A local server (Ollama, vLLM, LM Studio, llama.cpp) ignores the key; the client still wants one.
_PLACEHOLDER_KEY = "not-needed"


class LLMError(RuntimeError):
    """The LLM could not answer: unreachable, wrong model or URL, refused key, out of retries."""


@dataclass(frozen=True)
class Reply:
    """One reply: its text and, when the server reports them, the tokens it counted."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class Backend(Protocol):
    source: str  # the prompt set's ``source`` for what this backend writes

    def complete(self, request: str, next_number: int, request_index: int) -> Reply: ...

    def close(self) -> None: ...


def parse_numbered_list(text: str) -> list[str]:
    """The items of a numbered list (``1. x``, ``2) y``, ``**3.** z``), in order; other lines are ignored."""
    items = []
    for line in text.splitlines():
        match = _NUMBERED_LINE.match(line)
        if not match:
            continue
        item = match.group(2).replace("**", "").strip()
        if len(item) >= 2 and item[0] in _QUOTES and item[-1] in _QUOTES:
            item = item[1:-1].strip()
        items.append(item)
    return items


def api_key_from_environment(env_name: str, base_url: str) -> str:
    """The key in ``$env_name`` ("" names none); a placeholder for a non-OpenAI endpoint when there is none.

    A key is refused for plain http to another machine, where anyone on the way could read it.
    """
    key = os.environ.get(check_env_name(env_name), "").strip() if env_name else ""
    if key:
        problem = key_transport_problem(base_url)
        if problem:
            raise LLMError(f"api_key_env: {env_name} holds a key, but {problem}")
        return key
    if _hostname(base_url) == "api.openai.com":
        needed = (f"the environment variable {env_name} is not set" if env_name
                  else "no environment variable is named in api_key_env")
        raise LLMError(f"{needed}; OpenAI ({redact_url(base_url)}) needs an API key (set it where ComfyUI or selma "
                       "runs, and name the variable in api_key_env)")
    return _PLACEHOLDER_KEY


def _hostname(url: str) -> str:
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


def _continued(prefix: str, continuation: str) -> str:
    """The list item the request started (``"4."``) joined to what the model wrote after it."""
    if not continuation.strip():
        return ""  # nothing written: a reply without a list, not an empty item
    if not continuation[0].isspace():
        continuation = " " + continuation
    return prefix + continuation


# What the client itself sets; anything else (organisation, project, OPENAI_CUSTOM_HEADERS) came from the
# environment and is dropped, since the base URL may be a workflow's choice.
_OWN_HEADERS = {"host", "accept", "accept-encoding", "connection", "user-agent", "content-type", "content-length",
                "authorization"}


class OpenAIBackend:
    """Any OpenAI-compatible endpoint through the ``openai`` client, on the chat or completions API."""

    source = "llm"

    def __init__(self, base_url: str, model: str, api: str, api_key: str, api_key_env: str,
                 temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 3072, max_retries: int = 2,
                 timeout: float = 120.0) -> None:
        import openai  # heavy; imported only when an LLM is used

        if api not in APIS:
            raise ValueError(f"api: {api!r} is not one of {', '.join(APIS)}")
        if not model.strip():
            raise ValueError("model: empty; expected the model name the endpoint serves (e.g. gpt-4o-mini, "
                             "llama3.1:8b)")
        self.base_url, self.model, self.api, self.api_key_env = base_url, model, api, api_key_env
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.max_retries = max_retries
        self._openai = openai
        self._api_key = api_key
        self._secrets = url_secrets(base_url) + ([api_key] if api_key != _PLACEHOLDER_KEY else [])
        http_client = openai.DefaultHttpxClient(event_hooks={"request": [self._send_own_headers_only]})
        self._client = openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=max_retries, timeout=timeout,
                                     http_client=http_client)

    def _send_own_headers_only(self, request: object) -> None:
        """httpx's request hook: only the client's own headers, and this backend's key, leave the process."""
        headers = request.headers  # type: ignore[attr-defined]
        for name in list(headers.keys()):
            if name.lower() not in _OWN_HEADERS and not name.lower().startswith("x-stainless-"):
                del headers[name]
        headers["Authorization"] = f"Bearer {self._api_key}"

    def complete(self, request: str, next_number: int, request_index: int) -> Reply:
        openai = self._openai
        try:
            if self.api == "chat":
                response = self._client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": request}],
                    temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens, n=1)
                choices = self._choices(response)
                text = (choices[0].message.content or "") if choices else ""
            else:
                prefix = f"{next_number}."
                response = self._client.completions.create(
                    model=self.model, prompt=request + prefix, temperature=self.temperature, top_p=self.top_p,
                    max_tokens=self.max_tokens, n=1)
                choices = self._choices(response)
                text = _continued(prefix, choices[0].text or "") if choices else ""
        except openai.APITimeoutError as error:
            raise self._error(f"timed out after {self.max_retries} retries", error) from None
        except openai.APIConnectionError as error:
            raise self._error(f"cannot connect (after {self.max_retries} retries); check base_url and that the "
                              "server is running", error) from None
        except openai.AuthenticationError as error:
            raise self._error(f"refused the API key (HTTP 401); check the key in the environment variable "
                              f"{self.api_key_env}", error) from None
        except openai.PermissionDeniedError as error:
            raise self._error(f"denied access (HTTP 403) with the key in {self.api_key_env}", error) from None
        except openai.NotFoundError as error:
            raise self._error(f"answered 404 Not Found: the model {self.model!r} or the base URL is wrong, or the "
                              f"server has no {self.api} API (OpenAI-compatible servers serve /chat/completions "
                              "and /completions under a base URL that usually ends in /v1; try api=chat or "
                              "api=completions)", error) from None
        except openai.RateLimitError as error:
            raise self._error(f"kept answering 429 Too Many Requests after {self.max_retries} retries; wait, or "
                              "raise max_retries", error) from None
        except openai.InternalServerError as error:
            raise self._error(f"kept failing with HTTP {error.status_code} after {self.max_retries} retries",
                              error) from None
        except openai.APIStatusError as error:
            raise self._error(f"refused the request with HTTP {error.status_code}", error) from None
        except openai.APIError as error:  # e.g. a body that is not the API's JSON
            raise self._error("answered something that is not an OpenAI API response", error) from None
        usage = getattr(response, "usage", None)
        return Reply(text=text, prompt_tokens=getattr(usage, "prompt_tokens", None),
                     completion_tokens=getattr(usage, "completion_tokens", None))

    def _choices(self, response: object) -> list:
        choices = getattr(response, "choices", None)
        if not isinstance(choices, list):  # e.g. an HTML page served with status 200 by a proxy or a web server
            raise LLMError(f"LLM endpoint {redact_url(self.base_url)} answered with something that is not an OpenAI "
                           f"API response (check base_url): {redact(str(response), self._secrets)[:200]!r}")
        return choices

    def _error(self, what: str, error: Exception) -> LLMError:
        detail = redact(str(error), self._secrets)
        return LLMError(f"LLM endpoint {redact_url(self.base_url)} (model {self.model!r}, {self.api} API) {what}. "
                        f"Server said: {detail}")

    def close(self) -> None:
        self._client.close()


def check_model_folder(model_path: str) -> Path:
    """The folder of a local model, if it looks like one (holds config.json); a clear error otherwise."""
    folder = Path(model_path).expanduser()
    if not (folder / "config.json").is_file():
        raise LLMError(f"model: {model_path!r} is not a model folder (no config.json in it); backend "
                       "'transformers' loads a local causal LM saved with save_pretrained (config.json, "
                       "tokenizer files and weights)")
    return folder


class TransformersBackend:
    """A local causal language model loaded from a folder with transformers, generating in-process.

    A model whose tokenizer has a chat template gets the request as a user message; any other model
    continues the numbered list. Sampling is seeded per request (seed, request index), so a run is
    reproducible on one machine and a resumed run continues the same stream.
    """

    source = "llm"

    def __init__(self, model_path: str, temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 3072,
                 seed: int = 0, device: str = "auto") -> None:
        folder = check_model_folder(model_path)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self._model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).to(device).eval()
        except (OSError, ValueError) as error:
            raise LLMError(f"model: cannot load a causal LM from {folder}: {error}") from None
        self._torch = torch
        self.device, self.temperature, self.top_p, self.max_tokens, self.seed = (
            device, temperature, top_p, max_tokens, seed)

    def complete(self, request: str, next_number: int, request_index: int) -> Reply:
        torch = self._torch
        tokenizer = self._tokenizer
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                                 add_generation_prompt=True)
            prefix = ""
        else:
            prefix = f"{next_number}."
            text = request + prefix
        inputs = tokenizer(text, return_tensors="pt").to(self.device)
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p} \
            if self.temperature > 0 else {"do_sample": False}
        forked_devices = None if str(self.device).startswith("cuda") else []
        with torch.random.fork_rng(devices=forked_devices), torch.inference_mode():
            torch.manual_seed(self.seed * 1_000_003 + request_index)  # the global generator, restored after
            output = self._model.generate(**inputs, max_new_tokens=self.max_tokens, pad_token_id=pad_token_id,
                                          **sampling)
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        reply = tokenizer.decode(new_tokens, skip_special_tokens=True)
        return Reply(text=_continued(prefix, reply) if prefix else reply,
                     prompt_tokens=int(inputs["input_ids"].shape[1]), completion_tokens=int(new_tokens.shape[0]))

    def close(self) -> None:
        self._model = None


class TemplateBackend:
    """The offline writer of :mod:`.template_prompts`, answering in the same numbered-list format."""

    source = "template"

    def __init__(self, skill: str, seed: int, prompts_per_request: int) -> None:
        template_prompts(skill, seed, 0, 0)  # unknown or custom skill: fail now, not on the first request
        self.skill, self.seed, self.prompts_per_request = skill, seed, prompts_per_request

    def complete(self, request: str, next_number: int, request_index: int) -> Reply:
        prompts = template_prompts(self.skill, self.seed, request_index, self.prompts_per_request)
        return Reply("\n".join(f"{next_number + offset}. {prompt}" for offset, prompt in enumerate(prompts)))

    def close(self) -> None:
        pass

"""A real HTTP server on loopback that speaks enough of the OpenAI API to test prompt expansion.

It serves ``POST /v1/chat/completions`` and ``POST /v1/completions`` for the models it knows and
answers anything else the way OpenAI does (404 with an error object). Each request takes the next
scripted action — a reply, an HTTP error, a body that is not JSON, a stall — and once the script
runs out the default writer answers with fresh numbered prompts. Every request is recorded (path,
headers, JSON body) so tests can see exactly what the client sent.

Error responses carry ``retry-after-ms: 1``, which the openai client honours, so retried requests
cost milliseconds; real servers send ``retry-after`` on 429 too.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

MODEL = "scripted-model"


@dataclass
class Action:
    """One scripted answer: ``kind`` is reply, status, junk or stall."""

    kind: str
    text: str = ""
    status: int = 200
    usage: tuple[int, int] | None = (50, 200)
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def reply(text: str, usage: tuple[int, int] | None = (50, 200)) -> Action:
    return Action("reply", text=text, usage=usage)


def status(code: int, message: str = "scripted error", headers: dict[str, str] | None = None) -> Action:
    return Action("status", text=message, status=code,
                  headers={"retry-after-ms": "1", **(headers or {})})


def junk(body: str = "<html><body>502 Bad Gateway</body></html>") -> Action:
    return Action("junk", text=body)


def stall(seconds: float) -> Action:
    """Answer only after ``seconds`` (longer than the client's timeout: a timeout)."""
    return Action("stall", seconds=seconds)


def numbered(prompts: list[str], start: int = 1) -> str:
    return "\n".join(f"{start + offset}. {prompt}" for offset, prompt in enumerate(prompts))


_SUBJECTS = ("heron", "tram", "lighthouse", "violinist", "greenhouse", "kayak", "bakery", "robot", "windmill",
             "tortoise", "glacier", "market", "bonfire", "typewriter", "orchard", "submarine", "parrot", "canyon",
             "carousel", "beekeeper", "scarecrow", "observatory", "ferry", "quilt", "meadow", "igloo", "teapot")
_DETAILS = ("at dawn", "in heavy fog", "under neon signs", "after a snowfall", "beside a river", "on a hilltop",
            "at a night market", "in a quiet alley", "during a parade", "inside a museum", "near a waterfall")
_COLOURS = ("crimson", "amber", "jade", "cobalt", "ivory", "violet", "copper", "sage", "scarlet", "indigo")


def fresh_prompts(request_number: int, count: int = 20) -> list[str]:
    """Distinct prompts for request ``request_number``, different enough to pass ROUGE-L 0.8, same every run."""
    prompts = []
    for index in range(count):
        serial = request_number * count + index
        pick = random.Random(serial)
        subject, neighbour = pick.sample(_SUBJECTS, 2)
        prompts.append(f"A {pick.choice(_COLOURS)} {subject} {pick.choice(_DETAILS)} beside a {pick.choice(_COLOURS)} "
                       f"{neighbour}, number {serial}")
    return prompts


class ScriptedOpenAI:
    """The server's state: the script, what it received, the models it serves."""

    def __init__(self) -> None:
        self.script: list[Action] = []
        self.requests: list[dict[str, Any]] = []
        self.models = {MODEL}
        self.default: Callable[[int], str] = lambda number: numbered(fresh_prompts(number))
        self.lock = threading.Lock()
        self.base_url = ""

    def next_action(self) -> Action:
        with self.lock:
            if self.script:
                return self.script.pop(0)
            answered = sum(1 for request in self.requests if request["answered"])
        return reply(self.default(answered))

    @property
    def completion_requests(self) -> list[dict[str, Any]]:
        return [request for request in self.requests if request["path"].endswith("completions")]


def _make_handler(state: ScriptedOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def _send(self, code: int, body: bytes, content_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, code: int, message: str, error_type: str, headers: dict[str, str] | None = None) -> None:
            body = json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": None}})
            self._send(code, body.encode(), headers=headers)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                body = {}
            headers = {name.lower(): value for name, value in self.headers.items()}
            record = {"path": self.path, "headers": headers, "body": body, "answered": False}
            with state.lock:
                state.requests.append(record)
            if self.path not in ("/v1/chat/completions", "/v1/completions"):
                self._error(404, f"Invalid URL (POST {self.path})", "invalid_request_error")
                return
            if body.get("model") not in state.models:
                self._error(404, f"The model `{body.get('model')}` does not exist or you do not have access to it.",
                            "invalid_request_error")
                return
            action = state.next_action()
            if action.kind == "stall":
                time.sleep(action.seconds)
                action = reply(numbered(fresh_prompts(999)))
            if action.kind == "status":
                self._error(action.status, action.text, "server_error", headers=action.headers)
                return
            if action.kind == "junk":
                self._send(200, action.text.encode(), content_type="text/html")
                return
            record["answered"] = True
            usage = None
            if action.usage is not None:
                usage = {"prompt_tokens": action.usage[0], "completion_tokens": action.usage[1],
                         "total_tokens": sum(action.usage)}
            if self.path == "/v1/chat/completions":
                choice = {"index": 0, "finish_reason": "stop",
                          "message": {"role": "assistant", "content": action.text}}
                response = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                            "choices": [choice]}
            else:
                choice = {"index": 0, "finish_reason": "stop", "text": action.text, "logprobs": None}
                response = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                            "choices": [choice]}
            if usage is not None:
                response["usage"] = usage
            self._send(200, json.dumps(response).encode())

    return Handler


@pytest.fixture
def openai_server() -> Iterator[ScriptedOpenAI]:
    """A scripted OpenAI-compatible server on 127.0.0.1 (``state.base_url`` ends in ``/v1``)."""
    state = ScriptedOpenAI()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

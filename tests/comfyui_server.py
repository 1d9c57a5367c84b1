"""The integration tier's real ComfyUI: started once per session, on a free loopback port.

ComfyUI comes from ``COMFYUI_PATH`` (a checkout with its requirements installed in the Python named
by ``COMFYUI_PYTHON``, default: the Python running the tests). It runs with ``--base-directory`` set
to a temporary folder whose ``custom_nodes/`` links to this repository, so the user's own ComfyUI
folders are never touched. Without ``COMFYUI_PATH`` every test that needs it is skipped, and pytest
prints the reason (``-ra``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
PACK_FOLDER_NAME = "comfyui-selma"
START_TIMEOUT_S = 240.0


@dataclass
class ComfyUIServer:
    """A running ComfyUI: its address, its base folder and its log."""

    url: str
    base_dir: Path
    log_path: Path

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return json.loads(response.read())

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def post_json(self, path: str, value: Any) -> Any:
        request = urllib.request.Request(self.url + path, data=json.dumps(value).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                body = response.read()
        except urllib.error.HTTPError as error:  # ComfyUI explains a refused graph in the body
            raise RuntimeError(f"POST {path}: HTTP {error.code}: {error.read().decode(errors='replace')}") from None
        return json.loads(body) if body else None

    def queue_prompt_and_wait(self, api_graph: dict[str, Any], timeout_s: float = 600.0) -> dict[str, Any]:
        """Queue an API-format graph and poll ``/history/<id>`` until it finished; return its history entry.

        The entry's ``status.status_str`` is ``success`` or ``error`` (its ``messages`` hold the
        exception); ``outputs`` maps node ids to what output nodes reported.
        """
        prompt_id = self.post_json("/prompt", {"prompt": api_graph})["prompt_id"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None \
                    and entry["status"].get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout_s:.0f} s:\n{self.log_tail()}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_up(server: ComfyUIServer, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with code {process.returncode} before serving:\n{server.log_tail()}")
        try:
            server.get_json("/system_stats")
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise RuntimeError(f"ComfyUI did not answer within {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


@pytest.fixture(scope="session")
def comfyui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyUIServer]:
    comfyui_path = os.environ.get("COMFYUI_PATH")
    if not comfyui_path:
        pytest.skip("integration tier: COMFYUI_PATH is not set, so no real ComfyUI can be started")
    main_script = Path(comfyui_path) / "main.py"
    if not main_script.is_file():
        pytest.fail(f"COMFYUI_PATH={comfyui_path!r} holds no main.py; expected a ComfyUI checkout")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)

    base_dir = tmp_path_factory.mktemp("comfyui-base")
    (base_dir / "custom_nodes").mkdir()
    (base_dir / "custom_nodes" / PACK_FOLDER_NAME).symlink_to(REPOSITORY_ROOT, target_is_directory=True)
    port = _free_port()
    server = ComfyUIServer(url=f"http://127.0.0.1:{port}", base_dir=base_dir, log_path=base_dir / "comfyui.log")
    command = [python, str(main_script), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base_dir), "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:"]
    environment = {**os.environ, "DO_NOT_TRACK": "1"}
    with server.log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=comfyui_path, stdout=log, stderr=subprocess.STDOUT,
                                   env=environment, start_new_session=True)
    try:
        _wait_until_up(server, process)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

"""ComfyUI's frontend in headless Chromium, for the integration tier (Debian's ``chromium``, driven by
Playwright; no browser is downloaded).

The browser is ``$CHROMIUM_PATH`` (default ``/usr/bin/chromium``). Once ``COMFYUI_PATH`` asks for the
integration tier, a missing browser or Playwright fails the test with what to install rather than
skipping it. Screenshots go to ``$SELMA_TEST_ARTIFACTS`` (default ``test-artifacts/`` in the checkout).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
# Flags for a closed network: without them Chromium keeps trying to reach Google's services.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"]
FRONTEND_READY = "() => window.app && window.app.graph && window.LiteGraph && window.app.extensionManager"


def artifacts_folder() -> Path:
    folder = Path(os.environ.get("SELMA_TEST_ARTIFACTS", REPOSITORY_ROOT / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def chromium(comfyui_server) -> Iterator[Any]:
    """A headless Chromium (Playwright ``Browser``), started once for the session."""
    executable = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
    if not shutil.which(executable):
        pytest.fail(f"integration tier: no Chromium at {executable!r}; install Debian's chromium or set CHROMIUM_PATH")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("integration tier: Playwright is missing; pip install -e '.[integration]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


class FrontendPage:
    """One tab on the integration server's frontend, recording page errors and shown notifications."""

    def __init__(self, page: Any, server: Any) -> None:
        self.page = page
        self.page_errors: list[str] = []
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        # A first visit opens the "Get Started with a Template" dialog; a returning user sees none.
        server.post_json("/settings/Comfy.TutorialCompleted", True)
        page.goto(server.url)
        page.wait_for_function(FRONTEND_READY, timeout=120_000)
        page.wait_for_timeout(2_000)  # extensions finish registering after the app object exists

    def load_workflow(self, workflow: dict[str, Any]) -> None:
        """Open a UI-format workflow the way the template browser does."""
        self.page.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", workflow)
        self.page.wait_for_timeout(1_500)

    def notifications(self) -> list[str]:
        """Texts of the toasts and dialogs on screen (where the frontend reports missing nodes)."""
        return self.page.evaluate(
            "() => [...document.querySelectorAll('.p-toast-message, .p-dialog')].map(e => e.innerText.trim())")

    def show_nodes_at_full_size(self, node_ids: list[int]) -> None:
        """Pan and zoom to 100 % on these nodes, so a screenshot shows their text legibly."""
        self.page.evaluate("""(ids) => {
            const nodes = ids.map(id => app.graph.getNodeById(id));
            const left = Math.min(...nodes.map(node => node.pos[0])), top = Math.min(...nodes.map(node => node.pos[1]));
            app.canvas.ds.scale = 1;
            app.canvas.ds.offset[0] = 80 - left;
            app.canvas.ds.offset[1] = 120 - top;
            app.canvas.setDirty(true, true);
        }""", node_ids)
        self.page.wait_for_timeout(500)

    def screenshot(self, name: str) -> Path:
        path = artifacts_folder() / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path


@pytest.fixture
def frontend(chromium, comfyui_server) -> Iterator[FrontendPage]:
    page = chromium.new_page(viewport={"width": 1600, "height": 1000})
    try:
        yield FrontendPage(page, comfyui_server)
    finally:
        page.close()

"""The web extension's pure logic (event → state → chart and text), run by Node's own test runner, and
the shape of ``web/`` that ComfyUI relies on. The extension in a real browser is the integration
tier's job (``test_web_extension_comfyui.py``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
WEB = REPOSITORY / "web"
# What ComfyUI's frontend serves beside /extensions/<pack>/: the app and the API client.
COMFYUI_MODULES = {"../../scripts/app.js", "../../scripts/api.js"}

node = shutil.which("node")
needs_node = pytest.mark.skipif(node is None, reason="Node.js is not installed: the web/ unit tests need `node`")


@needs_node
def test_web_logic_passes_its_node_unit_tests() -> None:
    finished = subprocess.run([node, "--test", "tests/web/"], cwd=REPOSITORY, capture_output=True, text=True,
                              timeout=300)
    assert finished.returncode == 0, f"node --test failed:\n{finished.stdout[-6000:]}\n{finished.stderr[-3000:]}"
    assert re.search(r"^# pass [1-9]", finished.stdout, re.MULTILINE), finished.stdout[-2000:]


def _module_syntax_error(source: str) -> str:
    """Node's syntax error for ``source`` parsed as an ES module, as the browser parses it ("" when none).

    The source goes in on stdin with ``--input-type=module``: ``node --check file.js`` decides the
    module type from package.json and, for a file it takes as CommonJS with ``import`` lines, lets
    syntax errors pass.
    """
    checked = subprocess.run([node, "--input-type=module", "--check"], input=source, capture_output=True, text=True,
                             timeout=60)
    return "" if checked.returncode == 0 else checked.stderr or f"exit code {checked.returncode}"


@needs_node
def test_every_served_script_is_a_valid_es_module() -> None:
    assert _module_syntax_error('import { app } from "../../scripts/app.js";\nconst = 1;\n'), \
        "the check must reject a broken module"
    for script in sorted(WEB.rglob("*.js")):
        assert not (error := _module_syntax_error(script.read_text())), f"{script}: {error}"


def test_scripts_import_only_each_other_and_comfyui_app_and_api() -> None:
    """ComfyUI imports every .js under web/ as an extension: no tests there, no bare package imports."""
    for script in sorted(WEB.rglob("*.js")):
        for target in re.findall(r'^import .* from "([^"]+)";$', script.read_text(), re.MULTILINE):
            if script.parent == WEB and target in COMFYUI_MODULES:
                continue
            assert target.startswith("./") and (script.parent / target).is_file(), f"{script}: imports {target!r}"
        assert not script.name.endswith((".test.js", ".spec.js")), f"{script}: tests belong in tests/web/"


def test_the_pack_serves_web_and_the_extension_never_reads_secrets() -> None:
    init_source = (REPOSITORY / "__init__.py").read_text()
    assert 'WEB_DIRECTORY = "./web"' in init_source
    served = "\n".join(script.read_text() for script in WEB.rglob("*.js"))
    assert "api_key" not in served.lower() and "localStorage" not in served

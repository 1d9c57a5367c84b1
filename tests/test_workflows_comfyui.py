"""Integration tier: the shipped workflows on a real ComfyUI (``COMFYUI_PATH``).

Each API workflow runs to completion through ``comfy run --wait`` (comfy-cli) with its counts and
steps scaled down here — template prompts, 64 px, 2 sampling steps, 2 training steps — on a
random-weight SD 1.5; each UI workflow opens in ComfyUI's frontend in headless Chromium with every
node type known and no warning shown (screenshots in ``test-artifacts/``), and what the frontend would
queue, like what comfy-cli's own converter makes of it, is exactly the shipped API file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from lora_factories import attention_modules, random_lora, write_expert

pytestmark = pytest.mark.comfyui

REPOSITORY = Path(__file__).resolve().parent.parent
WORKFLOWS = REPOSITORY / "workflows"
SHIPPED = ("selma_full", "selma_merge_only", "selma_one_skill", "selma_weak_to_strong")
COMFY_RUN_TIMEOUT_S = 1800


def scaled_down(graph: dict[str, Any], checkpoint: str, tag: str) -> dict[str, Any]:
    """A copy of an API graph small enough for a CPU: names prefixed with ``tag`` so runs don't share files."""
    graph = json.loads(json.dumps(graph))
    settings = {
        "CheckpointLoaderSimple": {"ckpt_name": checkpoint},
        "SelmaSkillPrompts": {"backend": "template", "count": 4},
        "SelmaRenderDataset": {"width": 64, "height": 64, "steps": 2, "batch_size": 4},
        "SelmaTrainLoraExpert": {"base_checkpoint": checkpoint, "steps": 2, "batch_size": 1,
                                 "gradient_accumulation": 1, "resolution": 64, "rank": 4, "alpha": 4.0,
                                 "save_every": 0, "precision": "no"},
        "KSampler": {"steps": 2},
        "EmptyLatentImage": {"width": 64, "height": 64},
    }
    names = {"SelmaSkillPrompts": "name", "SelmaRenderDataset": "dataset_name", "SelmaTrainLoraExpert": "lora_name",
             "SelmaMergeLoraExperts": "output_name", "SaveImage": "filename_prefix"}
    for node in graph.values():
        inputs = node["inputs"]
        for key, value in settings.get(node["class_type"], {}).items():
            assert key in inputs, f"{node['class_type']} has no input {key!r}"
            inputs[key] = value
        name_key = names.get(node["class_type"])
        if name_key and isinstance(inputs.get(name_key), str):
            inputs[name_key] = f"{tag}-{inputs[name_key]}".replace("/", "-")
    return graph


def comfy_command() -> str:
    """comfy-cli's ``comfy``: ``$COMFY_CLI``, else beside ``$COMFYUI_PYTHON``, else on PATH."""
    configured = os.environ.get("COMFY_CLI")
    beside_python = Path(os.environ.get("COMFYUI_PYTHON", sys.executable)).parent / "comfy"
    found = configured or (str(beside_python) if beside_python.is_file() else shutil.which("comfy"))
    if not found:
        pytest.fail("integration tier: comfy-cli not found; pip install comfy-cli beside ComfyUI or set COMFY_CLI")
    return found


def comfy_run(server, workflow_path: Path) -> subprocess.CompletedProcess[str]:
    address = urlparse(server.url)
    command = [comfy_command(), "--skip-prompt", "run", "--workflow", str(workflow_path), "--wait",
               "--host", address.hostname, "--port", str(address.port), "--timeout", "900"]
    return subprocess.run(command, capture_output=True, text=True, timeout=COMFY_RUN_TIMEOUT_S,
                          env={**os.environ, "DO_NOT_TRACK": "1"})


def _put_user_loras(server, graph: dict[str, Any]) -> None:
    """selma_merge_only merges LoRAs the user already has: write random SD 1.5 ones under the names it picks."""
    folder = server.base_dir / "models" / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    for node in graph.values():
        for key, value in node["inputs"].items():
            if key.startswith("lora_") and isinstance(value, str) and value.endswith(".safetensors"):
                write_expert(folder / value, random_lora("sd1", attention_modules("sd1", 8), rank=4, seed=len(value)))


@pytest.mark.parametrize("name", SHIPPED)
def test_api_workflow_runs_to_completion_through_comfy_run(name: str, comfyui_server, checkpoint_in_comfyui,
                                                           tmp_path: Path) -> None:
    graph = scaled_down(json.loads((WORKFLOWS / "api" / f"{name}.json").read_text()), checkpoint_in_comfyui, name)
    _put_user_loras(comfyui_server, graph)
    workflow_path = tmp_path / f"{name}.json"
    workflow_path.write_text(json.dumps(graph))

    finished = comfy_run(comfyui_server, workflow_path)

    assert finished.returncode == 0, (f"comfy run exited {finished.returncode}\n{finished.stdout[-3000:]}\n"
                                      f"{finished.stderr[-3000:]}\nComfyUI log:\n{comfyui_server.log_tail()}")
    loras = comfyui_server.base_dir / "models" / "loras"
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "SelmaTrainLoraExpert":
            assert (loras / f"{inputs['lora_name']}.safetensors").is_file()
        elif node["class_type"] == "SelmaMergeLoraExperts":
            assert (loras / f"{inputs['output_name']}.safetensors").is_file()
        elif node["class_type"] == "SelmaRenderDataset":
            images = list((comfyui_server.base_dir / "output" / "selma" / "datasets" / inputs["dataset_name"])
                          .rglob("*.png"))
            assert len(images) == 4
        elif node["class_type"] == "SaveImage":
            saved = list((comfyui_server.base_dir / "output").glob(f"{inputs['filename_prefix']}_*.png"))
            assert saved, f"no image saved with prefix {inputs['filename_prefix']!r}"


def test_template_browser_lists_every_workflow(comfyui_server) -> None:
    listed = comfyui_server.get_json("/api/workflow_templates")
    assert sorted(listed["comfyui-selma"]) == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_ui_workflow_opens_in_the_frontend_and_queues_the_shipped_api_graph(name: str, frontend) -> None:
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())

    frontend.load_workflow(workflow)

    loaded = frontend.page.evaluate("""() => ({
        types: app.graph._nodes.map(node => node.type),
        unknown: app.graph._nodes.filter(node => !LiteGraph.registered_node_types[node.type]).map(node => node.type)})""")
    queued = frontend.page.evaluate("async () => (await app.graphToPrompt()).output")
    screenshot = frontend.screenshot(f"workflow-{name}")
    assert loaded["unknown"] == [], f"unknown node types {loaded['unknown']} (screenshot: {screenshot})"
    assert sorted(loaded["types"]) == sorted(node["type"] for node in workflow["nodes"])
    assert frontend.notifications() == [], f"the frontend warned on load (screenshot: {screenshot})"
    shipped_api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    assert {node_id: (node["class_type"], node["inputs"]) for node_id, node in queued.items()} == \
        {node_id: (node["class_type"], node["inputs"]) for node_id, node in shipped_api.items()}, \
        "what the frontend would queue differs from the shipped API file"


CONVERT_WITH_COMFY_CLI = """
import json, sys
from comfy_cli.workflow_to_api import convert_ui_to_api
workflow, object_info = (json.load(open(path)) for path in sys.argv[1:3])
print(json.dumps(convert_ui_to_api(workflow, object_info)))
"""


@pytest.mark.parametrize("name", SHIPPED)
def test_comfy_cli_converts_the_ui_workflow_to_the_shipped_api_graph(name: str, comfyui_server,
                                                                     tmp_path: Path) -> None:
    """An independent converter (comfy-cli's, with the live server's node list) agrees with ours."""
    object_info_path = tmp_path / "object_info.json"
    object_info_path.write_text(json.dumps(comfyui_server.get_json("/object_info")))
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    converted = subprocess.run([python, "-c", CONVERT_WITH_COMFY_CLI, str(WORKFLOWS / f"{name}.json"),
                                str(object_info_path)], capture_output=True, text=True, timeout=300)
    assert converted.returncode == 0, f"comfy-cli's converter failed:\n{converted.stderr[-3000:]}"
    theirs = json.loads(converted.stdout)
    ours = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    assert {node_id: (node["class_type"], node["inputs"]) for node_id, node in theirs.items()} == \
        {node_id: (node["class_type"], node["inputs"]) for node_id, node in ours.items()}

"""The shipped workflows, checked offline against the recorded catalogue of core ComfyUI nodes.

Every graph must open in a stock ComfyUI plus this pack (known node types, valid widget values,
consistent links) and its API twin in ``workflows/api/`` must be exactly what
``scripts/workflow_api.py`` generates from it. Running them is the integration tier's job
(``test_workflows_comfyui.py``).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
WORKFLOWS = REPOSITORY / "workflows"
SHIPPED = ("selma_full", "selma_merge_only", "selma_one_skill", "selma_weak_to_strong")
SELMA_NODE_TYPES = {"SelmaSkillPrompts", "SelmaRenderDataset", "SelmaTrainLoraExpert", "SelmaMergeLoraExperts"}


def _load_workflow_api() -> Any:
    spec = importlib.util.spec_from_file_location("workflow_api", REPOSITORY / "scripts" / "workflow_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


workflow_api = _load_workflow_api()


@pytest.fixture(scope="module")
def catalogue() -> dict[str, Any]:
    return workflow_api.node_catalogue()


def _ui(name: str) -> dict[str, Any]:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def _api(name: str) -> dict[str, Any]:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def widget_problem(spec: list[Any], value: Any) -> str | None:
    """Why ``value`` is not valid for an input declared as ``spec``; None when it is.

    A dropdown of model files (recorded with no file: the recording machine had none, so at most the
    "None" choice) takes any ``.safetensors`` name; the user picks their own file when the workflow opens.
    """
    kind = workflow_api.input_type(spec)
    options = workflow_api.input_options(spec)
    if kind == "COMBO":
        choices = spec[0] if isinstance(spec[0], list) else options.get("options", [])
        if set(choices) <= {"None"} and isinstance(value, str) and value.endswith(".safetensors"):
            return None
        if not choices:
            return "expected a .safetensors file"
        return None if value in choices else f"not one of {choices}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else "expected true or false"
    if kind == "STRING":
        return None if isinstance(value, str) else "expected a string"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and not isinstance(value, int)):
        return f"expected {kind}"
    if not math.isfinite(value) or value < options.get("min", -math.inf) or value > options.get("max", math.inf):
        return f"outside [{options.get('min')}, {options.get('max')}]"
    return None


def test_each_workflow_ships_in_ui_and_api_format_with_a_thumbnail() -> None:
    assert sorted(path.stem for path in WORKFLOWS.glob("*.json")) == list(SHIPPED)
    assert sorted(path.stem for path in (WORKFLOWS / "api").glob("*.json")) == list(SHIPPED)
    for name in SHIPPED:
        thumbnail = WORKFLOWS / f"{name}.jpg"
        assert thumbnail.is_file(), f"{thumbnail} is missing: ComfyUI's template browser shows it"
        assert thumbnail.read_bytes()[:3] == b"\xff\xd8\xff", f"{thumbnail} is not a JPEG"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_node_is_a_core_comfyui_node_or_a_selma_node(name: str, catalogue: dict[str, Any]) -> None:
    core = workflow_api.core_catalogue()
    for node in _ui(name)["nodes"]:
        assert node["type"] in core or node["type"] in SELMA_NODE_TYPES \
            or node["type"] in workflow_api.UI_ONLY_NODE_TYPES, f"{name}: node {node['id']} is a {node['type']}"
        assert node.get("mode", 0) == 0, f"{name}: node {node['id']} is muted or bypassed"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_widget_value_is_valid_for_its_input(name: str, catalogue: dict[str, Any]) -> None:
    for node in _ui(name)["nodes"]:
        if node["type"] in workflow_api.UI_ONLY_NODE_TYPES:
            assert all(isinstance(text, str) and text for text in node["widgets_values"])
            continue
        inputs = dict(workflow_api.ordered_inputs(catalogue[node["type"]]))
        for widget, value in workflow_api.widget_values_by_name(node, catalogue[node["type"]]).items():
            problem = widget_problem(inputs[widget], value)
            assert problem is None, f"{name}: node {node['id']} ({node['type']}) {widget}={value!r}: {problem}"


@pytest.mark.parametrize("name", SHIPPED)
def test_links_are_consistent_and_typed(name: str, catalogue: dict[str, Any]) -> None:
    workflow = _ui(name)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]), "node ids repeat"
    assert workflow["last_node_id"] >= max(nodes) and workflow["last_link_id"] >= len(workflow["links"])
    link_ids = [link[0] for link in workflow["links"]]
    assert len(set(link_ids)) == len(link_ids), "link ids repeat"
    for link_id, source_id, source_slot, target_id, target_slot, link_type in workflow["links"]:
        source, target = nodes[source_id], nodes[target_id]
        output = source["outputs"][source_slot]
        assert link_id in output["links"] and output["type"] == link_type
        target_input = target["inputs"][target_slot]
        assert target_input["link"] == link_id
        declared = dict(workflow_api.ordered_inputs(catalogue[target["type"]]))[target_input["name"]]
        assert workflow_api.input_type(declared) == link_type == catalogue[source["type"]]["output"][source_slot], \
            f"{name}: link {link_id} carries {link_type} into {target['type']}.{target_input['name']}"
    for node in workflow["nodes"]:
        for slot in node.get("inputs", []):
            assert slot["link"] is None or slot["link"] in link_ids
        for output in node.get("outputs", []):
            assert all(link in link_ids for link in output["links"] or [])


@pytest.mark.parametrize("name", SHIPPED)
def test_required_inputs_are_all_given(name: str, catalogue: dict[str, Any]) -> None:
    for node_id, node in _api(name).items():
        required = catalogue[node["class_type"]]["input"].get("required", {})
        missing = sorted(set(required) - set(node["inputs"]))
        assert not missing, f"{name}: node {node_id} ({node['class_type']}) lacks {missing}"
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in _api(name), f"{name}: node {node_id} links to missing node {value[0]}"


@pytest.mark.parametrize("name", SHIPPED)
def test_api_file_is_what_the_script_generates_from_the_ui_file(name: str, catalogue: dict[str, Any]) -> None:
    generated = workflow_api.api_text(WORKFLOWS / f"{name}.json", catalogue)
    assert (WORKFLOWS / "api" / f"{name}.json").read_text() == generated, \
        "edited by hand or stale: run .venv/bin/python scripts/workflow_api.py"


def test_the_script_check_mode_reports_no_stale_file() -> None:
    assert workflow_api.main(["--check"]) == 0


def test_workflows_name_api_key_variables_never_keys() -> None:
    for name in SHIPPED:
        for node in _api(name).values():
            if node["class_type"] == "SelmaSkillPrompts":
                assert node["inputs"]["api_key_env"].isidentifier()
        assert "sk-" not in (WORKFLOWS / f"{name}.json").read_text()


def test_selma_full_has_five_skill_lanes_with_the_paper_settings() -> None:
    graph = _api("selma_full")
    by_type: dict[str, list[dict[str, Any]]] = {}
    for node in graph.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    prompts, renders, trains = by_type["SelmaSkillPrompts"], by_type["SelmaRenderDataset"], by_type["SelmaTrainLoraExpert"]
    assert len({p["skill"] for p in prompts}) == len(renders) == len(trains) == 5
    assert all(p["count"] == 1000 and p["threshold"] == 0.8 for p in prompts)
    assert all(r["steps"] == 50 and r["cfg"] == 7.5 for r in renders)
    assert all(t["rank"] == 128 and t["steps"] == 5000 and t["learning_rate"] == 3e-4
               and t["batch_size"] * t["gradient_accumulation"] * t["gpus"] == 64 for t in trains)
    (merge,) = by_type["SelmaMergeLoraExperts"]
    experts = [merge[f"expert_{slot}"] for slot in range(1, 6)]
    assert all(graph[source]["class_type"] == "SelmaTrainLoraExpert" for source, _ in experts)
    assert len({source for source, _ in experts}) == 5
    saved = by_type["SaveImage"]
    assert len(saved) == 1 and saved[0]["filename_prefix"].startswith("selma/comparison")


# --- the converter itself, on a graph small enough to check by hand ---------------------------------

def _small_ui_graph() -> dict[str, Any]:
    return {
        "nodes": [
            {"id": 4, "type": "CheckpointLoaderSimple", "mode": 0, "widgets_values": ["model.safetensors"],
             "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]}]},
            {"id": 9, "type": "PrimitiveInt", "mode": 0, "widgets_values": [7, "randomize"],
             "outputs": [{"name": "INT", "type": "INT", "links": [2]}]},
            {"id": 3, "type": "KSampler", "mode": 0, "title": "Sampler",
             "inputs": [{"name": "model", "type": "MODEL", "link": 1},
                        {"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": 2}],
             "widgets_values": [42, "fixed", 20, 6.5, "euler", "karras", 0.75]},
            {"id": 5, "type": "MarkdownNote", "mode": 0, "widgets_values": ["a note"]},
        ],
        "links": [[1, 4, 0, 3, 0, "MODEL"], [2, 9, 0, 3, 1, "INT"]],
    }


def test_converter_skips_control_values_follows_links_and_drops_notes(catalogue: dict[str, Any]) -> None:
    graph = workflow_api.ui_to_api(_small_ui_graph(), catalogue)
    assert list(graph) == ["3", "4", "9"]
    assert graph["3"] == {"class_type": "KSampler", "_meta": {"title": "Sampler"},
                          "inputs": {"model": ["4", 0], "seed": 42, "steps": ["9", 0], "cfg": 6.5,
                                     "sampler_name": "euler", "scheduler": "karras", "denoise": 0.75}}
    assert graph["9"]["inputs"] == {"value": 7}


def test_converter_names_the_node_whose_widget_values_do_not_fit(catalogue: dict[str, Any]) -> None:
    workflow = _small_ui_graph()
    workflow["nodes"][2]["widgets_values"] = [42, 20, 6.5, "euler", "karras", 0.75]  # control value missing
    with pytest.raises(workflow_api.WorkflowError, match=r"node 3 \(KSampler\): widgets_values has 6 entries; "
                                                         r"expected 7"):
        workflow_api.ui_to_api(workflow, catalogue)


def test_converter_refuses_unknown_node_types_and_muted_nodes(catalogue: dict[str, Any]) -> None:
    workflow = _small_ui_graph()
    workflow["nodes"][0]["type"] = "SomeoneElsesLoader"
    with pytest.raises(workflow_api.WorkflowError, match="node 4: unknown node type 'SomeoneElsesLoader'"):
        workflow_api.ui_to_api(workflow, catalogue)
    workflow = _small_ui_graph()
    workflow["nodes"][1]["mode"] = 4
    with pytest.raises(workflow_api.WorkflowError, match=r"node 9 \(PrimitiveInt\): mode 4"):
        workflow_api.ui_to_api(workflow, catalogue)

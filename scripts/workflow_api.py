"""Write ``workflows/api/<name>.json`` (API format, what ``comfy run`` and ``POST /prompt`` take) from
``workflows/<name>.json`` (UI format, what ComfyUI's canvas opens and saves).

The UI files are the source: edit a workflow in ComfyUI, save it over ``workflows/<name>.json``, then
run this script. The API files are never edited by hand; a test regenerates them and fails when a
committed one differs, so the two cannot drift.

Turning a UI node into an API node needs each node type's inputs in order (which ones are widgets,
which have the frontend's extra "control after generate" value): core nodes come from
``comfyui_object_info.json`` beside this script, a recording of a stock ComfyUI 0.3.64's
``GET /object_info``; this pack's nodes come from their own ``INPUT_TYPES``. Frontend-only nodes
(notes) are dropped, as the frontend does when it queues a graph.

    .venv/bin/python scripts/workflow_api.py           # rewrite workflows/api/*.json
    .venv/bin/python scripts/workflow_api.py --check   # exit 1 if any is out of date
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parent.parent
WORKFLOWS = REPOSITORY / "workflows"
API_WORKFLOWS = WORKFLOWS / "api"
CORE_CATALOGUE = Path(__file__).resolve().with_name("comfyui_object_info.json")

# Nodes that live only on the canvas; the frontend leaves them out of what it queues.
UI_ONLY_NODE_TYPES = frozenset({"Note", "MarkdownNote"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
# litegraph node modes: 0 runs; 2 (muted) and 4 (bypassed) change what is queued.
MODE_ALWAYS = 0


class WorkflowError(ValueError):
    """A workflow that cannot be turned into a runnable graph; the message names the node."""


def core_catalogue() -> dict[str, Any]:
    """The recorded ``/object_info`` of a stock ComfyUI: every core node type with its inputs."""
    return json.loads(CORE_CATALOGUE.read_text())


def pack_catalogue() -> dict[str, Any]:
    """This pack's nodes described as ComfyUI's ``/object_info`` describes them (no ComfyUI needed)."""
    from comfyui_selma import NODE_CLASS_MAPPINGS

    catalogue = {}
    for node_type, node_class in NODE_CLASS_MAPPINGS.items():
        inputs = json.loads(json.dumps(node_class.INPUT_TYPES()))  # tuples become lists, as over HTTP
        catalogue[node_type] = {
            "input": inputs,
            "input_order": {section: list(entries) for section, entries in inputs.items()},
            "output": list(node_class.RETURN_TYPES),
            "output_name": list(getattr(node_class, "RETURN_NAMES", node_class.RETURN_TYPES)),
            "name": node_type,
        }
    return catalogue


def node_catalogue() -> dict[str, Any]:
    """Core nodes and this pack's nodes: every type a shipped workflow may use."""
    return {**core_catalogue(), **pack_catalogue()}


def input_type(spec: list[Any]) -> str:
    """An input's type name; a list of options is a COMBO."""
    return "COMBO" if isinstance(spec[0], list) else str(spec[0])


def input_options(spec: list[Any]) -> dict[str, Any]:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec: list[Any]) -> bool:
    """Whether the frontend draws this input as a widget (with a value in ``widgets_values``)."""
    return input_type(spec) in WIDGET_TYPES and not input_options(spec).get("forceInput", False)


def has_control_value(name: str, spec: list[Any]) -> bool:
    """Whether the frontend adds a "control after generate" combo (one more ``widgets_values`` entry).

    The frontend's rule: the input's ``control_after_generate`` option, or, when absent, an INT
    named ``seed`` or ``noise_seed``.
    """
    if input_type(spec) not in ("INT", "COMBO"):
        return False
    return bool(input_options(spec).get("control_after_generate", input_type(spec) == "INT"
                                        and name in ("seed", "noise_seed")))


def ordered_inputs(node_info: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    """A node type's required then optional inputs, in the order the frontend lays them out."""
    inputs = node_info["input"]
    order = node_info.get("input_order") or {section: list(inputs.get(section, {})) for section in inputs}
    return [(name, inputs[section][name]) for section in ("required", "optional")
            for name in order.get(section, ())]


def widget_values_by_name(node: dict[str, Any], node_info: dict[str, Any]) -> dict[str, Any]:
    """Pair a UI node's ``widgets_values`` with its widget names, skipping control values."""
    values = list(node.get("widgets_values") or [])
    widgets = [(name, spec) for name, spec in ordered_inputs(node_info) if is_widget(spec)]
    expected = sum(2 if has_control_value(name, spec) else 1 for name, spec in widgets)
    if len(values) != expected:
        raise WorkflowError(f"node {node['id']} ({node['type']}): widgets_values has {len(values)} entries; "
                            f"expected {expected} for widgets {[name for name, _ in widgets]}")
    by_name: dict[str, Any] = {}
    position = 0
    for name, spec in widgets:
        by_name[name] = values[position]
        position += 2 if has_control_value(name, spec) else 1
    return by_name


def ui_to_api(workflow: dict[str, Any], catalogue: dict[str, Any]) -> dict[str, Any]:
    """The API-format graph a UI-format workflow queues, as the frontend's "Queue" would send it.

    A linked input takes ``[source node id, output slot]``; every other widget keeps its value.
    Muted or bypassed nodes are refused: the shipped workflows run every node they show.
    """
    links = {link[0]: link for link in workflow.get("links", [])}
    graph: dict[str, Any] = {}
    for node in sorted(workflow["nodes"], key=lambda node: node["id"]):
        node_type = node["type"]
        if node_type in UI_ONLY_NODE_TYPES:
            continue
        if node_type not in catalogue:
            raise WorkflowError(f"node {node['id']}: unknown node type {node_type!r} (neither core ComfyUI nor SELMA)")
        if node.get("mode", MODE_ALWAYS) != MODE_ALWAYS:
            raise WorkflowError(f"node {node['id']} ({node_type}): mode {node['mode']}; shipped workflows run "
                                "every node (unmute or remove it)")
        node_info = catalogue[node_type]
        widget_values = widget_values_by_name(node, node_info)
        linked = {}
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            link = links.get(slot["link"])
            if link is None:
                raise WorkflowError(f"node {node['id']} ({node_type}): input {slot['name']!r} names link "
                                    f"{slot['link']}, which the workflow does not have")
            linked[slot["name"]] = [str(link[1]), link[2]]
        inputs: dict[str, Any] = {}
        for name, spec in ordered_inputs(node_info):
            if name in linked:
                inputs[name] = linked[name]
            elif name in widget_values:
                inputs[name] = widget_values[name]
        graph[str(node["id"])] = {"inputs": inputs, "class_type": node_type,
                                  "_meta": {"title": node.get("title") or node_type}}
    return graph


def api_text(workflow_path: Path, catalogue: dict[str, Any]) -> str:
    """The API file's exact text for one UI workflow (stable: sorted ids, two-space indent)."""
    return json.dumps(ui_to_api(json.loads(workflow_path.read_text()), catalogue), indent=2) + "\n"


def ui_workflows() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.json"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when an API file is missing or differs from its UI file")
    arguments = parser.parse_args(argv)
    from comfyui_selma.trainer.storage.files import atomic_write_text

    catalogue = node_catalogue()
    stale = []
    for workflow_path in ui_workflows():
        target = API_WORKFLOWS / workflow_path.name
        text = api_text(workflow_path, catalogue)
        if target.is_file() and target.read_text() == text:
            continue
        stale.append(target)
        if not arguments.check:
            target.parent.mkdir(exist_ok=True)
            atomic_write_text(target, text)
            print(f"wrote {target.relative_to(REPOSITORY)}")
    if arguments.check and stale:
        print("out of date (run scripts/workflow_api.py): " + ", ".join(str(p.relative_to(REPOSITORY)) for p in stale))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

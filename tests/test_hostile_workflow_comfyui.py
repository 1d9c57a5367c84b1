"""Integration tier: a hostile workflow queued on a real ComfyUI, against every SELMA node.

The twin of ``test_hostile_workflow.py``: the same attacks arrive as API-format graphs through
ComfyUI's own ``/prompt`` route, the way anyone who reaches the port (or loads a shared workflow)
sends them. Each graph must end in an execution error whose message names the widget and holds no
secret, with nothing written on the machine outside what ComfyUI itself keeps, nothing created where
the attack aimed, and no request sent. Files that look just like what each widget wants lie outside
ComfyUI's folders: the node must refuse them, not read them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from lora_factories import attention_modules, random_lora, write_expert
from openai_server import MODEL, openai_server  # noqa: F401 (fixture)
from train_helpers import CAPTIONS, write_dataset

pytestmark = pytest.mark.comfyui

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
URL_SECRET = "url-password-5f1e2d3c4b5a"
COMFYUI_OWN = ("comfyui.log", "user")  # what ComfyUI itself writes while it runs any graph


def tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    entries = {}
    for folder, folders, files in os.walk(root):
        if folder == str(root):
            folders[:] = [name for name in folders if name not in skip]
            files = [name for name in files if name not in skip]
        for name in folders + files:
            path = Path(folder) / name
            entries[str(path.relative_to(root))] = (path.lstat().st_size, path.lstat().st_mtime_ns)
    return entries


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """The owner's secrets and a LoRA, a dataset and a model folder, all outside ComfyUI's folders."""
    root = tmp_path_factory.mktemp("outside-comfyui")
    (root / "secrets").mkdir()
    (root / "secrets" / "server.env").write_text(f"OPENAI_API_KEY={SECRET}\n")
    write_expert(root / "expert.safetensors", random_lora("sd1", attention_modules("sd1", 2), rank=2, seed=1))
    write_dataset(root / "dataset", captions=CAPTIONS[:2])
    (root / "model").mkdir()
    (root / "model" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


def refused(server, outside: Path, graph: dict, field: str) -> str:
    """Queue ``graph``; it must fail with a message naming ``field``, and change no file outside ComfyUI's own."""
    before_outside, before_base = tree(outside), tree(server.base_dir, COMFYUI_OWN)
    entry = server.queue_prompt_and_wait(graph, timeout_s=300)
    errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert entry["status"]["status_str"] == "error" and errors, json.dumps(entry["status"])[-3000:]
    message = errors[0]["exception_message"]
    assert message.startswith(f"{field}: "), message
    # ComfyUI keeps the graph's own inputs beside the error (current_inputs, /history): what the node says is
    # the message and the traceback.
    said = message + "".join(errors[0]["traceback"])
    assert SECRET not in said and URL_SECRET not in said and "PATH=" not in said and "root:x:0:0" not in said, said
    assert tree(outside) == before_outside, "the refused graph changed files outside ComfyUI"
    assert tree(server.base_dir, COMFYUI_OWN) == before_base, "the refused graph wrote into ComfyUI's folders"
    return message


def shown(node: dict, output: int) -> dict:
    """A graph of ``node`` and ComfyUI's Preview Any on its output ``output``: a graph needs an output node to run."""
    return {"1": node, "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", output]}}}


def prompts_node(**inputs) -> dict:
    return {"class_type": "SelmaSkillPrompts", "inputs": {
        "skill": "everyday_objects", "backend": "template", "base_url": "openai", "model": "", "api": "chat",
        "api_key_env": "", "count": 4, "threshold": 0.8, "seed": 0, "name": "hostile", **inputs}}


def train_node(checkpoint: str, **inputs) -> dict:
    return {"class_type": "SelmaTrainLoraExpert", "inputs": {
        "dataset_path": "hostile", "base_checkpoint": checkpoint, "lora_name": "hostile", "rank": 2, "alpha": 2.0,
        "learning_rate": 3e-4, "steps": 1, "batch_size": 1, "gradient_accumulation": 1, "resolution": 64,
        "precision": "no", "seed": 0, "save_every": 0, "gpus": 1, **inputs}}


def merge_node(**inputs) -> dict:
    return {"class_type": "SelmaMergeLoraExperts", "inputs": {
        "method": "linear", "weights": "", "rank": 0, "output_name": "hostile-merge", **inputs}}


@pytest.mark.parametrize("attack", ["absolute", "environ", "parent"])
def test_a_blocklist_outside_the_input_and_output_folders_is_refused_unread(comfyui_server, outside, attack):
    value = {"absolute": str(outside / "secrets" / "server.env"), "environ": "/proc/self/environ",
             "parent": os.path.relpath(outside / "secrets" / "server.env", comfyui_server.base_dir / "input")}[attack]
    refused(comfyui_server, outside, shown(prompts_node(blocklist=value, seeds="openai api key\ntwo cats\none dog",
                                                             threshold=0.01), 1), "blocklist")


def test_no_server_variable_is_sent_to_a_url_the_workflow_names(comfyui_server, outside, openai_server):
    base_url = openai_server.base_url.replace("http://", f"http://reader:{URL_SECRET}@")
    message = refused(comfyui_server, outside, shown(prompts_node(
        backend="openai", base_url=base_url, model=MODEL, api_key_env="AWS_SECRET_ACCESS_KEY"), 1), "api_key_env")
    assert "***@127.0.0.1" in message
    assert openai_server.requests == []


@pytest.mark.parametrize("attack", ["parent", "newline"])
def test_a_prompt_set_name_that_leaves_its_folder_is_refused(comfyui_server, outside, attack):
    name = {"parent": "../../../escape", "newline": "notes\nother"}[attack]
    refused(comfyui_server, outside, shown(prompts_node(name=name), 1), "name")
    assert not (comfyui_server.base_dir.parent / "escape.jsonl").exists()


def test_a_dataset_is_never_rendered_outside_the_output_folder(comfyui_server, outside, checkpoint_in_comfyui):
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_in_comfyui}},
        "2": prompts_node(name="hostile-render", seeds="a red cube\ntwo green apples\na cat", count=3),
        "3": {"class_type": "SelmaRenderDataset", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "prompts": ["2", 0], "negative_prompt": "",
            "width": 64, "height": 64, "steps": 1, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
            "seed": 0, "batch_size": 1, "dataset_name": str(outside / "new-dataset")}},
    }
    prompts = comfyui_server.queue_prompt_and_wait({"2": graph["2"], "4": {"class_type": "PreviewAny", "inputs": {
        "source": ["2", 1]}}})  # the prompt set exists before the attack, so the attack changes nothing in output/
    assert prompts["status"]["status_str"] == "success", json.dumps(prompts["status"])[-3000:]
    refused(comfyui_server, outside, graph, "dataset_name")
    assert not (outside / "new-dataset").exists()


@pytest.mark.parametrize("field", ["dataset_path", "base_model_path"])
def test_the_train_node_reads_no_dataset_or_model_outside_comfyuis_folders(comfyui_server, outside,
                                                                          checkpoint_in_comfyui, field):
    value = str(outside / ("dataset" if field == "dataset_path" else "model"))
    refused(comfyui_server, outside, {"1": train_node(checkpoint_in_comfyui, **{field: value})}, field)
    assert not (comfyui_server.base_dir / "models" / "loras" / "hostile.safetensors").exists()


def test_the_merge_node_reads_no_lora_outside_models_loras(comfyui_server, outside):
    refused(comfyui_server, outside, shown(merge_node(expert_1=str(outside / "expert.safetensors")), 3), "expert_1")
    assert not (comfyui_server.base_dir / "models" / "loras" / "hostile-merge.safetensors").exists()


def test_comfyui_itself_refuses_a_lora_pick_that_is_not_in_its_list(comfyui_server, outside):
    """A combo widget (lora_1, base_checkpoint) holding a path never reaches the node: ComfyUI checks the list."""
    with pytest.raises(RuntimeError, match="HTTP 400") as raised:
        comfyui_server.post_json("/prompt", {"prompt": shown(merge_node(lora_1="../../outside/expert.safetensors"), 3)})
    assert "lora_1" in str(raised.value)

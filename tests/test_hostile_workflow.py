"""A hostile workflow played against every SELMA node: what a shared graph can make the server read, write or send.

ComfyUI runs any graph that reaches its port, and users load workflows others made, so every widget
value is untrusted. Here each widget that takes a name, a path, a URL or an environment variable
gets what an attacker would put there, on a machine where ComfyUI's folders sit beside the owner's
secrets and beside files that look just like what each widget wants (a LoRA, a dataset, a model
folder) but lie outside ComfyUI's folders. Every attack must be refused with a message that names
the widget and never quotes a secret or a file's content, before any work starts: nothing on the
machine is written, nothing outside ComfyUI's folders is opened, no request leaves.

The real-ComfyUI twin of this module is ``test_hostile_workflow_comfyui.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from comfy_standins import SD15, ClipStandIn, comfy_model
from lora_factories import attention_modules, random_lora, write_expert
from openai_server import MODEL, openai_server  # noqa: F401 (fixture)
from PIL import Image
from train_helpers import CAPTIONS, write_dataset

from comfyui_selma.nodes import NODE_CLASSES
from comfyui_selma.nodes import render as render_node
from comfyui_selma.nodes.merge import SelmaMergeLoraExperts
from comfyui_selma.nodes.prompts import SelmaSkillPrompts
from comfyui_selma.nodes.render import SelmaRenderDataset
from comfyui_selma.nodes.train import SelmaTrainLoraExpert
from comfyui_selma.trainer.train import launch as train_run
from comfyui_selma.trainer.lora.file import read_lora
from comfyui_selma.trainer.prompts.prompt_set import PromptSet

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
URL_SECRET = "url-password-5f1e2d3c4b5a"
PASSWD_LINE = "root:x:0:0"  # what /etc/passwd starts with: never in a message
LONG = "a" * 5000

# --- the machine under attack ---------------------------------------------------------------------------


@dataclass
class Machine:
    """The folders of the attacked server: ComfyUI's (the stand-ins) beside what a workflow must never touch."""

    root: Path
    comfy: object
    secrets: Path  # the owner's key file
    elsewhere: Path  # a LoRA, a dataset, a diffusion model and an LLM outside ComfyUI's folders

    @property
    def base(self) -> Path:
        return self.comfy.base_dir

    @property
    def input(self) -> Path:
        return self.comfy.base_dir / "input"

    @property
    def datasets(self) -> Path:
        return self.comfy.output_dir / "selma" / "datasets"


@pytest.fixture
def machine(comfy, tmp_path, monkeypatch, tiny_sd1_folder) -> Machine:
    secrets = tmp_path / "secrets" / "server.env"
    secrets.parent.mkdir()
    secrets.write_text(f"OPENAI_API_KEY={SECRET}\nAWS_SECRET_ACCESS_KEY={SECRET}\n")
    elsewhere = tmp_path / "elsewhere"
    sd1 = attention_modules("sd1", 2)
    write_expert(elsewhere / "expert.safetensors", random_lora("sd1", sd1, rank=2, seed=1, title="someone's LoRA"))
    write_dataset(elsewhere / "dataset", captions=CAPTIONS[:2])
    shutil.copytree(tiny_sd1_folder, elsewhere / "model")
    (elsewhere / "llm").mkdir()
    (elsewhere / "llm" / "config.json").write_text(json.dumps({"model_type": "gpt2", "token": SECRET}))
    # What the owner put into ComfyUI's folders: a LoRA, a dataset, a diffusers model (a link, as owners do).
    comfy.base_dir.joinpath("input").mkdir()
    write_expert(comfy.models_dir("loras") / "owners.safetensors", random_lora("sd1", sd1, rank=2, seed=2))
    write_dataset(comfy.output_dir / "selma" / "datasets" / "counting", captions=CAPTIONS[:2])
    comfy.models_dir("diffusers").mkdir()
    (comfy.models_dir("diffusers") / "tiny-sd1").symlink_to(tiny_sd1_folder, target_is_directory=True)
    monkeypatch.chdir(comfy.base_dir)  # ComfyUI's working folder: a relative path not checked would land here
    monkeypatch.setenv("SELMA_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, SECRET)
    monkeypatch.delenv("SELMA_ENDPOINTS", raising=False)
    return Machine(root=tmp_path, comfy=comfy, secrets=secrets, elsewhere=elsewhere)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file, folder and link under ``root`` with its size and modification time."""
    entries = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(folder) / name
            status = path.lstat()
            entries[str(path.relative_to(root))] = (status.st_size, status.st_mtime_ns)
    return entries


# Python-level file access, recorded while a node runs (an audit hook cannot be removed, so it idles otherwise).
_opened: list[str] | None = None


def _record_opens(event: str, args: tuple) -> None:
    if _opened is not None and event in ("open", "os.listdir", "os.scandir") and args:
        target = args[0]
        if isinstance(target, (str, bytes, os.PathLike)):
            _opened.append(os.fsdecode(target))


sys.addaudithook(_record_opens)


@contextmanager
def opened_files() -> Iterator[list[str]]:
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


def forbidden_reads(machine: Machine, opened: list[str]) -> list[str]:
    """The opened paths that lie outside ComfyUI's folders: the owner's secrets, the files elsewhere, the system's."""
    def forbidden(path: str) -> bool:
        if "\0" in path:
            return False  # never reached the system: Python refuses such a path before opening
        real = Path(os.path.realpath(os.path.join(machine.base, path)))
        return (real.is_relative_to(machine.secrets.parent) or real.is_relative_to(machine.elsewhere)
                or str(real) in ("/etc/passwd", "/etc/shadow") or (str(real).startswith("/proc/")
                                                                     and real.name == "environ"))
    return [path for path in opened if forbidden(path)]


def assert_refused(machine: Machine, field: str, attack: Callable[[], object], capsys) -> str:
    """``attack`` raises a message led by ``field`` without the secret; nothing written, nothing foreign read."""
    before = tree(machine.root)
    events_before = len(machine.comfy.events)
    with opened_files() as opened, pytest.raises((ValueError, RuntimeError)) as raised:
        attack()
    message = str(raised.value)
    assert message.startswith(f"{field}: "), message
    shown = message + capsys.readouterr().out + json.dumps(machine.comfy.events[events_before:])
    assert SECRET not in shown and URL_SECRET not in shown and PASSWD_LINE not in shown, shown
    assert tree(machine.root) == before, "the refused workflow changed files on the server"
    assert forbidden_reads(machine, opened) == [], "the refused workflow read files outside ComfyUI's folders"
    return message


# --- the nodes, as a workflow drives them ----------------------------------------------------------------


def widget_defaults(node_class: type) -> dict:
    spec = node_class.INPUT_TYPES()
    return {name: options[1].get("default") for section in ("required", "optional")
            for name, options in spec.get(section, {}).items() if len(options) > 1 and "default" in options[1]}


def prompts_node(**widgets) -> object:
    values = {**widget_defaults(SelmaSkillPrompts), "skill": "everyday_objects", "backend": "template", "count": 5,
              "name": "shared", **widgets}
    return SelmaSkillPrompts().generate(**values, unique_id="1")


class FlatImages:
    """Stands in for ComfyUI's sampling (``ComfyBatchRenderer``): one flat image per prompt."""

    def __init__(self, model, clip, vae, request) -> None:
        self.size = (request.width, request.height)

    def conditioning_length(self, prompt: str) -> int:
        return render_node.conditioning_length(ClipStandIn(), prompt)

    def __call__(self, prompts, seeds):
        return [Image.new("RGB", self.size) for _ in prompts]


@pytest.fixture
def renderer(monkeypatch) -> None:
    monkeypatch.setattr(render_node, "ComfyBatchRenderer", FlatImages)


def render_node_run(**widgets) -> object:
    values = {**widget_defaults(SelmaRenderDataset), "width": 16, "height": 16, "steps": 1, "dataset_name": "mine",
              **widgets}
    prompts = PromptSet(prompts=("a red cube", "two green apples"), skill="counting", path=None)
    return SelmaRenderDataset().render(model=comfy_model(SD15), clip=ClipStandIn(), vae=object(), prompts=prompts,
                                       **values, unique_id="2")


class TrainerStarted(Exception):
    """Raised where the Train node would start its trainer process: the attack got through every check."""


@pytest.fixture
def no_trainer(monkeypatch) -> None:
    def trainer_started(*args, **kwargs):
        raise TrainerStarted

    monkeypatch.setattr(train_run.subprocess, "Popen", trainer_started)


def train_node(machine: Machine, **widgets) -> object:
    values = {**widget_defaults(SelmaTrainLoraExpert), "dataset_path": "counting", "base_checkpoint": "",
              "base_model_path": str(machine.comfy.models_dir("diffusers") / "tiny-sd1"), "lora_name": "expert",
              "rank": 2, "alpha": 2.0, "steps": 1, "batch_size": 1, "resolution": 64, "precision": "no", **widgets}
    return SelmaTrainLoraExpert().train(**values, unique_id="3")


def merge_node(**widgets) -> object:
    values = {**widget_defaults(SelmaMergeLoraExperts), "rank": 0, "output_name": "merged",
              "lora_1": "owners.safetensors", **widgets}
    return SelmaMergeLoraExperts().merge(**values, unique_id="4")


def test_every_node_of_the_pack_is_attacked_here():
    assert set(NODE_CLASSES) == {"SelmaSkillPrompts", "SelmaRenderDataset", "SelmaTrainLoraExpert",
                                 "SelmaMergeLoraExperts"}


# --- names of what a node writes: prompt sets, datasets, runs, LoRAs --------------------------------------

ESCAPING_NAMES = {
    "parent": "../../escape",
    "absolute": "/tmp/selma-escape",
    "separator": "sub/escape",
    "dots": "..",
    "newline": "notes\nother",
    "nul": "notes\0.txt",
    "dash": "-rf",
    "very long": "n" * 300,
}


@pytest.mark.parametrize("attack", ESCAPING_NAMES, ids=list(ESCAPING_NAMES))
@pytest.mark.parametrize("node, field", [("prompts", "name"), ("train", "lora_name"), ("merge", "output_name")])
def test_a_name_that_would_leave_its_output_folder_is_refused(machine, no_trainer, capsys, node, field, attack):
    name = ESCAPING_NAMES[attack]
    run = {"prompts": lambda: prompts_node(name=name), "train": lambda: train_node(machine, lora_name=name),
           "merge": lambda: merge_node(output_name=name)}[node]
    assert_refused(machine, field, run, capsys)


@pytest.mark.parametrize("attack", [name for name in ESCAPING_NAMES if name != "absolute"])
def test_a_dataset_name_that_would_leave_the_datasets_folder_is_refused(machine, renderer, capsys, attack):
    assert_refused(machine, "dataset_name", lambda: render_node_run(dataset_name=ESCAPING_NAMES[attack]), capsys)


@pytest.mark.parametrize("where", ["elsewhere", "secrets folder", "system folder", "through a link", "long"])
def test_the_render_node_writes_no_dataset_outside_comfyuis_output_folder(machine, renderer, capsys, where):
    link = machine.datasets / "shortcut"
    link.symlink_to(machine.elsewhere, target_is_directory=True)
    target = {"elsewhere": str(machine.elsewhere / "new-dataset"), "secrets folder": str(machine.secrets.parent),
              "system folder": "/etc", "through a link": "shortcut",
              "long": str(machine.comfy.output_dir / LONG)}[where]
    message = assert_refused(machine, "dataset_name", lambda: render_node_run(dataset_name=target), capsys)
    if where != "long":
        assert "output folder" in message


def test_an_absolute_dataset_path_inside_the_output_folder_is_still_rendered(machine, renderer):
    target = machine.comfy.output_dir / "my-datasets" / "objects"
    path, _ = render_node_run(dataset_name=str(target))
    assert path == str(target) and (target / "000001.png").is_file()


# --- files a node reads: blocklists, datasets, models, LoRAs ----------------------------------------------


def secret_file_values(machine: Machine, folder: Path) -> dict[str, str]:
    """What an attacker types where a node takes a file: ``folder`` is the one relative names start from."""
    return {
        "passwd": "/etc/passwd",
        "environ": "/proc/self/environ",
        "absolute": str(machine.secrets),
        "parent": os.path.relpath(machine.secrets, folder),
        "nul": "server\0.env",
        "newline": "server.env\n../../secrets/server.env",
        "dash": "-rf",
        "very long": LONG,
    }


SECRET_FILES = ["passwd", "environ", "absolute", "parent", "nul", "newline", "dash", "very long"]


@pytest.mark.parametrize("attack", SECRET_FILES + ["link in input", "home"])
def test_the_prompts_blocklist_reads_nothing_outside_comfyuis_input_and_output(machine, capsys, attack):
    (machine.input / "benchmark.txt").symlink_to(machine.secrets)
    value = {**secret_file_values(machine, machine.input), "link in input": "benchmark.txt",
             "home": "~/.ssh/id_rsa"}[attack]
    assert_refused(machine, "blocklist", lambda: prompts_node(blocklist=value, threshold=0.01,
                                                              seeds="openai api key\ntwo cats\none dog"), capsys)


@pytest.mark.parametrize("attack", SECRET_FILES + ["folder elsewhere", "link in datasets", "system folder",
                                                    "missing"])
def test_the_train_node_reads_no_dataset_outside_comfyuis_folders(machine, no_trainer, capsys, attack):
    (machine.datasets / "shortcut").symlink_to(machine.elsewhere / "dataset", target_is_directory=True)
    value = {**secret_file_values(machine, machine.datasets), "folder elsewhere": str(machine.elsewhere / "dataset"),
             "link in datasets": "shortcut", "system folder": "/etc",
             "missing": str(machine.comfy.output_dir / "no-such-dataset")}[attack]
    assert_refused(machine, "dataset_path", lambda: train_node(machine, dataset_path=value), capsys)


@pytest.mark.parametrize("attack", SECRET_FILES + ["model elsewhere", "relative to ComfyUI", "home"])
def test_the_train_node_loads_no_base_model_outside_comfyuis_model_folders(machine, no_trainer, capsys, attack):
    value = {**secret_file_values(machine, machine.comfy.models_dir("diffusers")),
             "model elsewhere": str(machine.elsewhere / "model"),
             "relative to ComfyUI": os.path.relpath(machine.elsewhere / "model", machine.base),
             "home": "~/.ssh/id_rsa"}[attack]
    assert_refused(machine, "base_model_path", lambda: train_node(machine, base_model_path=value), capsys)


@pytest.mark.parametrize("attack", SECRET_FILES + ["model elsewhere"])
def test_the_train_nodes_checkpoint_pick_stays_in_models_checkpoints(machine, no_trainer, capsys, attack):
    value = {**secret_file_values(machine, machine.comfy.models_dir("checkpoints")),
             "model elsewhere": os.path.relpath(machine.elsewhere / "model" / "unet" /
                                                "diffusion_pytorch_model.safetensors",
                                                machine.comfy.models_dir("checkpoints"))}[attack]
    assert_refused(machine, "base_checkpoint", lambda: train_node(machine, base_checkpoint=value,
                                                                  base_model_path=""), capsys)


def test_a_dataset_and_a_model_inside_comfyuis_folders_still_train(machine, no_trainer):
    linked = str(machine.datasets / "counting")  # what the Render node's dataset_path output holds
    with pytest.raises(TrainerStarted):
        train_node(machine, dataset_path=linked)
    with pytest.raises(TrainerStarted):
        train_node(machine, dataset_path="counting", base_model_path="tiny-sd1", lora_name="by-name")


@pytest.mark.parametrize("slot", ["expert_1", "lora_1"])
@pytest.mark.parametrize("attack", SECRET_FILES + ["LoRA elsewhere"])
def test_the_merge_node_reads_no_lora_outside_models_loras(machine, capsys, slot, attack):
    value = {**secret_file_values(machine, machine.comfy.models_dir("loras")),
             "LoRA elsewhere": str(machine.elsewhere / "expert.safetensors")}[attack]
    widgets = {slot: value, "lora_2": "owners.safetensors"} if slot == "expert_1" else {slot: value}
    assert_refused(machine, slot, lambda: merge_node(**widgets), capsys)
    assert not (machine.comfy.models_dir("loras") / "merged.safetensors").exists()


def test_a_lora_inside_models_loras_merges_by_name_and_by_the_path_a_train_node_gives(machine):
    (machine.comfy.models_dir("loras") / "team").mkdir()
    shutil.copy(machine.comfy.models_dir("loras") / "owners.safetensors",
                machine.comfy.models_dir("loras") / "team" / "second.safetensors")
    _, _, name, path = merge_node(expert_1=str(machine.comfy.models_dir("loras") / "owners.safetensors"),
                                  lora_2="team/second.safetensors")
    assert name == "merged.safetensors" and Path(path).parent == machine.comfy.models_dir("loras")


def test_a_merge_never_replaces_a_lora_it_did_not_make(machine, capsys):
    loras = machine.comfy.models_dir("loras")
    shutil.copy(loras / "owners.safetensors", loras / "second.safetensors")
    (loras / "notes.safetensors").write_bytes(b"not even a LoRA")
    for name in ("owners", "notes"):
        assert_refused(machine, "output_name", lambda: merge_node(lora_1="second.safetensors", output_name=name),
                       capsys)
    merge_node(lora_1="second.safetensors", output_name="mine")
    merge_node(lora_1="second.safetensors", lora_2="owners.safetensors", output_name="mine")  # its own: replaced
    assert "owners.safetensors" in read_lora(loras / "mine.safetensors").metadata["selma.merge.sources"]


@pytest.mark.parametrize("attack", ["passwd folder", "environ", "LLM elsewhere", "parent", "nul", "very long"])
def test_the_transformers_backend_loads_no_model_outside_comfyuis_models_folder(machine, capsys, attack):
    value = {"passwd folder": "/etc", "environ": "/proc/self", "LLM elsewhere": str(machine.elsewhere / "llm"),
             "parent": os.path.relpath(machine.elsewhere / "llm", machine.base / "models"), "nul": "llm\0",
             "very long": LONG}[attack]
    assert_refused(machine, "model", lambda: prompts_node(backend="transformers", model=value), capsys)


# --- keys and URLs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY", "HOME"])
@pytest.mark.parametrize("url", ["fake server", "plain http elsewhere", "https elsewhere"])
def test_no_server_variable_is_sent_to_a_url_the_workflow_names(machine, openai_server, capsys, variable, url):
    base_url = {"fake server": openai_server.base_url, "plain http elsewhere": "http://192.0.2.10:8000/v1",
                "https elsewhere": "https://collector.example/v1"}[url]
    assert_refused(machine, "api_key_env", lambda: prompts_node(backend="openai", base_url=base_url, model=MODEL,
                                                                api="chat", api_key_env=variable), capsys)
    assert openai_server.requests == []


@pytest.mark.parametrize("where", ["user info", "query"])
def test_credentials_in_a_foreign_url_never_reach_a_message(machine, openai_server, capsys, where):
    port = openai_server.base_url.split(":")[2].split("/")[0]
    base_url = {"user info": f"http://reader:{URL_SECRET}@192.0.2.10:{port}/v1",
                "query": f"https://collector.example/v1?api_key={URL_SECRET}"}[where]
    message = assert_refused(machine, "api_key_env", lambda: prompts_node(
        backend="openai", base_url=base_url, model=MODEL, api="chat", api_key_env="AWS_SECRET_ACCESS_KEY"), capsys)
    assert "***" in message
    assert openai_server.requests == []


def test_credentials_in_a_url_called_without_a_key_are_redacted_from_its_failure(machine, capsys):
    base_url = f"http://reader:{URL_SECRET}@127.0.0.1:9/v1?api_key={URL_SECRET}"  # port 9 (discard): refused
    with pytest.raises(RuntimeError, match="cannot connect") as raised:
        prompts_node(backend="openai", base_url=base_url, model=MODEL, api="chat", api_key_env="", max_requests=1)
    shown = str(raised.value) + capsys.readouterr().out + json.dumps(machine.comfy.events)
    assert "***@127.0.0.1:9" in str(raised.value) and URL_SECRET not in shown and SECRET not in shown

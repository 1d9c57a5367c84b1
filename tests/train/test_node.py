"""SELMA Train LoRA Expert on ComfyUI stand-ins, with the real trainer as its child process.

What a ComfyUI user sees: progress per step and loss events while the trainer runs; Cancel stops
the trainer (its whole process group) and queueing again resumes from the last checkpoint; the LoRA
lands in models/loras; the same settings again return it without training; a trainer that fails
raises an error carrying its last output lines; bad input is refused before any process starts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from comfy_standins import InterruptProcessingException
from train_helpers import CAPTIONS, one_torch_thread, write_dataset  # noqa: F401

from comfyui_selma.nodes import NODE_CLASSES
from comfyui_selma.nodes import train as train_node
from comfyui_selma.nodes.train import EVENT, SelmaTrainLoraExpert
from comfyui_selma.trainer.train import launch as train_run
from comfyui_selma.trainer.storage.locks import LockHeldError
from comfyui_selma.trainer.train.launch import RunError, checkpoints, run_folder_lock


@pytest.fixture
def started(monkeypatch) -> list[subprocess.Popen]:
    """Every process the node starts."""
    processes: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        process = real_popen(*args, **kwargs)
        processes.append(process)
        return process

    monkeypatch.setattr(train_run.subprocess, "Popen", recording_popen)
    return processes


@pytest.fixture
def setup(comfy, tmp_path, monkeypatch, tiny_sd1_folder):
    monkeypatch.setenv("SELMA_CACHE_DIR", str(tmp_path / "selma-cache"))  # caches and hashes: not the user's
    dataset = write_dataset(comfy.output_dir / "selma" / "datasets" / "counting", captions=CAPTIONS[:2])
    model = comfy.models_dir("diffusers") / "tiny-sd1"  # the node loads models from ComfyUI's folders only
    model.parent.mkdir()
    model.symlink_to(tiny_sd1_folder, target_is_directory=True)
    return dataset, model


def inputs(dataset: Path, model: Path, **changes) -> dict:
    values = dict(dataset_path=str(dataset), base_checkpoint="", lora_name="counting-expert", rank=4, alpha=2.0,
                  learning_rate=3e-4, steps=4, batch_size=2, gradient_accumulation=1, resolution=64,
                  precision="fp16", seed=42, save_every=2, gpus=1, base_model_path=str(model), unique_id="7")
    values.update(changes)
    return values


def group_is_gone(process: subprocess.Popen) -> bool:
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_the_node_streams_progress_cancel_stops_the_trainer_and_queueing_again_resumes(comfy, setup, started):
    dataset, model = setup
    node = SelmaTrainLoraExpert()
    comfy.cancel_after_updates = 3  # the user presses Cancel while step 3 is reported
    with pytest.raises(InterruptProcessingException):
        node.train(**inputs(dataset, model))
    assert len(started) == 1 and group_is_gone(started[0]), "cancel must kill the trainer's process group"
    assert comfy.models_unloaded == 1, "ComfyUI's models are freed before training"
    assert comfy.progress == [(1, 4), (2, 4)]
    losses = [data for event, data in comfy.events if event == EVENT and data.get("kind") == "step"]
    assert [data["step"] for data in losses][:2] == [1, 2]
    assert all(data["node"] == "7" and data["loss"] > 0 and data["max_steps"] == 4 for data in losses)
    kinds = {data["kind"] for event, data in comfy.events if event == EVENT}
    assert {"start", "cache_ready", "step"} <= kinds <= {"start", "cache", "cache_ready", "resume", "step", "save",
                                                         "notice", "done"}, "the trainer's cache kind must not "\
                                                                            "overwrite the event's kind"
    assert {data["cache_kind"] for event, data in comfy.events if data.get("kind") == "cache_ready"} == {"latents",
                                                                                                          "text"}
    run_dir = comfy.output_dir / "selma" / "train" / "counting-expert"
    assert 2 in [step for step, _ in checkpoints(run_dir)]

    comfy.cancel_after_updates = None
    comfy.progress.clear()
    name, path = node.train(**inputs(dataset, model))
    assert (name, path) == ("counting-expert.safetensors", str(comfy.models_dir("loras") / name))
    assert Path(path).read_bytes() == (run_dir / name).read_bytes()
    resumed_at = comfy.progress[0][0]
    assert resumed_at == 2 and comfy.progress[-1] == (4, 4), comfy.progress
    assert [data for event, data in comfy.events if data.get("kind") == "resume"][0]["step"] == resumed_at
    assert len(started) == 2 and group_is_gone(started[1])

    comfy.progress.clear()
    assert node.train(**inputs(dataset, model)) == (name, path)  # same settings: the finished LoRA, no training
    assert len(started) == 2 and comfy.progress == []


def test_a_failing_trainer_raises_with_its_last_output_lines(comfy, setup, started):
    dataset, model = setup
    broken = comfy.models_dir("diffusers") / "broken-model"
    shutil.copytree(model, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    with pytest.raises(RuntimeError) as raised:
        SelmaTrainLoraExpert().train(**inputs(dataset, broken, lora_name="broken"))
    message = str(raised.value)
    assert "SELMA trainer failed (exit code 1)" in message
    assert "Last lines of its output" in message and "Traceback" in message
    assert "diffusion_pytorch_model.safetensors" in message or "safetensors" in message.lower()
    assert (comfy.output_dir / "selma" / "train" / "broken" / train_node.OUTPUT_LOG).is_file()
    assert len(started) == 1 and group_is_gone(started[0])
    assert not (comfy.models_dir("loras") / "broken.safetensors").exists()


@pytest.mark.parametrize("case", ["empty dataset", "name with a path", "someone else's LoRA", "rank 0",
                                  "no base model"])
def test_bad_input_is_refused_before_any_process_starts(comfy, setup, started, case):
    dataset, model = setup
    (dataset.parent / "empty").mkdir()
    changes, message = {
        "empty dataset": ({"dataset_path": str(dataset.parent / "empty")}, "the dataset is empty"),
        "name with a path": ({"lora_name": "../../models/loras/x"}, "lora_name: '../../models/loras/x' is not a plain"),
        "someone else's LoRA": ({"lora_name": "mine"}, "already exists and is not this run's LoRA"),
        "rank 0": ({"rank": 0}, "network_dim: 0 (the LoRA rank)"),
        "no base model": ({"base_model_path": ""}, "base_checkpoint: '' is not in models/checkpoints"),
    }[case]
    (comfy.models_dir("loras") / "mine.safetensors").write_bytes(b"a LoRA the user made")
    with pytest.raises((RunError, ValueError), match=message.replace("(", r"\(").replace(")", r"\)")):
        SelmaTrainLoraExpert().train(**inputs(dataset, model, **changes))
    assert started == [] and comfy.models_unloaded == 0
    assert (comfy.models_dir("loras") / "mine.safetensors").read_bytes() == b"a LoRA the user made"


def test_the_node_lists_checkpoints_and_explains_every_input(comfy):
    (comfy.models_dir("checkpoints") / "sd15.safetensors").write_bytes(b"")
    assert NODE_CLASSES["SelmaTrainLoraExpert"] is SelmaTrainLoraExpert
    assert SelmaTrainLoraExpert.CATEGORY == "SELMA/3 train" and SelmaTrainLoraExpert.DESCRIPTION
    spec = SelmaTrainLoraExpert.INPUT_TYPES()
    assert spec["required"]["base_checkpoint"][0] == ["sd15.safetensors"]
    for section in ("required", "optional"):
        for name, (_, options) in spec[section].items():
            assert options.get("tooltip"), f"{name} has no tooltip"
    defaults = {name: options.get("default") for name, (_, options) in spec["required"].items()}
    assert (defaults["rank"], defaults["alpha"], defaults["learning_rate"], defaults["steps"]) == \
        (128, 128.0, 3e-4, 5000)
    assert defaults["batch_size"] * defaults["gradient_accumulation"] == 64 and defaults["precision"] == "fp16"
    assert SelmaTrainLoraExpert._base_model("sd15.safetensors", "") == str(comfy.models_dir("checkpoints") /
                                                                            "sd15.safetensors")


def test_caption_encoding_offers_sentences_and_a_saved_workflow_holding_segments_still_runs(comfy, setup, started,
                                                                                             monkeypatch, caplog):
    """ComfyUI checks a combo value against the node's list: the old name stays last, its tooltip says what it is."""
    choices, options = SelmaTrainLoraExpert.INPUT_TYPES()["optional"]["caption_encoding"]
    assert choices == ["chunks", "sentences", "truncate", "segments"] and options["default"] == "chunks"
    assert "'segments' is the old name of 'sentences'" in options["tooltip"]
    assert "LongAlign" not in options["tooltip"]

    class TrainerStarted(Exception):
        pass

    def trainer_started(*args, **kwargs):
        raise TrainerStarted  # what is checked is the run folder the trainer would get

    monkeypatch.setattr(SelmaTrainLoraExpert, "_run_trainer", staticmethod(trainer_started))
    dataset, model = setup
    with caplog.at_level("WARNING"), pytest.raises(TrainerStarted):
        SelmaTrainLoraExpert().train(**inputs(dataset, model, caption_encoding="segments"))
    config = (comfy.output_dir / "selma" / "train" / "counting-expert" / "config.toml").read_text()
    assert 'caption_encoding = "sentences"' in config
    assert "caption_encoding 'segments' is the old name of 'sentences'" in caplog.text


def test_a_run_another_process_trains_is_refused_before_the_trainer_starts(comfy, setup, started):
    dataset, model = setup
    run_dir = comfy.output_dir / "selma" / "train" / "counting-expert"
    with run_folder_lock(run_dir), pytest.raises(LockHeldError, match=f"counting-expert: in use by process "
                                                                      f"{os.getpid()}"):
        SelmaTrainLoraExpert().train(**inputs(dataset, model))
    assert started == [] and not run_dir.exists()

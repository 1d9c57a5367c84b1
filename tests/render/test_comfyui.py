"""Integration tier: SELMA Render Dataset inside a real ComfyUI, on a random-weight full-size SD 1.5.

The graph is the one a user builds: Load Checkpoint → SELMA Skill Prompts (offline template backend,
our own seed prompts, one of them 100 words long so it spans two CLIP chunks) → SELMA Render Dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.comfyui

LONG_PROMPT = "A long paragraph caption: " + " ".join(
    f"then a small wooden toy number {index} stands beside the red box" for index in range(8))
PROMPTS = ["a red cube on a table", "two green apples in a bowl", "a cat (sleeping) on a sofa", LONG_PROMPT]
SEED = 1000
SIZE = 64
STEPS = 2
# 8-bit pixels: batched and single sampler calls differ only by float rounding.
TOLERANCE = 3


def render_graph(checkpoint: str, dataset_name: str, batch_size: int, sampler: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "SelmaSkillPrompts", "inputs": {
            "skill": "everyday_objects", "backend": "template", "base_url": "", "model": "", "api": "completions",
            "api_key_env": "OPENAI_API_KEY", "count": len(PROMPTS), "threshold": 0.8, "seed": 0,
            "name": "integration-prompts", "seeds": "\n".join(PROMPTS)}},
        "3": {"class_type": "SelmaRenderDataset", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "prompts": ["2", 0], "negative_prompt": "blurry",
            "width": SIZE, "height": SIZE, "steps": STEPS, "cfg": 7.5, "sampler_name": sampler,
            "scheduler": "normal", "seed": SEED, "batch_size": batch_size, "dataset_name": dataset_name}},
    }


def ksampler_graph(checkpoint: str, prompt: str, seed: int, sampler: str) -> dict:
    """ComfyUI's plain text-to-image graph for one image, batch size 1."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": STEPS, "cfg": 7.5, "sampler_name": sampler,
            "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"reference-{seed}"}},
    }


def run(server, graph: dict) -> dict:
    entry = server.queue_prompt_and_wait(graph)
    assert entry["status"]["status_str"] == "success", (json.dumps(entry["status"], indent=1)[-3000:]
                                                        + "\n" + server.log_tail())
    return entry


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def datasets(comfyui_server, checkpoint_in_comfyui) -> dict[str, Path]:
    """The same prompts rendered three ways: batch 4, batch 1 (ancestral sampler), and batch 2 (SDE sampler)."""
    root = comfyui_server.base_dir / "output" / "selma" / "datasets"
    rendered = {}
    for name, batch_size, sampler in (("ancestral-batch4", 4, "euler_ancestral"),
                                      ("ancestral-batch1", 1, "euler_ancestral"),
                                      ("sde-batch4", 4, "dpmpp_2m_sde"),
                                      ("sde-batch1", 1, "dpmpp_2m_sde")):
        run(comfyui_server, render_graph(checkpoint_in_comfyui, name, batch_size, sampler))
        rendered[name] = root / name
    return rendered


def test_render_node_writes_the_dataset_folder_contract(datasets):
    folder = datasets["ancestral-batch4"]
    for index, prompt in enumerate(PROMPTS):
        assert (folder / f"{index:06d}.txt").read_text() == prompt
        image = pixels(folder / f"{index:06d}.png")
        assert image.shape == (SIZE, SIZE, 3)
        assert image.std() > 1.0, "a flat image: sampling produced nothing to compare"
    settings = json.loads((folder / "dataset.json").read_text())
    assert settings["skill"] == "everyday_objects"
    assert settings["generator"]["engine"] == "comfyui" and settings["generator"]["model"] == "SD15"
    assert settings["generator"]["fingerprint"]
    assert (settings["sampler"], settings["scheduler"], settings["steps"], settings["cfg"]) == \
        ("euler_ancestral", "normal", STEPS, 7.5)
    assert (settings["width"], settings["height"], settings["seeds"]) == (SIZE, SIZE, [1000, 1001, 1002, 1003])
    assert not [path.name for path in folder.iterdir() if path.name.endswith(".tmp")]


@pytest.mark.parametrize("sampler", ["ancestral", "sde"])
def test_prompts_batched_in_one_sampler_call_give_the_images_rendered_one_by_one(datasets, sampler):
    batched, single = datasets[f"{sampler}-batch4"], datasets[f"{sampler}-batch1"]
    different_prompts = []
    for index in range(len(PROMPTS)):
        together, alone = pixels(batched / f"{index:06d}.png"), pixels(single / f"{index:06d}.png")
        assert np.abs(together - alone).max() <= TOLERANCE, f"image {index} ({sampler})"
        different_prompts.append(together)
    assert np.abs(different_prompts[0] - different_prompts[1]).max() > 10, "different prompts gave the same image"


def test_an_image_in_a_batch_equals_ksampler_with_its_seed_and_batch_size_1(comfyui_server, checkpoint_in_comfyui,
                                                                           datasets):
    index = 1  # the second image of a batch: seed SEED + 1
    entry = run(comfyui_server, ksampler_graph(checkpoint_in_comfyui, PROMPTS[index], SEED + index,
                                               "euler_ancestral"))
    saved = entry["outputs"]["7"]["images"][0]
    reference = pixels(comfyui_server.base_dir / "output" / saved["subfolder"] / saved["filename"])
    ours = pixels(datasets["ancestral-batch4"] / f"{index:06d}.png")
    assert np.abs(ours - reference).max() <= TOLERANCE

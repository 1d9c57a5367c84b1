"""Integration tier: the trainer against a real ComfyUI.

- SELMA Train LoRA Expert runs inside ComfyUI on a random-weight full-size SD 1.5 checkpoint from
  models/checkpoints (2 steps at 64 px), and the LoRA it writes into models/loras loads through
  ComfyUI's own LoraLoader with every key applied (ComfyUI logs "lora key not loaded" for any key it
  cannot place).
- Long captions are cut into exactly the token pieces ComfyUI's own tokenizers make of a prompt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors import safe_open
from full_size_models import CHECKPOINT_NAME
from train_helpers import CAPTIONS, write_dataset

from comfyui_selma.trainer.text.encoding import caption_chunks
from comfyui_selma.trainer.families.configs import config_folder

pytestmark = pytest.mark.comfyui

LORA_NAME = "selma-integration-expert"
LONG_CAPTION = ("A long paragraph caption about a busy kitchen. " + " ".join(
    f"on shelf {index} there are {index + 2} small red wooden spoons, a blue cup and a green (ceramic) bowl"
    for index in range(9)) + " The light comes from the window on the left!")


def run(server, graph: dict) -> dict:
    entry = server.queue_prompt_and_wait(graph, timeout_s=900)
    assert entry["status"]["status_str"] == "success", (json.dumps(entry["status"], indent=1)[-3000:]
                                                        + "\n" + server.log_tail())
    return entry


def test_a_lora_trained_by_the_node_on_sd15_loads_in_comfyui_with_every_key_applied(comfyui_server,
                                                                                    checkpoint_in_comfyui):
    write_dataset(comfyui_server.base_dir / "output" / "selma" / "datasets" / "train-integration",
                  captions=CAPTIONS[:2])
    run(comfyui_server, {"1": {"class_type": "SelmaTrainLoraExpert", "inputs": {
        "dataset_path": "train-integration", "base_checkpoint": checkpoint_in_comfyui, "lora_name": LORA_NAME,
        "rank": 128, "alpha": 128.0, "learning_rate": 3e-4, "steps": 2, "batch_size": 1, "gradient_accumulation": 1,
        "resolution": 64, "precision": "fp16", "seed": 42, "save_every": 0, "gpus": 1}}})
    lora = comfyui_server.base_dir / "models" / "loras" / f"{LORA_NAME}.safetensors"
    with safe_open(str(lora), framework="pt") as stored:
        keys = list(stored.keys())
        metadata = stored.metadata()
    assert len(keys) == 16 * 2 * 4 * 3  # 16 transformer blocks x (attn1, attn2) x (q, k, v, out): 3 keys each
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_network_dim"] == "128"
    assert metadata["ss_sd_model_name"] == CHECKPOINT_NAME

    log_before = comfyui_server.log_path.read_text(errors="replace")
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_in_comfyui}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora.name,
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": CAPTIONS[0], "clip": ["2", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 0, "steps": 1, "cfg": 7.5,
                                                   "sampler_name": "euler", "scheduler": "normal", "positive": ["3", 0],
                                                   "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "lora-check"}},
    }
    run(comfyui_server, graph)
    new_log = comfyui_server.log_path.read_text(errors="replace")[len(log_before):]
    assert "Prompt executed" in new_log, new_log[-3000:]  # the log slice is the LoraLoader graph's
    assert "lora key not loaded" not in new_log, new_log[-3000:]


# A 5-token word across the first 75-token boundary and a 14-token word across the second: older
# ComfyUI releases moved words of fewer than 8 tokens whole into the next piece; 0.3.x cuts at 75.
WORD_BOUNDARY_CAPTION = " ".join(["red"] * 73 + ["supercalifragilistic"] + ["red"] * 70
                                 + ["pneumonoultramicroscopicsilicovolcanoconiosis", "lamp"])


@pytest.mark.parametrize("caption", [LONG_CAPTION, WORD_BOUNDARY_CAPTION], ids=["paragraph", "word-boundaries"])
def test_long_captions_are_cut_into_the_pieces_comfyuis_tokenizers_make(tmp_path, caption):
    comfyui_path = os.environ.get("COMFYUI_PATH")
    if not comfyui_path:
        pytest.skip("integration tier: COMFYUI_PATH is not set")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {comfyui_path!r})\n"
        "import comfy.options\n"
        "comfy.options.enable_args_parsing()\n"
        "sys.argv = ['main.py', '--cpu']\n"
        "from comfy.sd1_clip import SDTokenizer\n"
        "from comfy.sdxl_clip import SDXLClipGTokenizer\n"
        "caption = sys.stdin.read()\n"
        "caption = caption.replace('(', '\\\\(').replace(')', '\\\\)')  # literal, as SELMA Render encodes it\n"
        "pieces = {name: [[token for token, _ in piece] for piece in tokenizer.tokenize_with_weights(caption)]\n"
        "          for name, tokenizer in (('clip_l', SDTokenizer()), ('clip_g', SDXLClipGTokenizer()))}\n"
        "print(json.dumps(pieces))\n")
    result = subprocess.run([python, "-c", script], input=caption, capture_output=True, text=True,
                            cwd=comfyui_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    comfy_pieces = json.loads(result.stdout.strip().splitlines()[-1])
    from transformers import CLIPTokenizer

    folder = config_folder("sdxl")
    ours = {"clip_l": caption_chunks(CLIPTokenizer.from_pretrained(folder / "tokenizer"), caption),
            "clip_g": caption_chunks(CLIPTokenizer.from_pretrained(folder / "tokenizer_2"), caption)}
    assert len(comfy_pieces["clip_l"]) >= 3
    assert ours == comfy_pieces

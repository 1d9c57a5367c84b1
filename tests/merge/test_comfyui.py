"""Integration tier: ComfyUI's own LoRA key mapping takes every key of our merged files.

A child process with ComfyUI on its path (``COMFYUI_PATH``, run by ``COMFYUI_PYTHON``) recognises the
real SD 1.5 / SDXL UNet from its LDM weight shapes (``comfy.model_detection``, meta tensors: no
weights are allocated), builds the key maps ``LoraLoader`` uses (``comfy.lora.model_lora_keys_unet``
and ``model_lora_keys_clip``) and loads the merged LoRA through ``comfy.lora.load_lora``; any
"lora key not loaded" fails the test. Loading a full checkpoint in a running ComfyUI is the slower
end-to-end check; this one runs in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from lora_factories import random_lora, text_encoder_modules, write_expert

from comfyui_selma.trainer.lora.architectures import architecture
from comfyui_selma.trainer.merge.run import MergeConfig, merge_files

pytestmark = pytest.mark.comfyui

CHILD = r"""
import json, logging, sys
comfyui_path, shapes_path, lora_path, family = sys.argv[1:]
sys.path.insert(0, comfyui_path)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.lora, comfy.model_detection
from safetensors.torch import load_file

shapes = json.load(open(shapes_path))
unet = {"model.diffusion_model." + key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
config = comfy.model_detection.model_config_from_unet(unet, "model.diffusion_model.")
assert config is not None, "ComfyUI did not recognise the UNet"
model_keys = [key.removeprefix("model.") for key in unet]

class Model:  # what model_lora_keys_unet reads
    model_config = config
    def state_dict(self):
        return dict.fromkeys(model_keys)

encoders = {"sd1": [("clip_l", 12)], "sdxl": [("clip_l", 12), ("clip_g", 32)]}[family]
clip_keys = [f"{name}.transformer.text_model.encoder.layers.{layer}.{part}.weight" for name, layers in encoders
             for layer in range(layers) for part in comfy.lora.LORA_CLIP_MAP]

class Clip:  # what model_lora_keys_clip reads
    def state_dict(self):
        return dict.fromkeys(clip_keys)

key_map = comfy.lora.model_lora_keys_unet(Model(), {})
key_map = comfy.lora.model_lora_keys_clip(Clip(), key_map)
warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger().addHandler(handler)
lora = load_file(lora_path)
patches = comfy.lora.load_lora(lora, key_map)
print(json.dumps({"model": type(config).__name__, "patches": len(patches), "keys": len(lora),
                  "not_loaded": [w for w in warnings if "lora key not loaded" in w],
                  "targets_exist": all(t in model_keys or t in clip_keys for t in patches)}))
"""


def _ldm_unet_shapes(family: str) -> dict[str, list[int]]:
    """The real UNet's weights in LDM names and shapes (meta device, then the independent LDM writer)."""
    from diffusers import UNet2DConditionModel
    from ldm_checkpoint import UNET_PREFIX, unet_to_ldm

    from comfyui_selma.trainer.families.configs import CONFIGS_PATH

    config = json.loads((CONFIGS_PATH / family / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    renamed = unet_to_ldm(unet.state_dict(), config["layers_per_block"])
    return {key.removeprefix(UNET_PREFIX): list(tensor.shape) for key, tensor in renamed.items()}


@pytest.mark.parametrize("family, method", [("sd1", "linear"), ("sdxl", "svd")])
def test_comfyui_maps_every_key_of_a_merged_lora(family, method, tmp_path):
    comfyui_path = os.environ.get("COMFYUI_PATH")
    if not comfyui_path:
        pytest.skip("integration tier: COMFYUI_PATH is not set")
    layers = [(name, module.out_features, module.in_features)
              for name, module in architecture(family).attention_projections()]
    layers += text_encoder_modules(family, layers=2)
    experts = [write_expert(tmp_path / f"expert{index}.safetensors", random_lora(family, layers, rank=2, seed=index))
               for index in range(2)]
    merged = merge_files(experts, tmp_path / "merged.safetensors", MergeConfig(method=method, rank=2)).path
    shapes = tmp_path / "unet-shapes.json"
    shapes.write_text(json.dumps(_ldm_unet_shapes(family)))
    (tmp_path / "child.py").write_text(CHILD)
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    completed = subprocess.run([python, str(tmp_path / "child.py"), comfyui_path, str(shapes), str(merged), family],
                               capture_output=True, text=True, cwd=comfyui_path, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["model"] == {"sd1": "SD15", "sdxl": "SDXL"}[family]
    assert report["not_loaded"] == []
    assert report["patches"] == len(layers) and report["keys"] == 3 * len(layers)
    assert report["targets_exist"]

"""Full-size checkpoints with random weights, for tests against a real ComfyUI.

ComfyUI recognises a checkpoint's architecture from its weight shapes, so the tiny test models are
not recognised there: the integration tier needs real-size models. Weights are random (seeded) and
stored in fp16 in the original (LDM) layout, like the files users put in ``models/checkpoints``.

A checkpoint is built once and cached across runs under ``$SELMA_TEST_CACHE`` (default
``~/.cache/comfyui-selma/test-models``), named by a hash of everything it is made from; it is written
under a temporary name and renamed, so a file that exists is complete.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest

__all__ = ["sd15_random_checkpoint", "build_sd15_random_checkpoint", "checkpoint_in_comfyui", "CHECKPOINT_NAME"]


def test_model_cache() -> Path:
    configured = os.environ.get("SELMA_TEST_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "comfyui-selma" / "test-models"


test_model_cache.__test__ = False  # a helper, not a test


def _recipe_hash(architecture: str, seed: int) -> str:
    from comfyui_selma.trainer.families.configs import CONFIGS_PATH

    digest = hashlib.sha256(f"{architecture}:{seed}:fp16".encode())
    for path in sorted((CONFIGS_PATH / architecture).rglob("*.json")):
        digest.update(path.read_bytes())
    digest.update((Path(__file__).parent / "ldm_checkpoint.py").read_bytes())
    return digest.hexdigest()[:12]


def build_sd15_random_checkpoint(seed: int = 0) -> Path:
    """A random-weight SD 1.5 (859.5 M UNet parameters) as an fp16 LDM ``.safetensors`` (~2 GB), cached."""
    target = test_model_cache() / f"sd15-random-{_recipe_hash('sd1', seed)}.safetensors"
    if target.is_file():
        return target

    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from comfyui_selma.trainer.families.configs import config_folder
    from ldm_checkpoint import save_ldm_checkpoint

    folder = config_folder("sd1")
    torch.manual_seed(seed)
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
        scheduler=PNDMScheduler.from_config(PNDMScheduler.load_config(folder / "scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(torch.float16)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_ldm_checkpoint(pipeline, temporary, "sd1")
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return target


@pytest.fixture(scope="session")
def sd15_random_checkpoint() -> Path:
    """A full-size SD 1.5 checkpoint with random weights (LDM layout, fp16), built once and cached on disk."""
    return build_sd15_random_checkpoint()


CHECKPOINT_NAME = "selma-test-sd15-random.safetensors"


@pytest.fixture(scope="session")
def checkpoint_in_comfyui(comfyui_server, sd15_random_checkpoint) -> str:
    """The random SD 1.5 checkpoint as the integration server's ``models/checkpoints`` entry; its name."""
    folder = comfyui_server.base_dir / "models" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / CHECKPOINT_NAME
    if not link.exists():
        link.symlink_to(sd15_random_checkpoint)
    return CHECKPOINT_NAME

"""Session-wide tiny models on disk: diffusers folders and the same weights as LDM single files.

``conftest.py`` re-exports these fixtures. Each model is built once per session (seeded) and both
of its forms are written from that one object, so a folder and its checkpoint hold identical weights.
torch and diffusers are imported when a fixture is first used, so tests that need no model don't pay
for them.

The shipped configs describe the full-size models, so a tiny checkpoint loads with its folder as the
config: ``load_pipeline(tiny_sd1_checkpoint, config=tiny_sd1_folder)``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

__all__ = ["tiny_sd1_folder", "tiny_sdxl_folder", "tiny_sd1_checkpoint", "tiny_sdxl_checkpoint"]


@functools.cache
def _tiny_pipeline(architecture: str) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    from comfyui_selma.trainer.families.tiny import tiny_sd1_pipeline, tiny_sdxl_pipeline

    return tiny_sdxl_pipeline() if architecture == "sdxl" else tiny_sd1_pipeline()


def _save_folder(architecture: str, folder: Path) -> Path:
    from comfyui_selma.trainer.families.tiny import save_pipeline

    return save_pipeline(_tiny_pipeline(architecture), folder)


def _save_checkpoint(architecture: str, folder: Path) -> Path:
    from ldm_checkpoint import save_ldm_checkpoint

    return save_ldm_checkpoint(_tiny_pipeline(architecture), folder / f"tiny-{architecture}.safetensors", architecture)


@pytest.fixture(scope="session")
def tiny_sd1_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.x model as a diffusers folder (safetensors weights)."""
    return _save_folder("sd1", tmp_path_factory.mktemp("tiny-sd1"))


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL model as a diffusers folder (safetensors weights)."""
    return _save_folder("sdxl", tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sd1_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 1.x weights as one LDM-layout ``.safetensors`` file, like an SD 1.5 checkpoint."""
    return _save_checkpoint("sd1", tmp_path_factory.mktemp("ckpt-sd1"))


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL weights as one LDM-layout ``.safetensors`` file, like an SDXL base checkpoint."""
    return _save_checkpoint("sdxl", tmp_path_factory.mktemp("ckpt-sdxl"))

"""Shared fixtures: ComfyUI stand-ins, tiny offline models, the real-ComfyUI integration tier."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from comfy_standins import comfy  # noqa: E402,F401
from comfyui_server import comfyui_server  # noqa: E402,F401
from comfyui_browser import chromium, frontend  # noqa: E402,F401
from model_fixtures import *  # noqa: E402,F401,F403
from full_size_models import checkpoint_in_comfyui, sd15_random_checkpoint  # noqa: E402,F401

import pytest  # noqa: E402

# A test that needs one of these builds or loads a Stable Diffusion model: the slow tier.
MODEL_FIXTURES = {"tiny_sd1_folder", "tiny_sdxl_folder", "tiny_sd1_checkpoint", "tiny_sdxl_checkpoint",
                  "sd15_random_checkpoint"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test that needs a model (so ``-m "not slow"`` is the fast tier)."""
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

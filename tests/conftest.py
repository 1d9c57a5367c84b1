"""Shared fixtures: ComfyUI stand-ins, tiny offline models, the real-ComfyUI integration tier."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from comfy_standins import comfy  # noqa: E402,F401
from comfyui_server import comfyui_server  # noqa: E402,F401
from comfyui_browser import chromium, frontend  # noqa: E402,F401
from model_fixtures import *  # noqa: E402,F401,F403
from full_size_models import checkpoint_in_comfyui, sd15_random_checkpoint  # noqa: E402,F401

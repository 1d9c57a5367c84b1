"""Stand-ins for the few ComfyUI modules the nodes touch, for unit tests without ComfyUI.

Only what the nodes use is modelled, with ComfyUI's behaviour where it matters: a ProgressBar update
raises ``InterruptProcessingException`` once the user pressed cancel (ComfyUI's progress hook calls
``throw_exception_if_processing_interrupted``), ``folder_paths`` lists real files under a temporary
ComfyUI base folder, and ``PromptServer.instance.send_sync`` records what would reach the browser.
A MODEL and a CLIP are modelled only as far as the nodes read them (:func:`comfy_model`,
:class:`ClipStandIn`). The real modules are exercised by the integration tier (``pytest -m comfyui``).
"""

from __future__ import annotations

import enum
import sys
import types
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

MODEL_FOLDERS = ("checkpoints", "loras")


@dataclass
class ComfyStandIns:
    """What a test can inspect or steer: folders, progress, browser events, cancel."""

    base_dir: Path
    progress: list[tuple[int, int]] = field(default_factory=list)
    events: list[tuple[str, Any]] = field(default_factory=list)
    models_unloaded: int = 0
    interrupt_requested: bool = False
    cancel_after_updates: int | None = None

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    def models_dir(self, folder_name: str) -> Path:
        return self.base_dir / "models" / folder_name

    def interrupt(self) -> None:
        """What the Cancel button does: the next progress update raises."""
        self.interrupt_requested = True


class InterruptProcessingException(Exception):
    """Same name and role as ``comfy.model_management.InterruptProcessingException``."""


class ModelType(enum.Enum):
    """``comfy.model_base.ModelType``: what a model predicts (the members the SD families use)."""

    EPS = 1
    V_PREDICTION = 2
    EDM = 5
    FLOW = 6


# ComfyUI's model configs (``comfy.supported_models``): a loaded model is told apart by its config's
# class and the classes it derives from, as in ComfyUI (SSD-1B is an SDXL).
class SD15:
    pass


class SD20:
    pass


class SDXL:
    pass


class SSD1B(SDXL):
    pass


class Flux:
    pass


def comfy_model(config_class: type, model_type: ModelType = ModelType.EPS) -> Any:
    """A MODEL as a checkpoint loader returns it: a ModelPatcher whose ``model`` (a ``BaseModel``) holds an
    instance of its config class as ``model_config`` and what it predicts as ``model_type``."""
    return types.SimpleNamespace(model=types.SimpleNamespace(model_config=config_class(), model_type=model_type))


class ClipStandIn:
    """A CLIP whose encodings are made up but fixed by the text, shaped as SDXL's: ``cond`` ``[1, 77, 2048]``
    (77 more per 75 tokens, counted here as 300 characters) and ``pooled_output`` ``[1, 1280]``.

    ``tokenize`` returns what ComfyUI's does: per encoder (``g``, ``l``) one list of ``(token, weight)``
    pairs per 77-token chunk (here the text's bytes in the first chunk, the others empty)."""

    CHARACTERS_PER_CHUNK = 300

    def __init__(self, width: int = 2048, pooled_width: int = 1280) -> None:
        self.width, self.pooled_width = width, pooled_width

    def tokenize(self, text: str) -> dict[str, list[list[tuple[int, float]]]]:
        chunks = [[(byte, 1.0) for byte in text.encode()]] + [[]] * (len(text) // self.CHARACTERS_PER_CHUNK)
        return {"g": chunks, "l": chunks}

    def encode_from_tokens(self, tokens: dict[str, list[list[tuple[int, float]]]], return_pooled: bool = False,
                           return_dict: bool = False) -> Any:
        import torch

        generator = torch.Generator().manual_seed(zlib.crc32(bytes(token for token, _ in tokens["l"][0])))
        pieces = len(tokens["l"])
        return {"cond": torch.randn(1, 77 * pieces, self.width, generator=generator),
                "pooled_output": torch.randn(1, self.pooled_width, generator=generator)}


def _build_modules(state: ComfyStandIns) -> dict[str, types.ModuleType]:
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_output_directory = lambda: str(state.output_dir)
    folder_paths.get_temp_directory = lambda: str(state.base_dir / "temp")
    folder_paths.get_input_directory = lambda: str(state.base_dir / "input")
    folder_paths.get_user_directory = lambda: str(state.base_dir / "user")
    folder_paths.get_folder_paths = lambda folder_name: [str(state.models_dir(folder_name))]
    folder_paths.models_dir = str(state.base_dir / "models")

    def get_filename_list(folder_name: str) -> list[str]:
        folder = state.models_dir(folder_name)
        return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())

    def get_full_path(folder_name: str, filename: str) -> str | None:
        path = state.models_dir(folder_name) / filename
        return str(path) if path.is_file() else None

    folder_paths.get_filename_list = get_filename_list
    folder_paths.get_full_path = get_full_path

    model_management = types.ModuleType("comfy.model_management")
    model_management.InterruptProcessingException = InterruptProcessingException

    def throw_exception_if_processing_interrupted() -> None:
        if state.interrupt_requested:
            state.interrupt_requested = False
            raise InterruptProcessingException()

    def unload_all_models() -> None:
        state.models_unloaded += 1

    model_management.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    model_management.processing_interrupted = lambda: state.interrupt_requested
    model_management.interrupt_current_processing = lambda value=True: setattr(state, "interrupt_requested", value)
    model_management.unload_all_models = unload_all_models
    model_management.soft_empty_cache = lambda force=False: None

    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total: int, node_id: str | None = None) -> None:
            self.total = total
            self.current = 0

        def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            if state.cancel_after_updates is not None and len(state.progress) + 1 >= state.cancel_after_updates:
                state.interrupt_requested = True
            throw_exception_if_processing_interrupted()
            state.progress.append((self.current, self.total))

        def update(self, value: int) -> None:
            self.update_absolute(self.current + value)

    utils.ProgressBar = ProgressBar

    comfy = types.ModuleType("comfy")
    comfy.__path__ = []  # a package, so `import comfy.utils` resolves to the stand-ins below
    comfy.utils = utils
    comfy.model_management = model_management

    server = types.ModuleType("server")

    class PromptServer:
        instance: "PromptServer"

        def __init__(self) -> None:
            self.client_id = "test-client"

        def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
            state.events.append((event, data))

    PromptServer.instance = PromptServer()
    server.PromptServer = PromptServer

    return {
        "folder_paths": folder_paths,
        "comfy": comfy,
        "comfy.utils": utils,
        "comfy.model_management": model_management,
        "server": server,
    }


@pytest.fixture
def comfy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ComfyStandIns:
    """Install the stand-ins as ``folder_paths``, ``comfy.*`` and ``server`` for one test."""
    state = ComfyStandIns(base_dir=tmp_path / "ComfyUI")
    for folder_name in MODEL_FOLDERS:
        state.models_dir(folder_name).mkdir(parents=True)
    state.output_dir.mkdir(parents=True)
    for module_name, module in _build_modules(state).items():
        monkeypatch.setitem(sys.modules, module_name, module)
    return state

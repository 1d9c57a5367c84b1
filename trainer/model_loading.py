"""Open a base model — a diffusers folder or a single ``.safetensors`` checkpoint — without the network.

Users point SELMA at the checkpoint they already have in ComfyUI's ``models/checkpoints``. Loading
must not reach the hub: diffusers' ``from_single_file`` looks configs up there unless it is given a
local config folder, so we always give it one (:func:`trainer.model_configs.config_folder`).
Pickled checkpoints (``.ckpt``, ``.pt``, ``.bin``) can run code when loaded; we refuse them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .model_configs import check_architecture, config_folder, detect_architecture

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_XL_PIPELINE = "StableDiffusionXLPipeline"


def checkpoint_architecture(path: str | os.PathLike[str]) -> str:
    """The family of a ``.safetensors`` checkpoint, read from its key names only (no tensor is loaded)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as checkpoint:
        return detect_architecture(checkpoint.keys(), source=path)


def load_pipeline(
    path: str | os.PathLike[str],
    architecture: str | None = None,
    torch_dtype: torch.dtype | None = None,
    config: str | os.PathLike[str] | None = None,
) -> DiffusionPipeline:
    """Load a Stable Diffusion pipeline from a diffusers folder or a single-file checkpoint, offline.

    ``architecture`` (``sd1``, ``sd2``, ``sdxl``) is detected from a checkpoint's keys when not given.
    ``config`` is the diffusers folder whose configs describe a single file's shapes; by default the
    shipped config of its architecture (the real SD 1.5, SD 2.1 768-v and SDXL base), which fits those
    models and their fine-tunes; other shapes (an inpainting UNet, a tiny test model) need their own.
    ``torch_dtype`` defaults to float32.
    """
    import torch

    source = Path(path)
    dtype = torch_dtype or torch.float32
    if source.is_dir():
        return _load_folder(source, architecture, dtype)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such model; expected a diffusers folder or a .safetensors checkpoint")
    suffix = source.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(
            f"{source}: {suffix} checkpoints are Python pickles, which can run arbitrary code when loaded, "
            "and are never unpickled here; expected a .safetensors file (convert the checkpoint to safetensors first)"
        )
    if suffix != ".safetensors":
        raise ValueError(
            f"{source}: unsupported model file {suffix!r}; expected a diffusers folder or a .safetensors checkpoint"
        )
    architecture = check_architecture(architecture) if architecture else checkpoint_architecture(source)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_class = StableDiffusionXLPipeline if architecture == "sdxl" else StableDiffusionPipeline
    return pipeline_class.from_single_file(
        os.fspath(source),
        config=os.fspath(config or config_folder(architecture)),
        local_files_only=True,
        **{_dtype_keyword(): dtype},
    )


def _dtype_keyword() -> str:
    """The dtype argument's name: diffusers renamed ``torch_dtype`` to ``dtype`` (PR 14205) and warns on
    the old name, but the releases before it know only ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _load_folder(folder: Path, architecture: str | None, dtype: torch.dtype) -> DiffusionPipeline:
    """Load a diffusers folder, checking that it is the SDXL / non-SDXL kind the caller asked for."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ValueError(f"{folder}: not a diffusers model folder; expected a model_index.json in it")
    pipeline_name = json.loads(index_path.read_text(encoding="utf-8")).get("_class_name")
    if architecture is not None and (check_architecture(architecture) == "sdxl") != (pipeline_name == _XL_PIPELINE):
        raise ValueError(
            f"{index_path}: _class_name is {pipeline_name!r}, which is not an {architecture} pipeline; "
            f"expected {_XL_PIPELINE if architecture == 'sdxl' else 'StableDiffusionPipeline'}"
        )
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(os.fspath(folder), local_files_only=True, **{_dtype_keyword(): dtype})

"""Open a base model — a diffusers folder or a single ``.safetensors`` checkpoint — without the network.

Users point SELMA at the checkpoint they already have in ComfyUI's ``models/checkpoints``. Loading
must not reach the hub: diffusers' ``from_single_file`` looks configs up there unless it is given a
local config folder, so we always give it one (:func:`trainer.families.configs.config_folder`).
Pickled checkpoints (``.ckpt``, ``.pt``, ``.bin``) can run code when loaded; we refuse them.

A single file carries no scheduler config either, so what its UNet predicts is read from its weights
the way ComfyUI reads it (:func:`checkpoint_family`): the LoRA trained here is used in ComfyUI on
that same file, and must learn what ComfyUI will sample with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .configs import (
    UNET_PREFIX,
    ModelFamily,
    check_architecture,
    check_prediction_type,
    config_folder,
    detect_architecture,
)

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_XL_PIPELINE = "StableDiffusionXLPipeline"
# ComfyUI's rules (comfy/supported_models.py, ``model_type`` of SD20 and SDXL): an SD 2.x UNet with 4
# input channels whose last attention block's first LayerNorm bias has a standard deviation above
# 0.09 is v-prediction (inpainting UNets, 9 channels, never are); an SDXL file with a ``v_pred`` key
# (ComfyUI writes one when it saves a v-prediction model) is v-prediction. Everything else: epsilon.
SD2_V_PREDICTION_PROBE = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_PREDICTION_STD = 0.09
SD2_INPUT_CONV = UNET_PREFIX + "input_blocks.0.0.weight"
SDXL_V_PREDICTION_KEY = "v_pred"


def checkpoint_family(path: str | os.PathLike[str], architecture: str | None = None) -> ModelFamily:
    """The family (from key names, unless ``architecture`` says) and prediction type (from one tensor,
    as ComfyUI decides) of a ``.safetensors`` checkpoint; nothing else is loaded."""
    import torch
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as checkpoint:
        keys = set(checkpoint.keys())
        architecture = check_architecture(architecture) if architecture else detect_architecture(keys, source=path)
        prediction_type = "epsilon"
        if architecture == "sdxl" and SDXL_V_PREDICTION_KEY in keys:
            prediction_type = "v_prediction"
        elif architecture == "sd2" and SD2_V_PREDICTION_PROBE in keys and SD2_INPUT_CONV in keys \
                and checkpoint.get_slice(SD2_INPUT_CONV).get_shape()[1] == 4:
            # As ComfyUI computes it: in the file's own precision, the population standard deviation.
            probe = checkpoint.get_tensor(SD2_V_PREDICTION_PROBE)
            if bool(torch.std(probe, unbiased=False) > SD2_V_PREDICTION_STD):
                prediction_type = "v_prediction"
    return ModelFamily(architecture, prediction_type)


def load_pipeline(
    path: str | os.PathLike[str],
    architecture: str | None = None,
    torch_dtype: torch.dtype | None = None,
    config: str | os.PathLike[str] | None = None,
    prediction_type: str | None = None,
) -> DiffusionPipeline:
    """Load a Stable Diffusion pipeline from a diffusers folder or a single-file checkpoint, offline.

    ``architecture`` (``sd1``, ``sd2``, ``sdxl``) is detected from a checkpoint's keys when not given.
    ``config`` is the diffusers folder whose configs describe a single file's shapes; by default the
    shipped config of its architecture (the real SD 1.5, SD 2.1 768-v and SDXL base), which fits those
    models and their fine-tunes; other shapes (an inpainting UNet, a tiny test model) need their own.
    The scheduler predicts ``prediction_type`` (``epsilon``, ``v_prediction``) when given; otherwise
    a folder's scheduler config says, and a single file's weights (:func:`checkpoint_family`) do,
    whatever ``config`` says. ``torch_dtype`` defaults to float32.
    """
    import torch

    source = Path(path)
    dtype = torch_dtype or torch.float32
    if prediction_type is not None:
        check_prediction_type(prediction_type)
    if source.is_dir():
        return _with_prediction_type(_load_folder(source, architecture, dtype), prediction_type)
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
    family = checkpoint_family(source, architecture)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_class = StableDiffusionXLPipeline if family.architecture == "sdxl" else StableDiffusionPipeline
    pipeline = pipeline_class.from_single_file(
        os.fspath(source),
        config=os.fspath(config or config_folder(family.architecture)),
        local_files_only=True,
        **{_dtype_keyword(): dtype},
    )
    return _with_prediction_type(pipeline, prediction_type or family.prediction_type)


def _with_prediction_type(pipeline: DiffusionPipeline, prediction_type: str | None) -> DiffusionPipeline:
    """The pipeline with its scheduler set to predict ``prediction_type`` (None: left as it is)."""
    if prediction_type is not None and pipeline.scheduler.config.prediction_type != prediction_type:
        pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config,
                                                                  prediction_type=prediction_type)
    return pipeline


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

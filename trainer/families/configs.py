"""Offline diffusers configs for the base models SELMA trains on, and recognising a checkpoint's family.

A single-file checkpoint (``.safetensors`` in the original LDM layout, the file ComfyUI and A1111
load) holds weights but no configs. diffusers needs a diffusers-format folder beside it to know the
shapes, the scheduler and the tokenizer; without one it asks the hub. The package ships the real
configs of SD 1.5, SD 2.1 (768-v) and SDXL base 1.0 in ``data/configs/<architecture>``, and
:func:`config_folder` completes them with generated tokenizer folders, so loading never downloads.

The shipped pipelines leave out the safety checker and its feature extractor: an LDM checkpoint
does not contain them, and SD 2.1 and SDXL ship without one too.

A family alone does not say what the UNet predicts: SD 2.x comes as the 512 px epsilon model
(``v2-1_512``) and the 768 px v-prediction model (``v2-1_768-v``) with the same shapes, and some SDXL
fine-tunes predict v. :class:`ModelFamily` holds both; :func:`native_resolution` the size each
was trained at.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..text import clip_tokenizer

ARCHITECTURES = ("sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")
CONFIGS_PATH = Path(__file__).resolve().parents[1] / "data" / "configs"
# The square image size each family was trained at (SD 2.x: its 768-v models, as the shipped config).
NATIVE_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024}
SD2_BASE_RESOLUTION = 512  # SD 2.0/2.1 "base": the epsilon models, trained at 512

# Tokenizer folder → pad token. OpenAI's CLIP-L pads with <|endoftext|>; the OpenCLIP encoders
# (SD 2.x, SDXL's second) pad with "!" — as in the real models' special_tokens_map.json.
_TOKENIZERS = {
    "sd1": {"tokenizer": clip_tokenizer.END_OF_TEXT},
    "sd2": {"tokenizer": "!"},
    "sdxl": {"tokenizer": clip_tokenizer.END_OF_TEXT, "tokenizer_2": "!"},
}

# Key prefixes of the text encoders in the original (LDM) layout, most specific first.
_TEXT_ENCODER_PREFIXES = (
    ("sdxl", "conditioner.embedders.1.model."),
    ("sd2", "cond_stage_model.model."),
    ("sd1", "cond_stage_model.transformer."),
)
UNET_PREFIX = "model.diffusion_model."


def check_architecture(architecture: str) -> str:
    """Return ``architecture`` if it is one of :data:`ARCHITECTURES`; raise naming the choices otherwise."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture: {architecture!r} is not supported; expected one of {', '.join(ARCHITECTURES)}")
    return architecture


@dataclass(frozen=True)
class ModelFamily:
    """What a base model is: its family (``sd1``, ``sd2``, ``sdxl``) and what its UNet predicts."""

    architecture: str
    prediction_type: str  # epsilon / v_prediction

    @property
    def native_resolution(self) -> int:
        return native_resolution(self.architecture, self.prediction_type)


def native_resolution(architecture: str, prediction_type: str) -> int:
    """The square size a family was trained at: SD 1.x 512, SD 2.x 768 for v-prediction (768-v) and 512
    for epsilon (the 512 base model), SDXL 1024 (how sd-scripts picks ``modelspec.resolution``)."""
    if check_architecture(architecture) == "sd2" and prediction_type == "epsilon":
        return SD2_BASE_RESOLUTION
    return NATIVE_RESOLUTION[architecture]


def check_prediction_type(prediction_type: str, source: str = "prediction_type") -> str:
    """Return ``prediction_type`` if it is one of :data:`PREDICTION_TYPES`; raise naming the choices otherwise."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{source}: {prediction_type!r} is not supported; expected one of "
                         f"{', '.join(PREDICTION_TYPES)}")
    return prediction_type


def cache_root() -> Path:
    """Where generated files live: ``$SELMA_CACHE_DIR``, else ``~/.cache/comfyui-selma``."""
    configured = os.environ.get("SELMA_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "comfyui-selma"


def _content_hash(architecture: str) -> str:
    """Hash of everything the folder is made from, so an upgrade of the package never reuses a stale copy."""
    digest = hashlib.sha256()
    shipped = CONFIGS_PATH / architecture
    for path in sorted(shipped.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(shipped).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(clip_tokenizer.BPE_PATH.read_bytes())
    digest.update(Path(clip_tokenizer.__file__).read_bytes())
    digest.update(repr(sorted(_TOKENIZERS[architecture].items())).encode())
    return digest.hexdigest()[:16]


def config_folder(architecture: str) -> Path:
    """A complete diffusers config folder (no weights) for ``architecture``, built once and cached.

    The folder is written under a temporary name and renamed into place, so a folder that exists is
    complete; a process that loses the race to another uses the winner's copy.
    """
    check_architecture(architecture)
    target = cache_root() / "configs" / f"{architecture}-{_content_hash(architecture)}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        shutil.copytree(CONFIGS_PATH / architecture, building, dirs_exist_ok=True)
        for subfolder, pad_token in _TOKENIZERS[architecture].items():
            clip_tokenizer.write_tokenizer_folder(building / subfolder, pad_token=pad_token)
        os.rename(building, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def detect_architecture(state_dict_keys: Iterable[str], source: str | os.PathLike[str] = "checkpoint") -> str:
    """Name the model family of a single-file checkpoint in the original (LDM) layout from its keys.

    SDXL keeps its OpenCLIP bigG encoder at ``conditioner.embedders.1.model.*``, SD 2.x its OpenCLIP
    ViT-H at ``cond_stage_model.model.*``, SD 1.x its CLIP-L at ``cond_stage_model.transformer.*``.
    ``source`` names the file in the error raised when the keys match none of them.
    """
    keys = list(state_dict_keys)
    if any(key.startswith(UNET_PREFIX) for key in keys):
        for architecture, prefix in _TEXT_ENCODER_PREFIXES:
            if any(key.startswith(prefix) for key in keys):
                return architecture
    expected = ", ".join(f"'{prefix}*' ({architecture})" for architecture, prefix in _TEXT_ENCODER_PREFIXES)
    raise ValueError(
        f"{source}: not a Stable Diffusion checkpoint in the original (LDM) layout; expected UNet keys "
        f"'{UNET_PREFIX}*' and text-encoder keys {expected}; found {len(keys)} keys such as {keys[:3]}"
    )

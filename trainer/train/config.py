"""Settings of one LoRA expert's training run: one dataclass, kohya-style names, SELMA's defaults.

:class:`TrainConfig` is the single source of every training setting. The ``selma train`` flags, the
``config.toml`` written into each run folder and the SELMA Train LoRA Expert node's tooltips all
read their names, defaults and help text from it. Defaults are the paper's (SELMA §4.1 and its
released scripts): rank 128, alpha 128 (scale 1), LoRA on the UNet attention projections, constant
learning rate 3e-4, an effective batch of 64, 5,000 steps, fp16 mixed precision with fp32 LoRA
weights, random horizontal flip, seed 42, a checkpoint every 1,000 steps.

Pure Python (no torch): the node imports it to build its widgets.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..text.encoding import MODES, RENAMED_MODES
from ..storage.files import atomic_write_text, check_name
from ..families.configs import PREDICTION_TYPES, ModelFamily
from ..settings import current_choice, setting

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_FILE = "config.toml"
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp32", "fp16", "bf16")
OPTIMIZERS = ("AdamW", "AdamW8bit")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
CAPTION_ENCODINGS = MODES
ARCHITECTURE_CHOICES = ("auto", "sd1", "sd2", "sdxl")
PREDICTION_TYPE_CHOICES = ("auto", *PREDICTION_TYPES)
SELMA_TARGET_MODULES = "to_q,to_k,to_v,to_out.0"

# Settings that do not change what the first N steps compute: a finished or interrupted run may be
# continued with new values of these. Every other field must match to resume a run folder.
CONTINUABLE_FIELDS = ("max_train_steps", "save_every_n_steps", "checkpoints_total_limit", "cache_dir")


@dataclass
class TrainConfig:
    """Everything one expert's training run needs; the run folder's ``config.toml`` holds one of these."""

    # What to train on and what comes out.
    pretrained_model_name_or_path: str = setting(
        "", "Base model: a .safetensors checkpoint (as in ComfyUI's models/checkpoints) or a diffusers folder.")
    train_data_dir: str = setting(
        "", "Dataset folder: images (NNNNNN.png from SELMA Render, or any .png/.jpg/.webp) each with a caption "
            "file of the same name (.txt).")
    output_name: str = setting("selma-expert", "Name of the LoRA file (without .safetensors); also its title in "
                               "the metadata.")
    architecture: str = setting("auto", "Base model family: sd1, sd2, sdxl; auto: detected from the checkpoint.",
                                choices=ARCHITECTURE_CHOICES)
    prediction_type: str = setting(
        "auto", "What the base model's UNet predicts, and so what the LoRA learns: epsilon (the noise) or "
                "v_prediction (the velocity). auto: a diffusers folder's scheduler config says; a single file's "
                "weights say, as ComfyUI reads them (SD 2.x 768-v and SDXL files with a v_pred key: v_prediction; "
                "SD 1.x, the SD 2.x 512 base model, other SDXL: epsilon).", choices=PREDICTION_TYPE_CHOICES)
    model_config_dir: str = setting("", "For a single-file checkpoint whose shapes are not the standard SD 1.5 / "
                                    "SD 2.1 / SDXL ones: a diffusers folder with its configs; empty: the shipped "
                                    "config of its family.")
    skill: str = setting("", "SELMA skill written into the LoRA's metadata; empty: the skill in the dataset's "
                         "dataset.json.")
    # The LoRA network.
    network_dim: int = setting(128, "LoRA rank r of the attention projections (SELMA: 128).")
    network_alpha: float = setting(128.0, "LoRA alpha; the update is scaled by alpha / rank (SELMA: alpha = rank).")
    network_target_modules: str = setting(
        SELMA_TARGET_MODULES, "UNet modules that get a LoRA, comma-separated module names (SELMA: the attention "
                              "projections to_q, to_k, to_v, to_out.0).")
    conv_dim: int = setting(0, "Rank of a LoRA on the ResNet and resampling 3x3 convolutions (LoCon); 0: none.")
    conv_alpha: float = setting(0.0, "Alpha of the convolution LoRA; 0: same as conv_dim.")
    train_text_encoder: bool = setting(False, "Also train a LoRA on the text encoder(s) (q/k/v/out projections). "
                                       "Text-encoder outputs are then computed every step instead of cached.")
    text_encoder_lr: float = setting(0.0, "Learning rate of the text-encoder LoRA; 0: learning_rate.")
    # Optimisation.
    learning_rate: float = setting(3e-4, "Learning rate (SELMA: 3e-4, constant).")
    lr_scheduler: str = setting("constant", "Learning-rate schedule.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = setting(0, "Steps of linear warm-up (schedules with warm-up).")
    optimizer_type: str = setting("AdamW", "Optimizer: AdamW, or AdamW8bit (needs the bitsandbytes package; "
                                  "less optimizer memory).", choices=OPTIMIZERS)
    adam_beta1: float = setting(0.9, "AdamW beta1.")
    adam_beta2: float = setting(0.999, "AdamW beta2.")
    adam_weight_decay: float = setting(1e-2, "AdamW weight decay.")
    adam_epsilon: float = setting(1e-8, "AdamW epsilon.")
    max_grad_norm: float = setting(1.0, "Clip the gradient norm to this; 0: no clipping.")
    train_batch_size: int = setting(8, "Micro-batch: images per forward pass on each GPU. The effective batch is "
                                    "train_batch_size x gradient_accumulation_steps x GPUs (SELMA: 64).")
    gradient_accumulation_steps: int = setting(8, "Micro-batches whose gradients are summed per optimizer step.")
    max_train_steps: int = setting(5000, "Optimizer steps to train (SELMA: 5,000).")
    seed: int = setting(42, "Seed of the LoRA initialisation, the data order, flips, noise and timesteps; a run "
                        "is a function of its settings.")
    mixed_precision: str = setting("fp16", "Compute precision; the frozen weights are stored in it and the LoRA "
                                   "weights stay fp32. fp16 needs a CUDA GPU: elsewhere bf16 is used (or no "
                                   "mixed precision where bf16 is unsupported), and the log says so.",
                                   choices=MIXED_PRECISIONS)
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass: much less memory, "
                                           "about 20-30% slower.")
    min_snr_gamma: float = setting(0.0, "Min-SNR loss weighting gamma (5 is the usual value); 0: off.")
    noise_offset: float = setting(0.0, "Offset noise scale (0.05-0.1 helps very dark/bright images); 0: off.")
    # Data.
    resolution: int = setting(0, "Training resolution in pixels (square); images are resized so the short side "
                              "fits, then cropped. 0: the base model's own (SD1 512, SD2 768-v 768, SD2 512 base 512, "
                              "SDXL 1024).")
    random_crop: bool = setting(False, "Crop at a random place each step instead of the centre (latents are then "
                                "encoded every step: no latent cache).")
    flip_aug: bool = setting(True, "Random horizontal flip (SELMA: on); both flips are cached.")
    caption_extension: str = setting(".txt", "Extension of the caption files.")
    caption_encoding: str = setting(
        "chunks", "Long captions: 'chunks' encodes 75-token pieces, each with its start/end tokens, and "
                  "concatenates them (exactly as ComfyUI encodes a prompt); 'sentences' encodes each sentence the "
                  "same way on its own and concatenates (ComfyUI's Conditioning Concat of one encode per sentence); "
                  "'truncate' keeps the first 75 tokens (diffusers' scripts). 'segments' is the old name of "
                  "'sentences'.",
        choices=CAPTION_ENCODINGS, renamed=RENAMED_MODES)
    cache_latents: bool = setting(True, "Encode every image (and its flip) with the VAE once, on disk, instead of "
                                  "every step.")
    cache_text_encoder_outputs: bool = setting(True, "Encode every caption once, on disk (not with "
                                               "train_text_encoder).")
    cache_dir: str = setting("", "Folder of the latent and text caches, keyed by content and model; empty: "
                             "<SELMA cache>/train-cache.")
    # Saving.
    save_every_n_steps: int = setting(1000, "Save a LoRA file and a resumable checkpoint every N steps "
                                      "(SELMA: 1,000); 0: only at the end.")
    checkpoints_total_limit: int = setting(2, "Resumable checkpoints kept (the newest); 0: keep all. The LoRA "
                                           "file of every save point is always kept.")
    save_precision: str = setting("fp16", "Precision of the saved LoRA files.", choices=SAVE_PRECISIONS)
    num_processes: int = setting(0, "GPUs (processes) the run was planned for; 0: whatever accelerate launch "
                                 "starts. When set, the trainer refuses another count, which would change the "
                                 "effective batch.")

    def validate(self) -> None:
        """Raise a ``ValueError`` naming the first setting that cannot work; nothing is loaded first."""
        if not str(self.pretrained_model_name_or_path).strip():
            raise ValueError("pretrained_model_name_or_path: empty; expected a .safetensors checkpoint or a "
                             "diffusers folder")
        if not str(self.train_data_dir).strip():
            raise ValueError("train_data_dir: empty; expected the dataset folder (images with .txt captions)")
        check_name(self.output_name, "output_name")
        for name, lowest in (("network_dim", 1), ("train_batch_size", 1), ("gradient_accumulation_steps", 1),
                             ("max_train_steps", 1), ("conv_dim", 0), ("save_every_n_steps", 0),
                             ("checkpoints_total_limit", 0), ("lr_warmup_steps", 0), ("resolution", 0),
                             ("num_processes", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                hint = " (the LoRA rank)" if name == "network_dim" else ""
                raise ValueError(f"{name}: {value!r}{hint}; expected a whole number >= {lowest}")
        for name, lowest in (("learning_rate", 0.0), ("network_alpha", 0.0), ("conv_alpha", 0.0),
                             ("text_encoder_lr", 0.0), ("min_snr_gamma", 0.0), ("noise_offset", 0.0),
                             ("max_grad_norm", 0.0), ("adam_weight_decay", 0.0), ("adam_epsilon", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= lowest:
                raise ValueError(f"{name}: {value!r}; expected a number >= {lowest}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: {self.learning_rate!r}; expected a number > 0 (SELMA: 3e-4)")
        if not self.network_alpha > 0:
            raise ValueError(f"network_alpha: {self.network_alpha!r}; expected a number > 0 (SELMA: alpha = rank)")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name}: {value!r}; expected a number in [0, 1)")
        if self.resolution and self.resolution % 8:
            raise ValueError(f"resolution: {self.resolution!r} pixels; expected a multiple of 8 (the VAE works on "
                             "8x8 pixel blocks), e.g. 512, or 0 for the base model's own")
        for name, choices in (("architecture", ARCHITECTURE_CHOICES), ("prediction_type", PREDICTION_TYPE_CHOICES),
                              ("mixed_precision", MIXED_PRECISIONS), ("save_precision", SAVE_PRECISIONS),
                              ("optimizer_type", OPTIMIZERS), ("lr_scheduler", LR_SCHEDULERS),
                              ("caption_encoding", CAPTION_ENCODINGS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: {getattr(self, name)!r}; expected one of {', '.join(choices)}")
        if not self.target_modules():
            raise ValueError(f"network_target_modules: {self.network_target_modules!r}; expected comma-separated "
                             f"module names such as {SELMA_TARGET_MODULES!r}")
        if not self.caption_extension.startswith(".") or "/" in self.caption_extension:
            raise ValueError(f"caption_extension: {self.caption_extension!r}; expected an extension such as '.txt'")
        if self.random_crop and self.cache_latents:
            raise ValueError("random_crop: a new crop every step cannot come from the latent cache; set "
                             "cache_latents = false to use random_crop, or keep the centre crop")

    # Derived values, so every reader computes them the same way.
    def target_modules(self) -> list[str]:
        return [name.strip() for name in self.network_target_modules.split(",") if name.strip()]

    def effective_conv_alpha(self) -> float:
        return float(self.conv_alpha or self.conv_dim)

    def effective_text_encoder_lr(self) -> float:
        return float(self.text_encoder_lr or self.learning_rate)

    def caches_text(self) -> bool:
        return self.cache_text_encoder_outputs and not self.train_text_encoder

    def resolution_for(self, family: ModelFamily) -> int:
        return self.resolution or family.native_resolution

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_fields() -> list[str]:
    return [config_field.name for config_field in dataclasses.fields(TrainConfig)]


def config_from_dict(values: dict[str, Any], source: str = "config",
                     notify: Callable[[str], None] | None = None) -> TrainConfig:
    """Build a :class:`TrainConfig` from a mapping (a TOML table); unknown keys and wrong types are errors.

    An old name of a renamed choice is read as its current name; ``notify`` (default: standard error)
    gets a notice saying so.
    """
    known = {config_field.name: config_field for config_field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(known)}")
    converted: dict[str, Any] = {}
    for name, value in values.items():
        default = TrainConfig.__dataclass_fields__[name].default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{source}: {name} = {value!r}; expected true or false")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{source}: {name} = {value!r}; expected a number")
            value = float(value)
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{source}: {name} = {value!r}; expected a whole number")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"{source}: {name} = {value!r}; expected a string")
        converted[name] = current_choice(TrainConfig, name, value, source, notify)
    return TrainConfig(**converted)


def read_config(path: str | os.PathLike[str], notify: Callable[[str], None] | None = None) -> TrainConfig:
    """Read a run's ``config.toml`` (every setting at the top level, kohya-style names); ``notify``: see
    :func:`config_from_dict`."""
    source = Path(path)
    try:
        with source.open("rb") as stream:
            values = tomllib.load(stream)
    except FileNotFoundError:
        raise FileNotFoundError(f"{source}: no such config file; expected a run's {CONFIG_FILE}") from None
    except IsADirectoryError:
        raise ValueError(f"{source}: is a folder; expected a run's {CONFIG_FILE} file (such as "
                         f"{source / CONFIG_FILE})") from None
    except OSError as error:
        raise ValueError(f"{source}: cannot be read ({error.strerror or error}); expected a run's {CONFIG_FILE}") \
            from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{source}: not valid TOML ({error})") from None
    return config_from_dict(values, source=str(source), notify=notify)


def config_toml(config: TrainConfig) -> str:
    """The TOML text of ``config``: every setting, each preceded by its help text as a comment."""
    import tomli_w

    lines = ["# SELMA LoRA expert training run. Every setting is here; `selma train --config` and the",
             "# SELMA Train LoRA Expert node read this file. See `selma train --help` for each one.", ""]
    for config_field in dataclasses.fields(TrainConfig):
        help_text = config_field.metadata.get("help", "")
        lines.append(f"# {help_text}")
        lines.append(tomli_w.dumps({config_field.name: getattr(config, config_field.name)}).rstrip("\n"))
    return "\n".join(lines) + "\n"


def write_config(config: TrainConfig, run_dir: str | os.PathLike[str]) -> Path:
    path = Path(run_dir) / CONFIG_FILE
    atomic_write_text(path, config_toml(config))
    return path


def differences(recorded: TrainConfig, wanted: TrainConfig, ignore: tuple[str, ...] = CONTINUABLE_FIELDS) -> list[str]:
    """Settings that differ between two configs, as ``name: old -> new`` (``ignore`` left out)."""
    changed = []
    for name in config_fields():
        if name in ignore:
            continue
        old, new = getattr(recorded, name), getattr(wanted, name)
        if old != new:
            changed.append(f"{name}: {old!r} -> {new!r}")
    return changed

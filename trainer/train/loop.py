"""Stage 3: train one LoRA expert on a skill's dataset (SELMA §3.3), with accelerate.

Run as ``accelerate launch -m trainer.train --config <run>/config.toml`` (what the SELMA Train LoRA
Expert node starts, any number of GPUs) or ``selma train ...`` (one process). The run folder is the
folder of ``config.toml``; see :mod:`trainer.train.launch` for what it holds.

How a run goes, and why:

1. **Check before loading.** Settings, dataset (empty, missing captions or images, corrupt files)
   and base model family are checked first; a bad run fails in seconds with the reason.
2. **Cache.** VAE latents (both flips) and text-encoder outputs are computed once, on disk, keyed
   by content and model (:mod:`trainer.train.data`); the VAE and text encoders are then freed, so the
   loop runs the UNet alone. Captions are encoded as ComfyUI encodes prompts: 77-token pieces,
   concatenated (:mod:`trainer.text.encoding`).
3. **Train.** LoRA (PEFT) on the UNet attention projections, fp32 LoRA weights over frozen weights
   in the compute precision, PyTorch SDPA attention (diffusers' default processor). The LoRA learns
   what the base model predicts, the noise (epsilon) or the velocity (v): as a diffusers folder's
   scheduler config says, as a single file's weights say (read the way ComfyUI reads them), or as
   the ``prediction_type`` setting says. SDXL gets its pooled text embedding and size/crop time
   ids. Every random draw comes from a generator seeded by (seed, step, micro-batch of the global batch), so a
   resumed run equals an unbroken one and N processes train what one process does with N times the
   accumulation.
4. **Save.** Every ``save_every_n_steps`` a LoRA file and an accelerate checkpoint (LoRA weights,
   optimizer, scheduler), both written under temporary names and renamed; the oldest checkpoints are
   rotated out. A new start resumes from the newest checkpoint by itself.
5. **Report.** Each event is one JSON line on stdout and in ``log.jsonl``; only the main process
   writes files or prints.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..text.encoding import TOKENS_PER_CHUNK, CaptionEncoder, caption_pieces, stack_conditioning
from ..storage.files import atomic_write_text
from ..families.configs import cache_root
from ..families.hashing import model_sha256
from ..devices import accelerator_available
from ..settings import add_config_arguments, default_of
from .config import CONFIG_FILE, CONTINUABLE_FIELDS, TrainConfig, config_from_dict, read_config
from .data import LatentCache, StepPlan, TextCache, TrainingItem, derived_seed, prepare_image
from .launch import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    LOG_FILE,
    CheckedInputs,
    RunError,
    absolute_paths,
    check_inputs,
    checkpoints,
    final_lora_path,
    prepare_run_folder,
    run_folder_lock,
    run_state,
    step_lora_path,
)

if TYPE_CHECKING:
    import torch

UNET_CONV_MODULES = ("conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv")
TEXT_ENCODER_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")
TRAINABLE_FILE = "lora_parameters.safetensors"
CACHE_BATCH = 8
FAILED_EXIT_CODE = 1


class TrainError(RuntimeError):
    """Training stopped; the message says where, why and what was kept."""


# ----------------------------------------------------------------------------------------- events

class EventLog:
    """One JSON object per event, on stdout and appended to ``log.jsonl`` (main process only)."""

    def __init__(self, path: Path, enabled: bool, echo: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.enabled = enabled
        self.echo = echo or (lambda line: print(line, flush=True))

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, **fields, "time": round(time.time(), 3)}
        if self.enabled:
            line = json.dumps(record, ensure_ascii=False)
            self.echo(line)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as stream:
                stream.write(line + "\n")
        return record

    def forget_steps_after(self, step: int) -> None:
        """Drop the step records a killed run wrote past its last checkpoint, so the log reads as one run."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by the kill
            if isinstance(record, dict) and record.get("step", 0) > step and record.get("event") in ("step", "save"):
                continue
            kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))


# -------------------------------------------------------------------------------------- precision

def resolve_precision(requested: str, device_type: str) -> tuple[str, str | None]:
    """The mixed precision to use on ``device_type`` and, if it differs from ``requested``, why."""
    import torch

    if requested == "fp16" and device_type != "cuda":
        if device_type == "cpu":
            return "bf16", ("mixed_precision: fp16 needs a CUDA GPU (fp16 matrix kernels are slow or missing on CPUs); "
                            "using bf16 on this CPU instead")
        return "no", f"mixed_precision: fp16 is not used on {device_type}; training in fp32"
    if requested == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16", "mixed_precision: this GPU has no bf16 support; using fp16"
    return requested, None


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# ------------------------------------------------------------------------------------------ model

@dataclass
class BaseModel:
    architecture: str
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any
    sha256: str
    vae_scaling_factor: float

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def load_base_model(config: TrainConfig, architecture: str, load_dtype: torch.dtype,
                    prediction_type: str | None = None) -> BaseModel:
    """The frozen base model; its noise scheduler predicts ``prediction_type`` (None: what the model says)."""
    from diffusers import DDPMScheduler

    from ..families.loading import load_pipeline

    pipeline = load_pipeline(config.pretrained_model_name_or_path, architecture=architecture, torch_dtype=load_dtype,
                             config=config.model_config_dir or None, prediction_type=prediction_type)
    encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if architecture == "sdxl" else [])
    tokenizers = [pipeline.tokenizer] + ([pipeline.tokenizer_2] if architecture == "sdxl" else [])
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise TrainError(f"{config.pretrained_model_name_or_path}: its scheduler predicts "
                         f"{noise_scheduler.config.prediction_type!r}; expected epsilon or v_prediction")
    for module in (pipeline.unet, pipeline.vae, *encoders):
        module.requires_grad_(False)
        module.eval()
    return BaseModel(architecture, pipeline.unet, pipeline.vae, encoders, tokenizers, noise_scheduler,
                     model_sha256(config.pretrained_model_name_or_path), float(pipeline.vae.config.scaling_factor))


def add_lora(model: BaseModel, config: TrainConfig) -> None:
    """Wrap the UNet (and, if asked, the text encoders) with PEFT LoRA layers, seeded.

    The layers go in through peft's own ``inject_adapter_in_model``, not the libraries'
    ``add_adapter``: transformers' version refuses peft releases it has not been tested with
    (transformers 5.24 wants peft >= 0.22, which the registry does not have), and a ComfyUI
    environment brings whatever transformers and peft it already has.
    """
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(derived_seed(config.seed, "lora-init"))
    targets = config.target_modules()
    rank_pattern, alpha_pattern = {}, {}
    if config.conv_dim:
        targets = targets + list(UNET_CONV_MODULES)
        conv_pattern = "|".join(name.replace(".", r"\.") for name in UNET_CONV_MODULES)
        rank_pattern[conv_pattern] = config.conv_dim
        alpha_pattern[conv_pattern] = config.effective_conv_alpha()
    inject_adapter_in_model(LoraConfig(r=config.network_dim, lora_alpha=config.network_alpha,
                                       init_lora_weights="gaussian", target_modules=targets,
                                       rank_pattern=rank_pattern, alpha_pattern=alpha_pattern), model.unet)
    if config.train_text_encoder:
        for index, encoder in enumerate(model.text_encoders):
            inject_adapter_in_model(LoraConfig(r=config.network_dim, lora_alpha=config.network_alpha,
                                               init_lora_weights="gaussian",
                                               target_modules=text_encoder_targets(model.architecture, index,
                                                                                   encoder)), encoder)


def text_encoder_targets(architecture: str, index: int, encoder) -> list[str]:
    """The text-encoder layers a LoRA can change the conditioning through.

    SDXL reads its first encoder's penultimate hidden state, so that encoder's last layer never
    reaches the UNet: a LoRA there would stay zero (and data-parallel training would stop on its
    parameters that get no gradient).
    """
    layers = encoder.config.num_hidden_layers
    if architecture == "sdxl" and index == 0:
        layers -= 1
    return [f"encoder.layers.{layer}.self_attn.{projection}" for layer in range(layers)
            for projection in TEXT_ENCODER_MODULES]


def lora_state_dict(unet, text_encoders: list) -> dict[str, torch.Tensor]:
    """The LoRA weights in PEFT's naming, prefixed by component (``unet.``, ``text_encoder.`` …)."""
    from peft.utils import get_peft_model_state_dict

    tensors = {f"unet.{key}": value for key, value in get_peft_model_state_dict(unet).items()}
    for index, encoder in enumerate(text_encoders):
        prefix = "text_encoder." if index == 0 else "text_encoder_2."
        tensors.update({prefix + key: value for key, value in get_peft_model_state_dict(encoder).items()})
    return tensors


def write_lora_file(path: Path, tensors: dict[str, torch.Tensor], config: TrainConfig, architecture: str,
                    facts: dict[str, Any]) -> Path:
    """Write the LoRA in kohya layout with ``ss_*``/``modelspec.*`` metadata through :mod:`trainer.lora.file`."""
    from ..lora.file import LoraModule, lora_from_state_dict, lora_metadata, write_lora

    lora = lora_from_state_dict({key: value.detach().float().cpu() for key, value in tensors.items()},
                                source=str(path), architecture=architecture)
    for name, module in list(lora.modules.items()):
        is_conv = module.down.ndim == 4 and tuple(module.down.shape[2:]) != (1, 1)
        alpha = config.effective_conv_alpha() if is_conv else config.network_alpha
        lora.modules[name] = LoraModule(down=module.down, up=module.up, alpha=float(alpha))
    lora.metadata = lora_metadata(lora.architecture, title=config.output_name, rank=config.network_dim,
                                  alpha=config.network_alpha, extra=training_metadata(config, facts),
                                  prediction_type=facts["prediction_type"], resolution=facts["resolution"])
    return write_lora(lora, path, dtype=torch_dtype(config.save_precision))


def training_metadata(config: TrainConfig, facts: dict[str, Any]) -> dict[str, str]:
    """The training facts sd-scripts records (``ss_*``), the SAI description, and SELMA's own keys.

    Files and folders appear by name only: a LoRA is shared, its metadata must not show where the
    dataset and the base model sit on the machine that trained it.
    """
    skill = facts["skill"]
    network_args = {"conv_dim": str(config.conv_dim), "conv_alpha": str(config.effective_conv_alpha())} \
        if config.conv_dim else {}
    description = (f"SELMA skill expert for '{skill}': LoRA rank {config.network_dim} trained {facts['steps']} steps "
                   f"on {facts['images']} self-generated images") if skill else \
        f"LoRA rank {config.network_dim} trained {facts['steps']} steps on {facts['images']} images"
    metadata = {
        "ss_output_name": config.output_name,
        "ss_steps": str(facts["steps"]),
        "ss_max_train_steps": str(config.max_train_steps),
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(config.learning_rate),
        "ss_text_encoder_lr": str(config.effective_text_encoder_lr()) if config.train_text_encoder else "0",
        "ss_network_train_unet_only": str(not config.train_text_encoder),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_optimizer": "torch.optim.AdamW" if config.optimizer_type == "AdamW" else "bitsandbytes.optim.AdamW8bit",
        "ss_batch_size_per_device": str(config.train_batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_total_batch_size": str(facts["total_batch_size"]),
        "ss_num_train_images": str(facts["images"]),
        "ss_num_processes": str(facts["processes"]),
        "ss_resolution": f"({facts['resolution']}, {facts['resolution']})",
        "ss_mixed_precision": facts["mixed_precision"],
        "ss_save_precision": config.save_precision,
        "ss_seed": str(config.seed),
        "ss_session_id": str(facts["session_id"]),
        "ss_num_epochs": str(facts["epochs"]),
        # Every family encodes with its own default layer, what sd-scripts records as no clip_skip.
        "ss_clip_skip": "None",
        "ss_max_token_length": str(facts["max_token_length"]) if facts["max_token_length"] > TOKENS_PER_CHUNK
        else "None",
        "ss_flip_aug": str(config.flip_aug),
        "ss_random_crop": str(config.random_crop),
        "ss_min_snr_gamma": str(config.min_snr_gamma) if config.min_snr_gamma else "None",
        "ss_noise_offset": str(config.noise_offset) if config.noise_offset else "None",
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_max_grad_norm": str(config.max_grad_norm),
        "ss_caption_extension": config.caption_extension,
        "ss_cache_latents": str(config.cache_latents),
        "ss_v_parameterization": str(facts["prediction_type"] == "v_prediction"),
        "ss_sd_model_name": Path(config.pretrained_model_name_or_path).name,
        "ss_new_sd_model_hash": facts["base_sha256"],
        "ss_dataset_dirs": json.dumps({facts["dataset"]: {"n_repeats": 1, "img_count": facts["images"]}}),
        "ss_tag_frequency": json.dumps({facts["dataset"]: facts["tag_frequency"]}),
        "ss_training_comment": description,
        "ss_training_started_at": str(facts["started_at"]),
        "ss_training_finished_at": str(round(time.time(), 3)),
        "modelspec.description": description,
        "modelspec.tags": ", ".join(tag for tag in ("selma", skill) if tag),
        "selma.skill": skill,
        "selma.dataset": facts["dataset"],
        "selma.base_model": Path(config.pretrained_model_name_or_path).name,
        "selma.base_model_sha256": facts["base_sha256"],
        "selma.caption_encoding": config.caption_encoding,
        "selma.prediction_type": facts["prediction_type"],
    }
    if network_args:
        metadata["ss_network_args"] = json.dumps(network_args)
    return metadata


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """How often each comma-separated tag occurs in the captions, lower-cased, as sd-scripts counts
    for ``ss_tag_frequency`` (a sentence caption is one tag)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def longest_caption_tokens(tokenizer, captions: list[str], mode: str) -> int:
    """The caption tokens the longest caption is trained with: its 75-token pieces times 75, what
    sd-scripts' ``max_token_length`` (75, 150, 225) caps."""
    return TOKENS_PER_CHUNK * max((len(caption_pieces(tokenizer, caption, mode)) for caption in captions), default=1)


def session_id(config: TrainConfig, base_sha256: str) -> int:
    """sd-scripts' ``ss_session_id``: a 32-bit number shared by every LoRA one run saves. A run here
    is a function of its settings, so the number is too: a resumed run keeps it."""
    kept = {name: value for name, value in config.as_dict().items() if name not in CONTINUABLE_FIELDS}
    digest = hashlib.sha256(f"{base_sha256}|{json.dumps(kept, sort_keys=True)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# ------------------------------------------------------------------------------------- micro-batch

def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict, per the scheduler config: the noise (epsilon) or the velocity (v)."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


@dataclass
class TrainingData:
    """What the loop reads each step: the items, and either caches or the encoders that replace them."""

    items: tuple[TrainingItem, ...]
    resolution: int
    latent_cache: LatentCache | None
    text_cache: TextCache | None
    vae: Any = None  # when latents are not cached
    caption_encoder: CaptionEncoder | None = None  # when text outputs are not cached


def micro_batch_loss(model: BaseModel, unet, data: TrainingData, config: TrainConfig, plan: StepPlan, step: int,
                     accumulation_index: int, process_index: int, device: torch.device) -> torch.Tensor:
    """The loss of one micro-batch; every random draw comes from this micro-batch's own generator."""
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr

    generator = plan.generator(step, accumulation_index, process_index)
    items = [data.items[index] for index in plan.indices(step, accumulation_index, process_index)]
    size = len(items)
    flips = (torch.rand(size, generator=generator) < 0.5).tolist() if config.flip_aug else [False] * size
    if data.latent_cache is not None:
        loaded = [data.latent_cache.load(item, flip) for item, flip in zip(items, flips)]
        means = torch.stack([entry[0] for entry in loaded])
        stds = torch.stack([entry[1] for entry in loaded])
        original_sizes = [entry[2] for entry in loaded]
        crops = [entry[3] for entry in loaded]
    else:
        def random_offset(free_height: int, free_width: int) -> tuple[int, int]:
            return (int(torch.randint(0, free_height + 1, (1,), generator=generator)),
                    int(torch.randint(0, free_width + 1, (1,), generator=generator)))

        prepared = [prepare_image(item.image, data.resolution, flip=flip,
                                  crop_offset=random_offset if config.random_crop else None)
                    for item, flip in zip(items, flips)]
        vae = data.vae
        with torch.no_grad():
            pixels = torch.stack([image.pixels for image in prepared]).to(device, vae.dtype)
            distribution = vae.encode(pixels).latent_dist
        means, stds = distribution.mean.float().cpu(), distribution.std.float().cpu()
        original_sizes = [image.original_size for image in prepared]
        crops = [image.crop_top_left for image in prepared]
    latents = (means + stds * torch.randn(means.shape, generator=generator)) * model.vae_scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    if config.noise_offset:
        noise = noise + config.noise_offset * torch.randn((size, latents.shape[1], 1, 1), generator=generator)
    timesteps = torch.randint(0, model.noise_scheduler.config.num_train_timesteps, (size,), generator=generator)
    latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)

    captions = [item.caption for item in items]
    if data.text_cache is not None:
        loaded_text = [data.text_cache.load(caption) for caption in captions]
        hidden_states = [hidden.to(device) for hidden, _ in loaded_text]
        pooled = [entry[1] for entry in loaded_text]
    else:
        encoded = data.caption_encoder.encode(captions)
        hidden_states = [output.hidden for output in encoded]
        pooled = [output.pooled for output in encoded]
    encoder_hidden_states, attention_mask = stack_conditioning(hidden_states)

    noisy_latents = model.noise_scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(model.noise_scheduler, latents, noise, timesteps)
    extra: dict[str, Any] = {}
    if model.architecture == "sdxl":
        time_ids = torch.tensor([[*original, *crop, data.resolution, data.resolution]
                                 for original, crop in zip(original_sizes, crops)], dtype=torch.float32, device=device)
        extra["added_cond_kwargs"] = {"text_embeds": torch.stack(pooled).to(device), "time_ids": time_ids}
    prediction = unet(noisy_latents, timesteps, encoder_hidden_states, encoder_attention_mask=attention_mask,
                      return_dict=False, **extra)[0]
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if config.min_snr_gamma:
        snr = compute_snr(model.noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=config.min_snr_gamma)
        loss = loss * (weights / snr if model.prediction_type == "epsilon" else weights / (snr + 1))
    return loss.mean()


# -------------------------------------------------------------------------------------------- run

def train(config: TrainConfig, run_dir: str | os.PathLike[str], echo: Callable[[str], None] | None = None,
          checked: CheckedInputs | None = None, prepare: bool = False) -> Path:
    """Train (or resume, or find finished) the run in ``run_dir``; return the final LoRA file.

    ``config`` must be the run's ``config.toml`` (:func:`trainer.train.launch.prepare_run_folder`
    writes it; with ``prepare`` this function does, as a one-process ``selma train`` asks). Every
    process of an ``accelerate launch`` calls this; only the main one writes, and it holds the run
    folder's lock (:func:`trainer.train.launch.run_folder_lock`) from before ``config.toml`` is written
    to the end: a second trainer of the same folder is refused with the first one's pid.
    """
    from accelerate import PartialState
    from accelerate.state import AcceleratorState, GradientState

    run_dir = Path(run_dir)
    try:
        # Without a GPU the processes of a launch talk over gloo, which accelerate only sets up when told cpu=True.
        state = PartialState(cpu=not accelerator_available())
        with run_folder_lock(run_dir) if state.is_main_process else contextlib.nullcontext():
            if prepare:
                prepare_run_folder(config, run_dir)
            return _train(config, run_dir, echo, checked, state)
    finally:
        # Several runs in one process (tests, benchmarks): accelerate keeps its state in singletons.
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _train(config: TrainConfig, run_dir: Path, echo: Callable[[str], None] | None,
           checked: CheckedInputs | None, state) -> Path:
    import torch
    from accelerate import Accelerator

    checked = checked or check_inputs(config)
    family = checked.family
    architecture = family.architecture
    training_set = checked.training_set
    on_cpu = not accelerator_available()
    events = EventLog(run_dir / LOG_FILE, enabled=state.is_main_process, echo=echo)
    run = run_state(run_dir, config)
    if run.finished:
        events.emit("done", step=run.step, max_steps=config.max_train_steps, lora=str(run.final_lora), resumed=True)
        return run.final_lora
    if config.num_processes and config.num_processes != state.num_processes:
        raise RunError(f"num_processes: the run was set up for {config.num_processes} process(es) but "
                       f"{state.num_processes} were launched; the effective batch would change")

    precision, notice = resolve_precision(config.mixed_precision, state.device.type)
    accelerator = Accelerator(mixed_precision=precision, cpu=on_cpu)
    device = accelerator.device
    if device.type == "cuda":  # fixed shapes every step: let cuDNN pick its fastest kernels; TF32 for fp32 parts
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if notice:
        events.emit("notice", message=notice)
    weight_dtype = torch_dtype(precision)
    load_dtype = torch.float16 if weight_dtype == torch.float16 else torch.float32
    started_at = time.time()
    resolution = config.resolution_for(family)
    events.emit("start", architecture=architecture, prediction_type=family.prediction_type,
                images=len(training_set), resolution=resolution, max_steps=config.max_train_steps,
                resume_step=run.step, mixed_precision=precision,
                processes=accelerator.num_processes, device=str(device),
                total_batch_size=(config.train_batch_size * config.gradient_accumulation_steps
                                  * accelerator.num_processes))

    model = load_base_model(config, architecture, load_dtype, family.prediction_type)
    captions = [item.caption for item in training_set.items]
    max_token_length = longest_caption_tokens(model.tokenizers[0], captions, config.caption_encoding)
    data = prepare_training_data(model, config, training_set.items, resolution, accelerator, events, weight_dtype)

    add_lora(model, config)
    model.unet.to(device, dtype=weight_dtype)
    trained_encoders = model.text_encoders if config.train_text_encoder else []
    for encoder in trained_encoders:
        encoder.to(device, dtype=weight_dtype)
    from diffusers.training_utils import cast_training_params

    cast_training_params([model.unet, *trained_encoders], dtype=torch.float32)
    if config.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        for encoder in trained_encoders:
            encoder.gradient_checkpointing_enable()

    parameter_groups = [{"params": [p for p in model.unet.parameters() if p.requires_grad], "lr": config.learning_rate}]
    for encoder in trained_encoders:
        parameter_groups.append({"params": [p for p in encoder.parameters() if p.requires_grad],
                                 "lr": config.effective_text_encoder_lr()})
    optimizer = make_optimizer(config, parameter_groups)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=config.max_train_steps * accelerator.num_processes)
    prepared = accelerator.prepare(model.unet, *trained_encoders, optimizer, lr_scheduler)
    unet, trained_encoders = prepared[0], list(prepared[1:1 + len(trained_encoders)])
    optimizer, lr_scheduler = prepared[-2], prepared[-1]
    if data.caption_encoder is not None and trained_encoders:
        data.caption_encoder.text_encoders = trained_encoders
    trainable = [p for group in parameter_groups for p in group["params"]]
    register_state_hooks(accelerator, trainable)

    step = 0
    found = checkpoints(run_dir)
    if found:
        step, path = found[-1]
        accelerator.load_state(str(path))
    events.forget_steps_after(step)  # what a killed run logged past its last checkpoint is trained again
    if found:
        events.emit("resume", step=step, checkpoint=str(path))
    plan = StepPlan(config.seed, len(training_set), config.train_batch_size, config.gradient_accumulation_steps,
                    accelerator.num_processes)
    facts = {"skill": config.skill or training_set.skill, "images": len(training_set), "resolution": resolution,
             "total_batch_size": plan.global_batch, "processes": accelerator.num_processes,
             "mixed_precision": precision, "prediction_type": model.prediction_type, "base_sha256": model.sha256,
             "dataset": training_set.folder.name, "tag_frequency": tag_frequency(captions),
             "max_token_length": max_token_length, "session_id": session_id(config, model.sha256),
             # The loop walks the dataset as one stream of shuffled epochs: those it reaches into.
             "epochs": math.ceil(config.max_train_steps * plan.global_batch / len(training_set)),
             "started_at": started_at, "steps": step}
    saver = Saver(accelerator, run_dir, config, architecture, facts, events, unet, trained_encoders)

    unet.train()
    for encoder in trained_encoders:
        encoder.train()
    models_in_step = [unet, *trained_encoders]
    while step < config.max_train_steps:
        step_started = time.perf_counter()
        step_loss = torch.zeros((), device=device)
        for accumulation_index in range(config.gradient_accumulation_steps):
            last = accumulation_index == config.gradient_accumulation_steps - 1
            with contextlib.ExitStack() as stack:
                if not last:
                    for module in models_in_step:
                        stack.enter_context(accelerator.no_sync(module))
                loss = micro_batch_loss(model, unet, data, config, plan, step, accumulation_index,
                                        accelerator.process_index, device)
                accelerator.backward(loss / config.gradient_accumulation_steps)
            step_loss += loss.detach() / config.gradient_accumulation_steps
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = accelerator.reduce(step_loss, reduction="mean").item()
        if not math.isfinite(loss_value):
            raise TrainError(f"step {step}: the loss is {loss_value}; training diverged (lower learning_rate, or "
                             "use bf16 / fp32 mixed_precision); checkpoints written so far stay in "
                             f"{run_dir / CHECKPOINTS_DIR}")
        elapsed = time.perf_counter() - step_started
        events.emit("step", step=step, max_steps=config.max_train_steps, loss=round(loss_value, 6),
                    lr=lr_scheduler.get_last_lr()[0], images_per_s=round(plan.global_batch / elapsed, 3),
                    seconds=round(elapsed, 4))
        if step == config.max_train_steps:
            break
        if config.save_every_n_steps and step % config.save_every_n_steps == 0:
            saver.save(step, final=False)
    saver.save(step, final=True)
    final = final_lora_path(run_dir, config)
    events.emit("done", step=step, max_steps=config.max_train_steps, lora=str(final), resumed=bool(found),
                seconds=round(time.time() - started_at, 3), peak_memory_bytes=peak_memory(device))
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return final


def prepare_training_data(model: BaseModel, config: TrainConfig, items: tuple[TrainingItem, ...], resolution: int,
                          accelerator, events: EventLog, weight_dtype) -> TrainingData:
    """Fill the caches (main process first, the others then find them full) and free what the loop does not need."""
    import torch

    device = accelerator.device
    cache_folder = Path(config.cache_dir) if config.cache_dir else cache_root() / "train-cache"
    cache_folder = cache_folder / model.sha256[:16]
    latent_cache = (LatentCache(cache_folder, model.sha256, resolution, config.flip_aug)
                    if config.cache_latents else None)
    text_cache = TextCache(cache_folder, model.sha256, config.caption_encoding) if config.caches_text() else None
    # SDXL's VAE overflows in fp16; every VAE encodes in fp32 here (once per image when cached).
    vae_dtype = torch.float32 if (model.architecture == "sdxl" or weight_dtype != torch.float16) else weight_dtype
    model.vae.to(device, dtype=vae_dtype if latent_cache is None else torch.float32)
    encoder_dtype = torch.float32 if text_cache is not None else weight_dtype
    for encoder in model.text_encoders:
        encoder.to(device, dtype=encoder_dtype)
    caption_encoder = CaptionEncoder(model.architecture, model.tokenizers, model.text_encoders, config.caption_encoding,
                                     device=device)

    def reporter(kind: str) -> Callable[[int, int], None]:
        return lambda done, total: events.emit("cache", kind=kind, done=done, total=total)

    with accelerator.main_process_first():
        if latent_cache is not None:
            encoded, reused = latent_cache.build(items, model.vae, CACHE_BATCH, reporter("latents"))
            events.emit("cache_ready", kind="latents", encoded=encoded, reused=reused, folder=str(latent_cache.folder))
        if text_cache is not None:
            encoded, reused = text_cache.build([item.caption for item in items], caption_encoder, CACHE_BATCH,
                                               reporter("text"))
            events.emit("cache_ready", kind="text", encoded=encoded, reused=reused, folder=str(text_cache.folder))
    data = TrainingData(items, resolution, latent_cache, text_cache)
    if latent_cache is None:
        data.vae = model.vae
    else:
        model.vae = None
    if text_cache is None:
        data.caption_encoder = caption_encoder
    else:
        model.text_encoders = []
        model.tokenizers = []
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return data


def make_optimizer(config: TrainConfig, parameter_groups: list[dict[str, Any]]):
    import torch

    options = {"betas": (config.adam_beta1, config.adam_beta2), "weight_decay": config.adam_weight_decay,
               "eps": config.adam_epsilon}
    if config.optimizer_type == "AdamW8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise RunError("optimizer_type: AdamW8bit needs the bitsandbytes package, which is not installed; "
                           "install it (`pip install bitsandbytes`, CUDA only) or use AdamW") from None
        return bitsandbytes.optim.AdamW8bit(parameter_groups, **options)
    on_cuda = all(parameter.is_cuda for group in parameter_groups for parameter in group["params"])
    return torch.optim.AdamW(parameter_groups, fused=on_cuda or None, **options)  # one kernel for all LoRA tensors


def register_state_hooks(accelerator, trainable: list) -> None:
    """Save only the LoRA weights in a checkpoint (accelerate would save the whole frozen UNet)."""
    from safetensors.torch import load_file, save_file

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            tensors = {f"{index}": parameter.detach().cpu().contiguous() for index, parameter in enumerate(trainable)}
            save_file(tensors, os.path.join(output_dir, TRAINABLE_FILE))
        while weights:
            weights.pop()

    def load_hook(models: list, input_dir: str) -> None:
        import torch

        tensors = load_file(os.path.join(input_dir, TRAINABLE_FILE))
        if len(tensors) != len(trainable):
            raise TrainError(f"{input_dir}: holds {len(tensors)} LoRA tensors, this run trains {len(trainable)}; "
                             "the checkpoint is from other settings")
        with torch.no_grad():
            for index, parameter in enumerate(trainable):
                parameter.copy_(tensors[f"{index}"])
        while models:
            models.pop()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


class Saver:
    """Writes the LoRA file and the checkpoint of a save point; only on the main process."""

    def __init__(self, accelerator, run_dir: Path, config: TrainConfig, architecture: str, facts: dict[str, Any],
                 events: EventLog, unet, text_encoders: list) -> None:
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.config = config
        self.architecture = architecture
        self.facts = facts
        self.events = events
        self.unet = unet
        self.text_encoders = text_encoders

    def save(self, step: int, final: bool) -> None:
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            lora_path = final_lora_path(self.run_dir, self.config) if final else \
                step_lora_path(self.run_dir, self.config, step)
            checkpoint = self.run_dir / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}{step}"
            try:
                tensors = lora_state_dict(accelerator.unwrap_model(self.unet),
                                          [accelerator.unwrap_model(encoder) for encoder in self.text_encoders])
                write_lora_file(lora_path, tensors, self.config, self.architecture, {**self.facts, "steps": step})
                if not checkpoint.is_dir():
                    self._save_checkpoint(checkpoint)
            except Exception as error:  # a full disk shows as OSError, or as safetensors' own error type
                kept = ", ".join(path.name for _, path in checkpoints(self.run_dir)) or "none"
                reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
                raise TrainError(f"step {step}: could not save to {self.run_dir} ({reason}); the checkpoints "
                                 f"already written stay (kept: {kept}). Free space and start the run again to "
                                 "resume from the newest.") from error
            self.events.emit("save", step=step, lora=str(lora_path), checkpoint=str(checkpoint), final=final)
        accelerator.wait_for_everyone()

    def _save_checkpoint(self, checkpoint: Path) -> None:
        partial = checkpoint.with_name(f".{checkpoint.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            self.accelerator.save_state(str(partial))
            atomic_write_text(partial / "training_state.json",
                              json.dumps({"step": int(checkpoint.name.removeprefix(CHECKPOINT_PREFIX))}) + "\n")
            os.rename(partial, checkpoint)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        limit = self.config.checkpoints_total_limit
        if limit:
            for _, old in checkpoints(self.run_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)


def peak_memory(device) -> int:
    """Peak memory of this process: CUDA allocator peak on a GPU, else the peak resident set size."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# -------------------------------------------------------------------------------------------- CLI

def run_training(config: TrainConfig, run_dir: str | os.PathLike[str],
                 echo: Callable[[str], None] | None = None) -> Path:
    """Check everything, write ``config.toml`` into ``run_dir`` (or continue the run there) and train."""
    config = absolute_paths(config)
    checked = check_inputs(config, run_dir=run_dir)
    return train(config, run_dir, echo=echo, checked=checked, prepare=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.train --config <run>/config.toml``: the entry point ``accelerate launch`` runs."""
    parser = argparse.ArgumentParser(prog="trainer.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help=f"the run's {CONFIG_FILE}; the run folder is its folder")
    arguments = parser.parse_args(argv)
    _hide_unusable_torchvision()
    quiet_libraries()
    config_path = Path(arguments.config).resolve()
    try:
        config = read_config(config_path)
        train(config, config_path.parent)
    except (RunError, TrainError, ValueError, OSError) as error:  # OSError: a lock held by another trainer, too
        _report_failure(config_path.parent, error)
        return FAILED_EXIT_CODE
    return 0


def _hide_unusable_torchvision() -> None:
    """Let transformers fall back to its PIL image code when torchvision is installed but cannot load.

    transformers imports ``torchvision.transforms.functional`` whenever a ``torchvision`` package is
    found, and then every model import fails; a CUDA torchvision beside a CPU torch (the registry's
    build) or a stand-in package does exactly that. The trainer needs no torchvision at all.
    """
    try:
        import torchvision.transforms.functional  # noqa: F401
    except Exception:  # ImportError, or the odd errors a mismatched build raises while loading
        for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None  # importlib.util.find_spec now answers None: "not installed"


def quiet_libraries() -> None:
    """In the trainer process, progress bars and advice from diffusers/transformers only bury the JSON events."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def _report_failure(run_dir: Path, error: BaseException) -> None:
    print(json.dumps({"event": "error", "message": str(error), "time": round(time.time(), 3)}), flush=True)
    print(f"selma train: {error}", file=sys.stderr, flush=True)


_PATH_FLAGS = ("pretrained_model_name_or_path", "train_data_dir")


def register_cli(subparsers: argparse._SubParsersAction, name: str, summary: str) -> None:
    """``selma train --dataset DIR --model PATH --out RUN_DIR [settings]`` or ``selma train --config run.toml``."""
    parser = subparsers.add_parser(
        name, help=summary, description=summary + " Settings default to the SELMA paper's; the run folder gets a "
        "config.toml with every setting, log.jsonl, checkpoints/ and the LoRA. Running the same command again resumes "
        "from the newest checkpoint (or does nothing when finished). For several GPUs: accelerate launch "
        "--num_processes N -m comfyui_selma.trainer.train --config RUN_DIR/config.toml.")
    parser.add_argument("--dataset", help="dataset folder (images with .txt captions): train_data_dir")
    parser.add_argument("--model", help="base model, a .safetensors checkpoint or a diffusers folder: "
                                        "pretrained_model_name_or_path")
    parser.add_argument("--out", help="run folder (created; a folder holding the same run is continued)")
    parser.add_argument("--config", help=f"a {CONFIG_FILE} to run; the run folder is its folder. Flags given with "
                                         "it override its settings")
    add_config_arguments(parser, TrainConfig, skip=_PATH_FLAGS)
    for action in parser._actions:  # see which settings the user gave, so --config keeps the others
        if action.dest in TrainConfig.__dataclass_fields__:
            action.default = argparse.SUPPRESS
    parser.set_defaults(handler=_run_cli)


def _run_cli(arguments: argparse.Namespace) -> int:
    _hide_unusable_torchvision()
    given = {name: getattr(arguments, name) for name in TrainConfig.__dataclass_fields__ if hasattr(arguments, name)}
    try:
        if arguments.config:
            if arguments.out:
                raise RunError("--out: not used with --config (the run folder is the config file's folder)")
            config_path = Path(arguments.config)
            values = {**read_config(config_path).as_dict(), **given}
            run_dir = config_path.resolve().parent
        else:
            missing = [flag for flag, value in (("--dataset", arguments.dataset), ("--model", arguments.model),
                                                ("--out", arguments.out)) if not value]
            if missing:
                raise RunError(f"{', '.join(missing)}: required (or give --config RUN_DIR/{CONFIG_FILE})")
            values = {**{name: default_of(TrainConfig, name) for name in TrainConfig.__dataclass_fields__}, **given}
            run_dir = Path(arguments.out)
        if arguments.dataset:
            values["train_data_dir"] = arguments.dataset
        if arguments.model:
            values["pretrained_model_name_or_path"] = arguments.model
        config = config_from_dict(values, source="selma train")
        final = run_training(config, run_dir)
    except (RunError, TrainError, ValueError, OSError) as error:  # OSError: a lock held by another trainer, too
        print(f"selma train: {error}", file=sys.stderr)
        return 2
    print(f"selma train: LoRA written to {final}", file=sys.stderr)
    return 0


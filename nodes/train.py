"""SELMA Train LoRA Expert: stage 3 as a ComfyUI node, driving the companion trainer as a child process.

The node is thin: it turns widgets into a ``trainer.train.config.TrainConfig``, checks the run's
inputs (``trainer.train.launch.check_inputs``) before anything starts, frees ComfyUI's loaded models,
and starts ``python -m accelerate.commands.launch … -m trainer.train --config <run>/config.toml``
(an argument list, its own process group). The trainer's JSON lines drive the progress bar and the
``selma.train`` events the web UI charts. Cancel kills the child's group; the run keeps its
checkpoints, so queueing again resumes. A non-zero exit raises with the child's last output lines.

The run lives in ``output/selma/train/<lora name>/``; the finished LoRA is copied to
``models/loras/<lora name>.safetensors`` so LoraLoader lists it at once. Queueing the same settings
again returns that file without training.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

from ..trainer.storage.files import atomic_path, check_name
from ..trainer.storage.locks import exclusive_lock
from ..trainer.settings import current_choice, default_of, help_of, renamed_choices
from ..trainer.train.config import (
    CAPTION_ENCODINGS,
    MIXED_PRECISIONS,
    OPTIMIZERS,
    PREDICTION_TYPE_CHOICES,
    TrainConfig,
)
from ..trainer.train.launch import (
    RunError,
    TrainerProcess,
    absolute_paths,
    check_inputs,
    launch_command,
    prepare_run_folder,
    run_folder_lock,
    run_state,
)
from .comfy_runtime import NodeProgress, check_interrupted, selma_output_path, send_event
from .folders import dataset_folder, model_folder_paths, model_path

log = logging.getLogger(__name__)

EVENT = "selma.train"
OUTPUT_LOG = "trainer-output.log"
MAX_GPUS = 64


def _tip(name: str) -> str:
    return help_of(TrainConfig, name)


def _checkpoint_names() -> list[str]:
    try:
        import folder_paths

        return folder_paths.get_filename_list("checkpoints")
    except ImportError:  # the pack imported without ComfyUI (its own tests, the CLI)
        return []


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class SelmaTrainLoraExpert:
    DISPLAY_NAME = "SELMA Train LoRA Expert"
    CATEGORY = "SELMA/3 train"
    DESCRIPTION = ("Trains one LoRA expert on a skill's dataset (SELMA stage 3) with the companion trainer, in a "
                   "separate process (accelerate; several GPUs with 'gpus'). Defaults are the paper's: rank 128, "
                   "alpha 128, UNet attention projections, constant lr 3e-4, effective batch 64 (batch x "
                   "accumulation x GPUs), 5,000 steps, fp16 with fp32 LoRA weights, random flip. Long captions are "
                   "encoded as ComfyUI encodes prompts. The run (config.toml, log.jsonl, checkpoints, a LoRA per save "
                   "point) is in output/selma/train/<lora_name>/; the finished LoRA is copied to models/loras so Load "
                   "LoRA lists it. Cancel stops the trainer; queue again to resume. Queueing the same settings again "
                   "returns the finished LoRA without training. ComfyUI's loaded models are freed before training.")
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("lora_name", "lora_path")
    OUTPUT_TOOLTIPS = ("The LoRA's file name in models/loras (what Load LoRA lists).",
                       "Full path of the LoRA file in models/loras.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        def integer(name: str, low: int, high: int, **extra: Any) -> tuple[str, dict[str, Any]]:
            return ("INT", {"default": default_of(TrainConfig, name), "min": low, "max": high, "tooltip": _tip(name),
                            **extra})

        return {
            "required": {
                "dataset_path": ("STRING", {"default": "", "tooltip": "The dataset folder: connect SELMA Render "
                                            "Dataset's dataset_path, or type a dataset name under "
                                            "output/selma/datasets/ or an absolute path inside ComfyUI's output "
                                            "or input folder. " + _tip("train_data_dir")}),
                "base_checkpoint": (_checkpoint_names(), {"tooltip": "Base model to train on, from "
                                                          "models/checkpoints (SD 1.x, SD 2.x or SDXL .safetensors); "
                                                          "base_model_path overrides it."}),
                "lora_name": ("STRING", {"default": default_of(TrainConfig, "output_name"),
                                         "tooltip": "Name of the LoRA (file name in models/loras, without "
                                                    ".safetensors) and of its run folder in output/selma/train/. "
                                                    "Same name and settings: the run is resumed or returned."}),
                "rank": integer("network_dim", 1, 1024),
                "alpha": ("FLOAT", {"default": default_of(TrainConfig, "network_alpha"), "min": 0.01, "max": 4096.0,
                                    "step": 1.0, "tooltip": _tip("network_alpha")}),
                "learning_rate": ("FLOAT", {"default": default_of(TrainConfig, "learning_rate"), "min": 1e-7,
                                            "max": 1.0, "step": 1e-5, "round": 1e-7, "tooltip": _tip("learning_rate")}),
                "steps": integer("max_train_steps", 1, 1_000_000),
                "batch_size": integer("train_batch_size", 1, 1024),
                "gradient_accumulation": integer("gradient_accumulation_steps", 1, 1024),
                "resolution": integer("resolution", 0, 4096, step=8),
                "precision": (list(MIXED_PRECISIONS), {"default": default_of(TrainConfig, "mixed_precision"),
                                                        "tooltip": _tip("mixed_precision")}),
                # A frontend control widget would change the seed after every queue, breaking resume.
                "seed": integer("seed", 0, 2**63 - 1, control_after_generate=False),
                "save_every": integer("save_every_n_steps", 0, 1_000_000),
                "gpus": ("INT", {"default": 1, "min": 1, "max": MAX_GPUS,
                                 "tooltip": "GPUs to train on, data-parallel (accelerate launch --num_processes). "
                                            "The effective batch is batch_size x gradient_accumulation x gpus."}),
            },
            "optional": {
                "base_model_path": ("STRING", {"default": "", "tooltip": "A diffusers model folder or a .safetensors "
                                               "file in models/diffusers or models/checkpoints (its name there, or "
                                               "its full path); when set, used instead of base_checkpoint."}),
                # ComfyUI refuses a combo value not in the list: old names stay (last) for saved workflows.
                "caption_encoding": ([*CAPTION_ENCODINGS, *renamed_choices(TrainConfig, "caption_encoding")],
                                     {"default": default_of(TrainConfig, "caption_encoding"),
                                      "tooltip": _tip("caption_encoding")}),
                "train_text_encoder": ("BOOLEAN", {"default": default_of(TrainConfig, "train_text_encoder"),
                                                   "tooltip": _tip("train_text_encoder")}),
                "gradient_checkpointing": ("BOOLEAN", {"default": default_of(TrainConfig, "gradient_checkpointing"),
                                                       "tooltip": _tip("gradient_checkpointing")}),
                "optimizer": (list(OPTIMIZERS), {"default": default_of(TrainConfig, "optimizer_type"),
                                                 "tooltip": _tip("optimizer_type")}),
                "prediction_type": (list(PREDICTION_TYPE_CHOICES),
                                    {"default": default_of(TrainConfig, "prediction_type"),
                                     "tooltip": _tip("prediction_type")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, dataset_path: str, base_checkpoint: str, lora_name: str, rank: int, alpha: float,
              learning_rate: float, steps: int, batch_size: int, gradient_accumulation: int, resolution: int,
              precision: str, seed: int, save_every: int, gpus: int, base_model_path: str = "",
              caption_encoding: str = "chunks", train_text_encoder: bool = False, gradient_checkpointing: bool = False,
              optimizer: str = "AdamW", prediction_type: str = "auto",
              unique_id: str | None = None) -> tuple[str, str]:
        name = check_name(lora_name.strip().removesuffix(".safetensors"), "lora_name")
        if not dataset_path.strip():
            raise RunError("dataset_path: empty; connect SELMA Render Dataset's dataset_path or type a dataset folder")
        config = absolute_paths(TrainConfig(
            pretrained_model_name_or_path=self._base_model(base_checkpoint, base_model_path),
            train_data_dir=str(dataset_folder(dataset_path, "dataset_path", writing=False)),
            output_name=name, network_dim=rank, network_alpha=float(alpha), learning_rate=float(learning_rate),
            max_train_steps=steps, train_batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation,
            resolution=resolution, mixed_precision=precision, seed=seed, save_every_n_steps=save_every,
            num_processes=gpus, train_text_encoder=train_text_encoder,
            caption_encoding=current_choice(TrainConfig, "caption_encoding", caption_encoding,
                                            f"{self.DISPLAY_NAME} node", notify=log.warning),
            gradient_checkpointing=gradient_checkpointing, optimizer_type=optimizer,
            prediction_type=prediction_type))
        run_dir = selma_output_path("train", name)
        lora_target = self._lora_target(name)
        check_inputs(config, run_dir=run_dir)  # folder, dataset, model family, settings: before anything starts
        self._check_target_is_ours(lora_target, run_state(run_dir, config).final_lora)
        with run_folder_lock(run_dir):  # another trainer of this run is refused here; the trainer then takes it
            config_path = prepare_run_folder(config, run_dir)
        state = run_state(run_dir, config)
        if not state.finished:
            self._run_trainer(config, config_path, run_dir, gpus, unique_id)
            state = run_state(run_dir, config)
            if not state.finished:
                raise RuntimeError(f"SELMA trainer exited without finishing {config.max_train_steps} steps; see "
                                   f"{run_dir / OUTPUT_LOG}")
        self._publish(state.final_lora, lora_target)
        send_event(EVENT, {"node": unique_id, "done": True, "step": state.step, "max_steps": config.max_train_steps,
                           "lora_name": lora_target.name, "lora_path": str(lora_target)})
        return lora_target.name, str(lora_target)

    @staticmethod
    def _base_model(base_checkpoint: str, base_model_path: str) -> str:
        """The base model a workflow picked, from ComfyUI's checkpoints (or diffusers) folders and nowhere else."""
        if base_model_path.strip():
            return str(model_path(base_model_path, "base_model_path", model_folder_paths("checkpoints", "diffusers"),
                                  "a base model (a .safetensors checkpoint or a diffusers folder)"))
        if not base_checkpoint.strip():
            raise RunError("base_checkpoint: '' is not in models/checkpoints; pick a checkpoint or set "
                           "base_model_path")
        return str(model_path(base_checkpoint, "base_checkpoint", model_folder_paths("checkpoints"), "a checkpoint",
                              file_only=True))

    @staticmethod
    def _lora_target(name: str) -> Path:
        import folder_paths

        return Path(folder_paths.get_folder_paths("loras")[0]) / f"{name}.safetensors"

    @staticmethod
    def _check_target_is_ours(target: Path, final: Path) -> None:
        """Never overwrite someone else's LoRA: the target must be missing or this run's own (earlier) result."""
        if target.exists() and not (final.is_file() and _sha256(target) == _sha256(final)):
            raise RunError(f"lora_name: {target} already exists and is not this run's LoRA; choose another "
                           "lora_name (or move that file away)")

    @staticmethod
    def _publish(final: Path, target: Path) -> None:
        if target.is_file() and target.stat().st_size == final.stat().st_size and _sha256(target) == _sha256(final):
            return
        with exclusive_lock(target), atomic_path(target) as temporary:  # a merge into it is refused meanwhile
            shutil.copyfile(final, temporary)

    @staticmethod
    def _run_trainer(config: TrainConfig, config_path: Path, run_dir: Path, gpus: int, unique_id: str | None) -> None:
        import comfy.model_management

        comfy.model_management.unload_all_models()  # the trainer needs the memory ComfyUI's models hold
        comfy.model_management.soft_empty_cache()
        progress = NodeProgress(config.max_train_steps, node_id=unique_id)
        process = TrainerProcess(launch_command(config_path, gpus), log_path=run_dir / OUTPUT_LOG)
        error_message = ""
        try:
            for event in process.events():
                if event is None:
                    check_interrupted()  # the child is quiet (loading, caching): still honour cancel
                    continue
                kind = event["event"]
                if kind == "step":
                    send_event(EVENT, {"node": unique_id, **_public(event)})
                    progress.update(int(event["step"]))  # raises on cancel; the finally below stops the child
                elif kind in ("resume", "done"):
                    progress.update(int(event["step"]))
                    send_event(EVENT, {"node": unique_id, **_public(event)})
                elif kind in ("start", "cache", "cache_ready", "save", "notice"):
                    send_event(EVENT, {"node": unique_id, **_public(event)})
                    check_interrupted()
                elif kind == "error":
                    error_message = str(event.get("message", ""))
        finally:
            process.stop()
        if process.returncode != 0:
            reason = f": {error_message}" if error_message else ""
            raise RuntimeError(f"SELMA trainer failed (exit code {process.returncode}){reason}\n"
                               f"Last lines of its output ({run_dir / OUTPUT_LOG}):\n{process.tail_text()}")


def _public(event: dict[str, Any]) -> dict[str, Any]:
    """An event as the browser gets it: ``event`` renamed to ``kind``, and the cache events' own
    ``kind`` (latents or text) to ``cache_kind`` so it cannot overwrite it."""
    fields = {("cache_kind" if key == "kind" else key): value for key, value in event.items() if key != "event"}
    return {"kind": event["event"], **fields}

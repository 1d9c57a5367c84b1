"""SELMA stage 2 without ComfyUI: render one image per prompt with diffusers into a dataset folder.

The folder contract, the seeding rule and resume live in :mod:`.dataset`; this module is the
diffusers engine behind ``selma render`` (and ``selma demo``):

- the base model comes from a diffusers folder or a single ``.safetensors`` checkpoint, offline
  (:func:`.loading.load_pipeline`);
- different prompts render in one pipeline call, each image with its own ``torch.Generator`` seeded
  by the dataset rule, so an image is the same alone or in a batch;
- prompts longer than CLIP's 75 tokens are split into 77-token chunks the way ComfyUI splits them
  (at word boundaries, words of up to 8 tokens kept whole), each chunk encoded alone and the
  results concatenated; the pooled embedding (SDXL) is the first chunk's. Only prompts of one
  length share a batch (:func:`.dataset.batches`); the negative prompt and the prompts are
  repeated to a common length, which leaves cross-attention unchanged (ComfyUI pads the same way);
- under ``accelerate launch --num_processes N`` the pending prompts are split across processes with
  accelerate's ``split_between_processes``; each process writes only its own images.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..text.encoding import caption_pieces
from .dataset import (
    DatasetError,
    RenderRequest,
    float_images_to_pil,
    pending_indices,
    plan_dataset,
    render_pending,
    start_dataset,
)
from ..storage.locks import exclusive_lock
from ..families.hashing import model_sha256
from ..families.loading import checkpoint_family, load_pipeline
from ..devices import accelerator_available
from ..prompts.prompt_set import PromptSet, PromptSetError, prompt_set_of
from ..settings import add_config_arguments, config_from_arguments, setting

if TYPE_CHECKING:
    import torch
    from accelerate import PartialState
    from diffusers import DiffusionPipeline
    from PIL import Image

# ``--sampler`` → diffusers scheduler class; names follow ComfyUI's sampler names where they match.
SAMPLERS: dict[str, str | None] = {
    "default": None,  # the model's own scheduler (SD 1.x: PNDM, SDXL: Euler), as the paper rendered
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "uni_pc": "UniPCMultistepScheduler",
}
DTYPES = ("auto", "float32", "float16", "bfloat16")
_AUTO_SIZE = ("0 (auto): the model's native size, 512 for SD 1.x, 768 for SD 2.x 768-v (512 for SD 2.x base), 1024 "
              "for SDXL.")


@dataclass
class RenderConfig:
    """Settings of stage 2; defaults are the SELMA paper's (50 steps, CFG 7.5, the model's own sampler)."""

    negative_prompt: str = setting("", "Negative prompt for every image; empty: none (SDXL then uses zero "
                                   "conditioning, as diffusers does by default).")
    width: int = setting(0, f"Image width in pixels, a multiple of 8; {_AUTO_SIZE}")
    height: int = setting(0, f"Image height in pixels, a multiple of 8; {_AUTO_SIZE}")
    steps: int = setting(50, "Sampling steps per image (the paper uses 50).")
    cfg: float = setting(7.5, "Classifier-free guidance scale (the paper uses 7.5).")
    sampler: str = setting("default", "Sampler (diffusers scheduler); 'default' keeps the model's own.",
                           choices=tuple(SAMPLERS))
    seed: int = setting(0, "Base seed: image i is rendered from seed + i, so every image is reproducible alone "
                        "and a resumed run matches an uninterrupted one.")
    batch_size: int = setting(4, "Prompts rendered together in one sampler call; larger is faster when memory "
                              "allows and gives the same images.")


# ---------------------------------------------------------------------------------------------------
# Prompts: ComfyUI's chunking (trainer.text.encoding), so the data matches what ComfyUI renders


def _chunk_inputs(tokenizer: Any, text: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[chunks, 77]`` input ids (start, tokens, end, padding) and the matching attention mask."""
    import torch

    length = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pieces = caption_pieces(tokenizer, text)
    rows = [piece + [pad] * (length - len(piece)) for piece in pieces]
    masks = [[1] * len(piece) + [0] * (length - len(piece)) for piece in pieces]
    return torch.tensor(rows, device=device), torch.tensor(masks, device=device)


@dataclass
class PromptEmbedding:
    """One prompt's text conditioning: ``[1, 77 * chunks, width]`` and, for SDXL, ``[1, pooled]``."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


def _is_xl(pipeline: DiffusionPipeline) -> bool:
    return getattr(pipeline, "text_encoder_2", None) is not None


def zeros_for_empty_negative(sdxl: bool, negative_prompt: str, force_zeros_for_empty_prompt: bool = True) -> bool:
    """Whether the negative conditioning is zeros rather than the text encoders' output for ``negative_prompt``.

    An SDXL model with no negative prompt is guided away from zero conditioning: diffusers'
    ``force_zeros_for_empty_prompt`` (a diffusers folder's own flag; on for SDXL base and for a
    ComfyUI checkpoint, which carries no flag), as SELMA's own renders were. Both renderers (this
    one and the ComfyUI node) ask here, so they agree.
    """
    return sdxl and not negative_prompt and force_zeros_for_empty_prompt


def encode_prompt(pipeline: DiffusionPipeline, text: str) -> PromptEmbedding:
    """Encode ``text`` with the pipeline's text encoder(s), chunked; equals diffusers for ≤ 75 tokens.

    SD 1.x/2.x take the last hidden state (as ``StableDiffusionPipeline.encode_prompt``); SDXL takes
    both encoders' penultimate hidden states side by side and the second encoder's pooled output.
    """
    import torch

    pairs = [(pipeline.tokenizer, pipeline.text_encoder)]
    if _is_xl(pipeline):
        pairs.append((pipeline.tokenizer_2, pipeline.text_encoder_2))
    hidden_parts, pooled = [], None
    with torch.no_grad():
        for tokenizer, text_encoder in pairs:
            input_ids, mask = _chunk_inputs(tokenizer, text, text_encoder.device)
            if _is_xl(pipeline):
                output = text_encoder(input_ids, output_hidden_states=True)
                if output[0].ndim == 2:  # the projected encoder: its pooled output conditions SDXL
                    pooled = output[0][:1]
                hidden = output.hidden_states[-2]
            else:
                use_mask = getattr(text_encoder.config, "use_attention_mask", False)
                hidden = text_encoder(input_ids, attention_mask=mask if use_mask else None)[0]
            hidden_parts.append(hidden.reshape(1, -1, hidden.shape[-1]))
    length = min(part.shape[1] for part in hidden_parts)  # ComfyUI's SDXL cuts the two encoders to one length
    return PromptEmbedding(torch.cat([part[:, :length] for part in hidden_parts], dim=-1), pooled)


def repeat_to_length(hidden: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat ``[batch, tokens, width]`` along the tokens to ``length`` (a multiple of ``tokens``).

    Attention over keys repeated k times equals attention over the keys once, so the image does not change.
    """
    if length % hidden.shape[1]:
        raise ValueError(f"cannot repeat {hidden.shape[1]} tokens to {length}")
    return hidden.repeat(1, length // hidden.shape[1], 1)


# ---------------------------------------------------------------------------------------------------
# The renderer


class DiffusersRenderer:
    """A :data:`.dataset.BatchRenderer` over a loaded diffusers pipeline."""

    def __init__(self, pipeline: DiffusionPipeline, width: int, height: int, steps: int, cfg: float,
                 negative_prompt: str = "") -> None:
        import torch

        self.pipeline = pipeline
        self.width, self.height, self.steps, self.cfg = width, height, steps, cfg
        negative = encode_prompt(pipeline, negative_prompt)
        if zeros_for_empty_negative(_is_xl(pipeline), negative_prompt,
                                    pipeline.config.get("force_zeros_for_empty_prompt", False)):
            negative = PromptEmbedding(torch.zeros_like(negative.hidden), torch.zeros_like(negative.pooled))
        self.negative = negative

    def conditioning_length(self, prompt: str) -> int:
        """Tokens of :func:`encode_prompt`'s output for ``prompt``: 77 per chunk (SDXL: the shorter encoder's)."""
        tokenizers = [self.pipeline.tokenizer] + ([self.pipeline.tokenizer_2] if _is_xl(self.pipeline) else [])
        return min(len(caption_pieces(tokenizer, prompt)) * tokenizer.model_max_length for tokenizer in tokenizers)

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        """Render prompts of one conditioning length; a mixed batch is refused rather than padded to the
        least common multiple of its lengths (:func:`.dataset.batches` groups them)."""
        import torch

        embeddings = [encode_prompt(self.pipeline, prompt) for prompt in prompts]
        lengths = sorted({embedding.hidden.shape[1] for embedding in embeddings})
        if len(lengths) > 1:
            raise ValueError(f"a batch of prompts with conditionings of {lengths} tokens; expected one length per "
                             "batch (trainer.render.dataset.batches groups them)")
        # diffusers needs the negative as long as the prompts: repeat both to a common length (as one by one)
        length = math.lcm(self.negative.hidden.shape[1], lengths[0])
        positive = torch.cat([repeat_to_length(embedding.hidden, length) for embedding in embeddings])
        negative = repeat_to_length(self.negative.hidden, length).repeat(len(prompts), 1, 1)
        arguments: dict[str, Any] = {"prompt_embeds": positive, "negative_prompt_embeds": negative}
        if _is_xl(self.pipeline):
            arguments["pooled_prompt_embeds"] = torch.cat([embedding.pooled for embedding in embeddings])
            arguments["negative_pooled_prompt_embeds"] = self.negative.pooled.repeat(len(prompts), 1)
        # One CPU generator per image: the initial noise (and an ancestral sampler's noise) of image i
        # depends on its own seed only, and is the same on every device.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        with torch.no_grad():
            result = self.pipeline(**arguments, width=self.width, height=self.height, num_inference_steps=self.steps,
                                   guidance_scale=self.cfg, generator=generators, output_type="np")
        return float_images_to_pil(result.images)


def torch_device_type(device: str) -> str:
    import torch

    return torch.device(device).type


def check_device(device: str) -> None:
    """Refuse a ``--device`` torch does not know, or that this machine lacks, before anything is written."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise DatasetError(f"device: {device!r} is not a device torch knows; expected e.g. cpu, cuda, cuda:1 or "
                           "mps") from None
    try:
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError, ValueError) as error:  # a CPU-only torch asserts on cuda
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        available = "cuda" if torch.cuda.is_available() else "cpu"
        raise DatasetError(f"device: {device!r} is not available on this machine ({reason}); expected a device it "
                           f"has, e.g. {available}") from None


_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive, a bare pickle


def check_checkpoint(path: Path, architecture: str | None) -> None:
    """Read a single file's header and family before anything is written: a corrupt file, or a pickle
    renamed ``.safetensors`` (never unpickled), is refused naming the file."""
    from safetensors import SafetensorError

    try:
        checkpoint_family(path, architecture)
    except SafetensorError as error:
        with path.open("rb") as stream:
            start = stream.read(4)
        hint = ("; it looks like a pickle (.ckpt) renamed .safetensors, and pickles are never loaded"
                if start.startswith(_PICKLE_MAGIC) else "")
        raise DatasetError(f"model: {path} is not a readable .safetensors checkpoint ({error}){hint}; expected a "
                           "file saved by safetensors") from None


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype: {name!r}; expected one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_renderer_pipeline(model: str | os.PathLike[str], device: torch.device | str, dtype: str = "auto",
                           sampler: str = "default", architecture: str | None = None,
                           model_config: str | os.PathLike[str] | None = None) -> DiffusionPipeline:
    """Load the base model for rendering: on ``device``, in ``dtype``, with the chosen sampler, no progress bar."""
    import diffusers
    import torch

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    device = torch.device(device)
    pipeline = load_pipeline(model, architecture=architecture, torch_dtype=_resolve_dtype(dtype, device),
                             config=model_config)
    if SAMPLERS[sampler] is not None:
        pipeline.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def native_size(model: str | os.PathLike[str], architecture: str | None = None,
                model_config: str | os.PathLike[str] | None = None) -> int:
    """The image size a model was trained at, from its configs, or for a single file with the shipped
    configs from its family and prediction type (SD 2.x: 768 for 768-v, 512 for the epsilon base model).
    No weights are loaded."""
    model = Path(model)
    folder = model if model.is_dir() else Path(model_config) if model_config else None
    if folder is None:
        return checkpoint_family(model, architecture).native_resolution
    unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    sample_size = unet["sample_size"]
    sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    return int(sample_size) * 2 ** (len(vae["block_out_channels"]) - 1)


@dataclass
class RenderSummary:
    """What a ``selma render`` run did, seen from the main process."""

    folder: Path
    total: int
    already_done: int
    rendered_here: int
    done_now: int

    def message(self) -> str:
        return (f"dataset {self.folder}: {self.done_now} of {self.total} images done "
                f"({self.already_done} were already there, {self.rendered_here} rendered by this process)")


def diffusers_generator(model_path: Path, model_config: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """How ``dataset.json`` names the model: its file name and the SHA-256 of its content.

    The SHA-256 (:func:`.hashing.model_sha256`: of the file, or of a folder's files) is what a
    resumed render is checked against, so another model saved under the same name is refused. It is
    the hash LoRA metadata and model sites use, computed once per file version and remembered. A
    single file loaded with ``--model-config`` records that folder's hash too: its configs shape the
    model and its scheduler (None: the shipped configs, and always for a folder model).
    """
    config_sha256 = model_sha256(model_config) if model_config is not None and not model_path.is_dir() else None
    return {"engine": "diffusers", "model": model_path.name, "sha256": model_sha256(model_path),
            "model_config_sha256": config_sha256}


def render_dataset(prompt_set: PromptSet, out: str | os.PathLike[str], model: str | os.PathLike[str],
                   config: RenderConfig | None = None, *, architecture: str | None = None,
                   model_config: str | os.PathLike[str] | None = None, device: str | None = None,
                   dtype: str = "auto", show_progress: bool = True,
                   on_batch: Callable[[list[int]], None] | None = None) -> RenderSummary:
    """Render ``prompt_set`` into the dataset folder ``out`` with the model at ``model``; resumable.

    Every check (prompts, sizes, the model, the folder and its ``dataset.json``) runs before the
    model loads, and ``dataset.json`` is written only once it has loaded. In a multi-process launch
    each process renders its share of the pending images; ``device`` defaults to the process's
    accelerate device. Notices (a dataset from an older version) go to stderr.
    """
    from accelerate import PartialState

    config = config or RenderConfig()
    model_path = Path(model)
    if not model_path.is_dir() and model_path.suffix.lower() != ".safetensors":
        problem = "does not exist" if not model_path.exists() else "is not a .safetensors checkpoint"
        raise DatasetError(f"model: {model_path} {problem}; expected a diffusers folder or a .safetensors checkpoint")
    if not model_path.exists():
        raise DatasetError(f"model: {model_path} does not exist; expected a diffusers folder or a .safetensors "
                           "checkpoint")
    if model_config is not None and not Path(model_config).is_dir():
        raise DatasetError(f"model-config: {model_config} is not a folder; expected a diffusers folder describing "
                           "the checkpoint's shapes")
    if device is not None:
        check_device(device)
    if model_path.is_file():
        check_checkpoint(model_path, architecture)
    size = None if config.width and config.height else native_size(model_path, architecture, model_config)
    request = RenderRequest(
        prompts=tuple(prompt_set.prompts), skill=prompt_set.skill,
        generator={"engine": "diffusers", "model": model_path.name},
        sampler=config.sampler, scheduler=None, steps=config.steps, cfg=config.cfg,
        width=config.width or size, height=config.height or size, negative_prompt=config.negative_prompt,
        seed=config.seed, batch_size=config.batch_size,
        prompts_file=str(prompt_set.path) if prompt_set.path else None)
    request.validate()  # the settings first: hashing a large model takes a moment
    request = dataclasses.replace(request, generator=diffusers_generator(model_path, model_config))
    folder = Path(out)
    # Without an accelerator (or when told to use the CPU) processes talk over gloo; accelerate needs cpu=True for that.
    state = PartialState(cpu=(device is not None and torch_device_type(device) == "cpu") or not accelerator_available())
    # The main process holds the folder's lock for the whole launch: another render into it is refused.
    with exclusive_lock(folder) if state.is_main_process else contextlib.nullcontext():
        return _render_locked(folder, model_path, request, state, architecture=architecture,
                              model_config=model_config, device=device, dtype=dtype, show_progress=show_progress,
                              on_batch=on_batch)


def _render_locked(folder: Path, model_path: Path, request: RenderRequest, state: PartialState, *,
                   architecture: str | None, model_config: str | os.PathLike[str] | None, device: str | None,
                   dtype: str, show_progress: bool, on_batch: Callable[[list[int]], None] | None) -> RenderSummary:
    """:func:`render_dataset` once the main process holds the folder's lock."""
    plan = plan_dataset(folder, request)
    renderer = None
    if plan.pending:  # loaded before anything is written: a model that fails to load leaves no trace
        from safetensors import SafetensorError

        try:
            pipeline = load_renderer_pipeline(model_path, device or state.device, dtype=dtype,
                                              sampler=request.sampler, architecture=architecture,
                                              model_config=model_config)
        except SafetensorError as error:  # a folder's weights file
            raise DatasetError(f"model: {model_path} holds a weights file that is not readable safetensors "
                               f"({error}); expected files saved by safetensors") from None
        renderer = DiffusersRenderer(pipeline, request.width, request.height, request.steps, request.cfg,
                                     request.negative_prompt)
    if state.is_main_process:
        for notice in plan.notices:
            print(f"selma render: notice: {notice}", file=sys.stderr)
        start_dataset(plan)
    state.wait_for_everyone()  # every process has listed what is pending before anyone writes an image

    rendered: list[int] = []
    if renderer is not None:
        with state.split_between_processes(list(plan.pending)) as my_share:
            progress_bar = None
            if show_progress and state.is_main_process:
                from tqdm.auto import tqdm

                progress_bar = tqdm(total=len(my_share), unit="image", desc="selma render", file=sys.stderr)

            def report(batch: list[int]) -> None:
                if progress_bar is not None:
                    progress_bar.update(len(batch))
                if on_batch is not None:
                    on_batch(batch)

            try:
                rendered = render_pending(plan, renderer, indices=list(my_share), on_batch=report)
            finally:
                if progress_bar is not None:
                    progress_bar.close()
    state.wait_for_everyone()
    done_now = plan.total - len(pending_indices(folder, plan.total))
    return RenderSummary(folder=folder, total=plan.total, already_done=plan.done, rendered_here=len(rendered),
                         done_now=done_now)


# ---------------------------------------------------------------------------------------------------
# selma render


def _run(arguments: argparse.Namespace) -> int:
    try:
        prompt_set = prompt_set_of(arguments.prompts)
        summary = render_dataset(
            prompt_set, arguments.out, arguments.model, config_from_arguments(RenderConfig, arguments),
            architecture=arguments.architecture, model_config=arguments.model_config, device=arguments.device,
            dtype=arguments.dtype, show_progress=not arguments.quiet)
    except (DatasetError, PromptSetError, ValueError, OSError) as error:
        print(f"selma render: error: {error}", file=sys.stderr)
        return 1
    print(summary.message())
    return 0


def register_cli(subparsers: argparse._SubParsersAction, name: str, summary: str) -> None:
    parser = subparsers.add_parser(
        name, help=summary,
        description=summary + " Writes NNNNNN.png + NNNNNN.txt (the caption) per prompt and dataset.json; a re-run "
                    "skips finished images. Under `accelerate launch --num_processes N` the prompts are split "
                    "across the processes.")
    parser.add_argument("prompts", help="Prompt-set JSONL from stage 1 (one {\"prompt\", \"skill\", ...} per line).")
    parser.add_argument("--model", required=True, help="Base model: a diffusers folder or a .safetensors checkpoint "
                                                       "(SD 1.x, SD 2.x, SDXL), loaded offline.")
    parser.add_argument("--out", required=True, help="Dataset folder to write or continue.")
    add_config_arguments(parser, RenderConfig)
    parser.add_argument("--architecture", default=None, choices=("sd1", "sd2", "sdxl"),
                        help="Family of a single-file checkpoint; default: detected from its keys.")
    parser.add_argument("--model-config", default=None, help="Diffusers folder describing a single-file "
                        "checkpoint's shapes; default: the shipped config of its architecture.")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda:0 or cpu; default: the accelerate "
                        "process's device (a GPU when there is one).")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="Weights' precision; auto: float16 on CUDA, float32 elsewhere.")
    parser.add_argument("--quiet", action="store_true", help="No progress bar.")
    parser.set_defaults(handler=_run)

"""SELMA Render Dataset: stage 2 as a ComfyUI node, rendering through ComfyUI's own sampling.

The dataset folder, the seeding rule, resume and validation are ``trainer.render.dataset``'s, shared with
``selma render``; this module is the ComfyUI engine:

- width/height 0 (auto) is the model family's native size, told from ComfyUI's model config class
  (SD 1.x 512, SD 2.x 768-v 768 and base 512, SDXL 1024);
- each prompt is tokenized and encoded by the CLIP object itself (so long prompts are chunked
  exactly as ComfyUI's CLIP Text Encode chunks them), then the batch's conditionings are stacked
  along the batch, shorter ones repeated to a common length (what ComfyUI itself does when it
  batches conditionings; attention over repeated keys is unchanged); an empty negative prompt on
  SDXL is zero conditioning, as in ``selma render`` and diffusers;
- the latent noise is one slice per image from ``comfy.sample.prepare_noise`` with the image's seed,
  and samplers that draw noise while sampling (ancestral, SDE) get a per-image noise source seeded
  the same way, so image i is the same alone or in a batch — and the same as a KSampler with that
  seed and batch size 1;
- progress advances per image; cancel is honoured between sampling steps and between batches, and
  every image written before it stays.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import re
from pathlib import Path
from typing import Any

from ..trainer.render.dataset import (
    DatasetError,
    RenderRequest,
    done_image_paths,
    float_images_to_pil,
    image_path,
    prepare_dataset,
    render_pending,
)
from ..trainer.storage.locks import exclusive_lock
from ..trainer.families.configs import native_resolution
from ..trainer.render.run import RenderConfig, zeros_for_empty_negative
from ..trainer.settings import default_of, help_of
from .comfy_runtime import NodeProgress, check_interrupted, output_directory, send_event
from .folders import dataset_folder

EVENT = "selma.render"
PREVIEW_IMAGES = 4
BROWSER_PREVIEWS = 6  # the web extension's preview strip (PREVIEWS_SHOWN in web/lib/selma_state.js)
MAX_SIZE = 16384
# ComfyUI's model config classes (comfy.supported_models) of each family; subclasses (SSD-1B, …) belong too.
_FAMILY_CONFIGS = (("sdxl", "SDXL"), ("sd2", "SD20"), ("sd1", "SD15"))
# Offered when ComfyUI is absent (the pack's own tests); ComfyUI's full lists are used when it runs.
FALLBACK_SAMPLERS = ("euler", "euler_ancestral", "heun", "dpm_2", "lms", "dpmpp_2m", "dpmpp_2m_sde", "ddim", "uni_pc")
FALLBACK_SCHEDULERS = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta")
# Samplers whose own noise is a Brownian tree (ComfyUI's SDE family); the others draw plain Gaussian noise.
_BROWNIAN = re.compile(r"^dpmpp_.*sde")
_SMALL_TENSOR = 4096  # fingerprint: tensors up to this many elements (biases, norms, embeddings' small parts)


def _tip(name: str) -> str:
    return help_of(RenderConfig, name)


def _sampler_choices() -> tuple[list[str], list[str]]:
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)
    except ImportError:
        return list(FALLBACK_SAMPLERS), list(FALLBACK_SCHEDULERS)


class SelmaRenderDataset:
    DISPLAY_NAME = "SELMA Render Dataset"
    CATEGORY = "SELMA/2 render"
    DESCRIPTION = ("Renders one image per prompt with your model (SELMA stage 2) into output/selma/datasets/<name>: "
                   "NNNNNN.png, its caption NNNNNN.txt and dataset.json. Prompts are batched in one sampler call; "
                   "image i uses seed + i, so it is the same alone or in a batch. Queue again to continue: finished "
                   "images are skipped; cancel keeps every finished image. A folder rendered with other settings "
                   "is refused.")
    FUNCTION = "render"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("dataset_path", "preview")
    OUTPUT_TOOLTIPS = ("Path of the dataset folder, for the SELMA Train node.",
                       f"The dataset's first {PREVIEW_IMAGES} images.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        samplers, schedulers = _sampler_choices()
        size = {"min": 0, "max": MAX_SIZE, "step": 8}
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model that renders the images (any checkpoint ComfyUI runs: "
                                               "SD 1.x, SD 2.x, SDXL). A weaker model can teach a stronger one."}),
                "clip": ("CLIP", {"tooltip": "The text encoder of that checkpoint."}),
                "vae": ("VAE", {"tooltip": "The VAE that decodes the images."}),
                "prompts": ("SELMA_PROMPTS", {"tooltip": "The prompt set from SELMA Skill Prompts: one image per "
                                                         "prompt, captioned with it."}),
                "negative_prompt": ("STRING", {"default": default_of(RenderConfig, "negative_prompt"),
                                               "multiline": True, "tooltip": _tip("negative_prompt")}),
                "width": ("INT", {**size, "default": default_of(RenderConfig, "width"), "tooltip": _tip("width")}),
                "height": ("INT", {**size, "default": default_of(RenderConfig, "height"),
                                   "tooltip": _tip("height")}),
                "steps": ("INT", {"default": default_of(RenderConfig, "steps"), "min": 1, "max": 10000,
                                  "tooltip": _tip("steps")}),
                "cfg": ("FLOAT", {"default": default_of(RenderConfig, "cfg"), "min": 0.0, "max": 100.0, "step": 0.1,
                                  "round": 0.01, "tooltip": _tip("cfg")}),
                "sampler_name": (samplers, {"default": "euler", "tooltip": "ComfyUI sampler. Every sampler gives "
                                            "the same image alone or in a batch."}),
                "scheduler": (schedulers, {"default": "normal", "tooltip": "ComfyUI scheduler (noise schedule)."}),
                # A frontend control widget would change the seed after every queue, breaking resume.
                "seed": ("INT", {"default": default_of(RenderConfig, "seed"), "min": 0, "max": 2**64 - 1,
                                 "control_after_generate": False, "tooltip": _tip("seed")}),
                "batch_size": ("INT", {"default": default_of(RenderConfig, "batch_size"), "min": 1, "max": 256,
                                       "tooltip": _tip("batch_size")}),
                "dataset_name": ("STRING", {"default": "", "tooltip": "Folder name under output/selma/datasets/, "
                                            "or an absolute path inside the output folder; empty: the skill's "
                                            "name. Queueing again with the same name continues that dataset."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def render(self, model: Any, clip: Any, vae: Any, prompts: Any, negative_prompt: str, width: int, height: int,
               steps: int, cfg: float, sampler_name: str, scheduler: str, seed: int, batch_size: int,
               dataset_name: str = "", unique_id: str | None = None) -> tuple[str, Any]:
        if not hasattr(prompts, "prompts") or not hasattr(prompts, "skill"):
            raise DatasetError(f"prompts: got {type(prompts).__name__}; expected the output of SELMA Skill Prompts")
        width, height = render_size(model, width, height)
        request = RenderRequest(
            prompts=tuple(prompts.prompts), skill=prompts.skill, generator=generator_record(model, clip, vae),
            sampler=sampler_name, scheduler=scheduler, steps=steps, cfg=cfg, width=width, height=height,
            negative_prompt=negative_prompt, seed=seed, batch_size=batch_size,
            prompts_file=str(prompts.path) if getattr(prompts, "path", None) else None)
        request.validate()
        folder = dataset_folder(dataset_name.strip() or prompts.skill, "dataset_name", writing=True)
        with exclusive_lock(folder):  # a second render into this folder, from anywhere, is refused
            return self._render_locked(folder, request, model, clip, vae, unique_id)

    def _render_locked(self, folder: Path, request: RenderRequest, model: Any, clip: Any, vae: Any,
                       unique_id: str | None) -> tuple[str, Any]:
        plan = prepare_dataset(folder, request)
        for notice in plan.notices:
            print(f"[SELMA Render Dataset] notice: {notice}")

        progress = NodeProgress(plan.total, node_id=unique_id)
        done = plan.done

        def announce(kind: str, images: list[int]) -> None:
            send_event(EVENT, {"node": unique_id, "kind": kind, "done": done, "total": plan.total,
                               "folder": str(folder), "images": _viewable(folder, images)})

        # A resumed or finished dataset shows its count and newest images at once, not after a batch.
        announce("start", sorted(set(range(plan.total)) - set(plan.pending))[-BROWSER_PREVIEWS:])
        progress.update(done)

        def report(batch: list[int]) -> None:
            nonlocal done
            done += len(batch)
            announce("batch", batch)
            progress.update(done)  # raises on cancel; the batch is already on disk

        if plan.pending:
            render_pending(plan, ComfyBatchRenderer(model, clip, vae, request), on_batch=report)
        print(f"[SELMA Render Dataset] {folder}: {plan.total} images ({plan.done} were already there)")
        return str(folder), preview_tensor(folder)


def _viewable(folder: Path, indices: list[int]) -> list[dict[str, str]]:
    """The batch's images as ComfyUI's ``/view`` route names them, for the browser's preview strip.

    A dataset is always inside the output folder (``nodes.folders.dataset_folder``), so ``/view`` serves them.
    """
    subfolder = folder.resolve().relative_to(output_directory().resolve())
    return [{"filename": image_path(folder, index).name, "subfolder": subfolder.as_posix(), "type": "output"}
            for index in indices]


def preview_tensor(folder: Any, count: int = PREVIEW_IMAGES) -> Any:
    """The first ``count`` finished images as ComfyUI's IMAGE: ``[n, height, width, 3]`` floats in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    arrays = []
    for path in done_image_paths(folder, limit=count):
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays))


# ---------------------------------------------------------------------------------------------------
# Which model made the images


def _fingerprint(digest: Any, module: Any, patched: Any = ()) -> None:
    """Hash the small tensors of ``module``, skipping patched ones (ComfyUI patches weights in place while loaded)."""
    import torch

    for name, tensor in sorted(module.state_dict().items()):
        if isinstance(tensor, torch.Tensor) and tensor.numel() <= _SMALL_TENSOR and name not in patched:
            digest.update(name.encode() + b"\0")
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def _patch_summary(patcher: Any) -> list[Any]:
    """Patched weights (LoRAs applied by a loader) with their strengths: a different LoRA or strength shows."""
    summary = []
    for key, patches in sorted(getattr(patcher, "patches", {}).items()):
        summary.append([key, [[float(patch[0]), float(patch[2])] for patch in patches]])
    return summary


def generator_record(model: Any, clip: Any, vae: Any) -> dict[str, Any]:
    """How ``dataset.json`` names the model: its ComfyUI model class and a fingerprint of the weights.

    ComfyUI's MODEL does not carry the checkpoint's file name, so the fingerprint (a hash of every
    small tensor of the UNet, text encoder and VAE, plus applied LoRA patches and strengths) is what
    tells one model from another when a run continues a dataset.
    """
    record: dict[str, Any] = {"engine": "comfyui", "model": "unknown", "fingerprint": None}
    try:
        record["model"] = type(model.model.model_config).__name__
        digest = hashlib.sha256()
        _fingerprint(digest, model.model, getattr(model, "patches", {}))
        _fingerprint(digest, clip.cond_stage_model, getattr(clip.patcher, "patches", {}))
        _fingerprint(digest, vae.first_stage_model)
        digest.update(repr([_patch_summary(model), _patch_summary(clip.patcher)]).encode())
        record["fingerprint"] = digest.hexdigest()[:16]
    except (AttributeError, TypeError, RuntimeError, IndexError):  # a stand-in or an unusual model object
        pass
    return record


# ---------------------------------------------------------------------------------------------------
# Which family the model is: its native size, its negative conditioning


def model_family(model: Any) -> str | None:
    """``sd1``, ``sd2`` or ``sdxl`` for a ComfyUI MODEL, from its model config's class; None for other families."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    class_names = {config_class.__name__ for config_class in type(config).__mro__}
    return next((family for family, class_name in _FAMILY_CONFIGS if class_name in class_names), None)


def _prediction_type(model: Any) -> str:
    """What the MODEL predicts, as diffusers names it (ComfyUI's ``ModelType``: EPS, V_PREDICTION…)."""
    model_type = getattr(getattr(model.model, "model_type", None), "name", "EPS")
    return "v_prediction" if model_type.startswith("V_PREDICTION") else "epsilon"


def render_size(model: Any, width: int, height: int) -> tuple[int, int]:
    """``(width, height)`` with each 0 (auto) replaced by the model family's native size."""
    if width and height:
        return width, height
    family = model_family(model)
    if family is None:
        config = getattr(getattr(model, "model", None), "model_config", model)
        raise DatasetError(f"{'height' if width else 'width'}: 0 (auto): the native size of this model "
                           f"({type(config).__name__}) is not known; expected SD 1.x, SD 2.x or SDXL, or set width "
                           "and height")
    native = native_resolution(family, _prediction_type(model))
    return width or native, height or native


def negative_conditioning(model: Any, clip: Any, negative_prompt: str) -> dict[str, Any]:
    """The negative prompt's conditioning: CLIP's encoding, or zeros of its shapes (pooled output too) where
    :func:`trainer.render.run.zeros_for_empty_negative` says so (an empty one on SDXL)."""
    encoded = _encode(clip, negative_prompt)
    if not zeros_for_empty_negative(model_family(model) == "sdxl", negative_prompt):
        return encoded
    import torch

    return {key: torch.zeros_like(value) if key in ("cond", "pooled_output") else value
            for key, value in encoded.items()}


# ---------------------------------------------------------------------------------------------------
# Sampling through ComfyUI


def _escape_weights(prompt: str) -> str:
    """Keep parentheses literal: the captions are plain text, not ComfyUI's ``(word:1.2)`` weighting."""
    return re.sub(r"([()])", r"\\\1", prompt)


def _encode(clip: Any, text: str) -> dict[str, Any]:
    return clip.encode_from_tokens(clip.tokenize(_escape_weights(text)), return_pooled=True, return_dict=True)


def conditioning_length(clip: Any, prompt: str) -> int:
    """Tokens of the conditioning ComfyUI's CLIP makes of ``prompt``: 77 per chunk its tokenizer cuts
    (SDXL: the shorter of its two encoders', as ComfyUI cuts them), told from the tokens alone."""
    return 77 * min(len(chunks) for chunks in clip.tokenize(_escape_weights(prompt)).values())


def stack_conditioning(encoded: list[dict[str, Any]], negative: dict[str, Any], width: int,
                       height: int) -> tuple[list[Any], list[Any]]:
    """One positive conditioning with the batch's prompts stacked along the batch, and the negative.

    The prompts must share a length (:func:`trainer.render.dataset.batches` groups them): padding them to
    the least common multiple of their lengths would cost more than rendering them one by one. The
    negative keeps its own length, as a KSampler gets it: ComfyUI pads it by repetition where that
    costs at most 4x and runs it apart otherwise. Size conditioning (SDXL) is the render size.
    """
    import torch

    lengths = sorted({entry["cond"].shape[1] for entry in encoded})
    if len(lengths) > 1:
        raise ValueError(f"a batch of prompts with conditionings of {lengths} tokens; expected one length per batch "
                         "(trainer.render.dataset.batches groups them)")
    size = {"width": width, "height": height, "crop_w": 0, "crop_h": 0, "target_width": width,
            "target_height": height}

    def extras(entries: list[dict[str, Any]]) -> dict[str, Any]:
        merged = {}
        for key in entries[0]:
            if key == "cond":
                continue
            values = [entry.get(key) for entry in entries]
            if all(isinstance(value, torch.Tensor) for value in values):
                merged[key] = torch.cat(values)
            elif values[0] is not None:
                merged[key] = values[0]
        return merged

    positive = torch.cat([entry["cond"] for entry in encoded])
    return ([[positive, {**extras(encoded), **size}]], [[negative["cond"], {**extras([negative]), **size}]])


def per_image_noise_sampler(sampler: Any, sampler_name: str, seeds: list[int]) -> Any:
    """``sampler`` with a noise source per image for the noise it draws while sampling.

    ComfyUI seeds an ancestral or SDE sampler's noise once for the whole batch, so without this an
    image would depend on its batch. Gaussian samplers get ComfyUI's own default noise sampler per
    image (what a batch of one with that seed uses); the SDE family gets a Brownian tree with one
    seed per image. Samplers that draw no noise are returned unchanged.
    """
    import torch
    from comfy.k_diffusion import sampling as k_sampling

    function = getattr(sampler, "sampler_function", None)
    try:
        takes_noise_sampler = function is not None and "noise_sampler" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        takes_noise_sampler = False
    if not takes_noise_sampler:
        return sampler

    def with_per_image_noise(model: Any, x: Any, sigmas: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("noise_sampler") is None:
            if _BROWNIAN.match(sampler_name):
                kwargs["noise_sampler"] = k_sampling.BrownianTreeNoiseSampler(
                    x, sigmas[sigmas > 0].min(), sigmas.max(), seed=list(seeds), cpu=True)
            else:
                per_image = [k_sampling.default_noise_sampler(x[index:index + 1], seed=seed)
                             for index, seed in enumerate(seeds)]
                kwargs["noise_sampler"] = lambda sigma, sigma_next: torch.cat(
                    [noise(sigma, sigma_next) for noise in per_image])
        return function(model, x, sigmas, *args, **kwargs)

    wrapped = copy.copy(sampler)
    wrapped.sampler_function = with_per_image_noise
    return wrapped


class ComfyBatchRenderer:
    """A :class:`trainer.render.dataset.BatchRenderer` that samples a batch of prompts in one ComfyUI sampler call."""

    def __init__(self, model: Any, clip: Any, vae: Any, request: RenderRequest) -> None:
        import comfy.samplers

        self.model, self.clip, self.vae, self.request = model, clip, vae, request
        self.negative = negative_conditioning(model, clip, request.negative_prompt)
        self.sigmas = comfy.samplers.KSampler(model, steps=request.steps, device=model.load_device,
                                              sampler=request.sampler, scheduler=request.scheduler, denoise=1.0,
                                              model_options=model.model_options).sigmas

    def conditioning_length(self, prompt: str) -> int:
        return conditioning_length(self.clip, prompt)

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Any]:
        import comfy.model_management
        import comfy.sample
        import comfy.samplers
        import torch

        def step_done(step: int, denoised: Any, x: Any, total_steps: int) -> None:
            check_interrupted()

        request, model = self.request, self.model
        # ComfyUI's executor runs nodes in inference mode too; this keeps the renderer usable alone
        with torch.inference_mode():
            positive, negative = stack_conditioning([_encode(self.clip, prompt) for prompt in prompts], self.negative,
                                                    request.width, request.height)
            latent = torch.zeros([len(prompts), 4, request.height // 8, request.width // 8],
                                 device=comfy.model_management.intermediate_device())
            latent = comfy.sample.fix_empty_latent_channels(model, latent)
            noise = torch.cat([comfy.sample.prepare_noise(latent[index:index + 1], seed)
                               for index, seed in enumerate(seeds)])
            sampler = per_image_noise_sampler(comfy.samplers.sampler_object(request.sampler), request.sampler, seeds)
            samples = comfy.sample.sample_custom(model, noise, request.cfg, sampler, self.sigmas, positive, negative,
                                                 latent, callback=step_done, disable_pbar=True, seed=seeds[0])
            pixels = self.vae.decode(samples)
            pixels = pixels.reshape(-1, *pixels.shape[-3:])  # video VAEs add a frame axis
            return float_images_to_pil(pixels.detach().float().cpu().numpy())

"""SELMA Merge LoRA Experts: stage 4 as a ComfyUI node, over ``trainer.merge.run.merge_files``.

Up to 8 experts, each slot filled either by a link from a Train node (its LoRA name or path) or by a
LoRA picked from ``models/loras``; the merged LoRA is saved into ``models/loras`` so LoraLoader lists
it at once. With MODEL/CLIP linked, the node also returns them with the merged LoRA applied
(ComfyUI's own ``load_lora_for_models``), for a preview in the same graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..trainer.storage.files import check_name
from ..trainer.merge.run import (
    ARCHITECTURE_CHOICES,
    METHOD_KEY,
    SAVE_DTYPES,
    MergeConfig,
    MergeResult,
    merge_files,
)
from ..trainer.merge.methods import METHODS
from ..trainer.settings import default_of, help_of
from .comfy_runtime import NodeProgress, send_event
from .folders import model_folder_paths, model_path

EVENT = "selma.merge"

SLOTS = 8
NONE = "None"
LORA_SUFFIX = ".safetensors"


def _tip(name: str) -> str:
    return help_of(MergeConfig, name)


def _lora_names() -> list[str]:
    """"None" + the .safetensors files in models/loras; just "None" where ComfyUI is absent (docs, tests)."""
    try:
        import folder_paths
    except ImportError:
        return [NONE]
    return [NONE] + [name for name in folder_paths.get_filename_list("loras") if name.lower().endswith(LORA_SUFFIX)]


def _resolve_expert(value: str, field: str) -> Path:
    """A slot's value — a name in models/loras or a path inside it — as a path; raises naming the widget."""
    return model_path(value, field, model_folder_paths("loras"), "a LoRA", file_only=True)


def _check_replaceable(target: Path) -> None:
    """A workflow may replace a merge it made, never a LoRA the owner put into models/loras (nor anything else)."""
    if not target.exists():
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(target), framework="pt") as handle:
            ours = METHOD_KEY in (handle.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        ours = False
    if not ours:
        raise ValueError(f"output_name: {target.name} already exists in models/loras and is no SELMA merge; a merge "
                         "replaces only an earlier merge, so choose another output_name (or move that file away)")


class SelmaMergeLoraExperts:
    DISPLAY_NAME = "SELMA Merge LoRA Experts"
    CATEGORY = "SELMA/4 merge"
    DESCRIPTION = (
        "Merges skill-specific LoRA experts into one multi-skill LoRA (SELMA stage 4) and saves it into "
        "models/loras. Methods: linear (exact weighted sum of the experts' ΔW, as SELMA's released code; ranks "
        "stacked), mean_ab (SELMA's printed formula: average of the down and up matrices), svd (the weighted sum "
        "re-factored to a rank), ties and dare (interference-reducing merges, re-factored to a rank). Reads kohya, "
        "ComfyUI and diffusers LoRA files; every check runs before the file is written. Link MODEL and CLIP to get "
        "them back with the merged LoRA applied.")
    FUNCTION = "merge"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "STRING")
    RETURN_NAMES = ("model", "clip", "lora_name", "lora_path")
    OUTPUT_TOOLTIPS = (
        "The input model with the merged LoRA applied (None when no model is linked).",
        "The input CLIP with the merged LoRA's text-encoder layers applied (None when no CLIP is linked).",
        "The merged LoRA's name in models/loras, as LoraLoader lists it.",
        "Full path of the merged LoRA file.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        loras = _lora_names()
        optional: dict[str, Any] = {}
        for slot in range(1, SLOTS + 1):
            optional[f"expert_{slot}"] = ("STRING", {
                "forceInput": True,
                "tooltip": f"Expert {slot} from a Train node: its LoRA name or path in models/loras. When "
                           f"linked it fills slot {slot} instead of lora_{slot}."})
        for slot in range(1, SLOTS + 1):
            optional[f"lora_{slot}"] = (loras, {
                "default": NONE,
                "tooltip": f"Expert {slot} picked from models/loras (used when expert_{slot} is not linked); None "
                           "leaves the slot empty. Weights follow the filled slots in order."})
        optional.update({
            "density": ("FLOAT", {"default": default_of(MergeConfig, "density"), "min": 0.01, "max": 1.0,
                                  "step": 0.01, "tooltip": _tip("density")}),
            "seed": ("INT", {"default": default_of(MergeConfig, "seed"), "min": 0, "max": 2**63 - 1,
                             "control_after_generate": False, "tooltip": _tip("seed")}),
            "save_dtype": (list(SAVE_DTYPES), {"default": default_of(MergeConfig, "save_dtype"),
                                               "tooltip": _tip("save_dtype")}),
            "architecture": (list(ARCHITECTURE_CHOICES), {"default": default_of(MergeConfig, "architecture"),
                                                          "tooltip": _tip("architecture")}),
            "model": ("MODEL", {"tooltip": "Optional: a model to return with the merged LoRA applied (preview)."}),
            "clip": ("CLIP", {"tooltip": "Optional: a CLIP to return with the merged LoRA applied (preview)."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                         "tooltip": "Strength of the merged LoRA on the linked model."}),
            "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                        "tooltip": "Strength of the merged LoRA on the linked CLIP."}),
        })
        return {
            "required": {
                "method": (list(METHODS), {"default": default_of(MergeConfig, "method"), "tooltip": _tip("method")}),
                "weights": ("STRING", {"default": default_of(MergeConfig, "weights"), "tooltip": _tip("weights")}),
                "rank": ("INT", {"default": default_of(MergeConfig, "rank"), "min": 0, "max": 4096,
                                 "tooltip": _tip("rank")}),
                "output_name": ("STRING", {"default": "selma-merged", "tooltip":
                                           "File name of the merged LoRA in models/loras (.safetensors added). An "
                                           "earlier merge of that name is replaced; any other file (an expert's "
                                           "own, a LoRA you downloaded) is refused."}),
            },
            "optional": optional,
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def merge(self, method: str, weights: str, rank: int, output_name: str, density: float | None = None,
              seed: int | None = None, save_dtype: str | None = None, architecture: str | None = None,
              model: Any = None, clip: Any = None, strength_model: float = 1.0, strength_clip: float = 1.0,
              unique_id: str | None = None, **slots: str) -> tuple[Any, Any, str, str]:
        import folder_paths

        experts = []
        for slot in range(1, SLOTS + 1):
            linked = (slots.get(f"expert_{slot}") or "").strip()
            picked = (slots.get(f"lora_{slot}") or NONE).strip()
            if linked:
                experts.append(_resolve_expert(linked, f"expert_{slot}"))
            elif picked and picked != NONE:
                experts.append(_resolve_expert(picked, f"lora_{slot}"))
        if not experts:
            raise ValueError("no experts: link a Train node to expert_1.. or pick LoRAs in lora_1..")
        file_name = check_name(output_name.strip().removesuffix(LORA_SUFFIX), "output_name") + LORA_SUFFIX
        target = Path(folder_paths.get_folder_paths("loras")[0]) / file_name
        _check_replaceable(target)
        config = MergeConfig(
            method=method, weights=weights, rank=rank,
            density=default_of(MergeConfig, "density") if density is None else density,
            seed=default_of(MergeConfig, "seed") if seed is None else seed,
            save_dtype=save_dtype or default_of(MergeConfig, "save_dtype"),
            architecture=architecture or default_of(MergeConfig, "architecture"))
        progress_bar = NodeProgress(1, node_id=unique_id)
        result = merge_files(experts, target, config, progress=lambda done, total: progress_bar.update(done, total))
        print(f"[SELMA Merge LoRA Experts] {result.summary()}")
        send_event(EVENT, {"node": unique_id, "method": result.method,
                           "sources": [Path(source).name for source in result.sources],
                           "weights": result.weights, "rank": max(result.lora.ranks, default=0),
                           "output": file_name, "missing_modules": len(result.missing)})
        model, clip = _apply(result, model, clip, strength_model, strength_clip)
        return model, clip, file_name, str(result.path)


def _apply(result: MergeResult, model: Any, clip: Any, strength_model: float, strength_clip: float) -> tuple[Any, Any]:
    """ComfyUI's LoraLoader path: the same file, the same key mapping a user's LoraLoader would use."""
    if model is None and clip is None:
        return None, None
    import comfy.sd
    import comfy.utils

    lora_state_dict = comfy.utils.load_torch_file(str(result.path), safe_load=True)
    return comfy.sd.load_lora_for_models(model, clip, lora_state_dict, strength_model, strength_clip)

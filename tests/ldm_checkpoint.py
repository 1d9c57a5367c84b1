"""Write a diffusers pipeline as one single-file checkpoint in the original (LDM) layout.

The files users load in ComfyUI and A1111 look like this, so tests need such files; the diffusers
wheel has no writer and the script in the diffusers repository assumes SD 1.x block counts. This is
the exact inverse of diffusers' own readers in ``diffusers.loaders.single_file_utils``
(``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``), for any number of blocks and layers per block, tiny or full size.

Layout written:
- UNet → ``model.diffusion_model.*`` (``input_blocks`` / ``middle_block`` / ``output_blocks``,
  ``time_embed``, SDXL's ``label_emb``, ``out``);
- VAE → ``first_stage_model.*`` (attention projections as 1x1 convolutions, as LDM stores them);
- CLIP-L → ``cond_stage_model.transformer.text_model.*`` (SD 1.x) or
  ``conditioner.embedders.0.transformer.text_model.*`` (SDXL);
- OpenCLIP → ``cond_stage_model.model.*`` (SD 2.x) or ``conditioner.embedders.1.model.*`` (SDXL):
  fused ``in_proj``, ``positional_embedding``, ``text_projection`` stored transposed.

An SD 2.x file holds the 23 OpenCLIP layers diffusers keeps, not the 24th that original SD 2.x files
carry and diffusers drops on load.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _rename_part(rest: str, parts: Mapping[str, str]) -> str:
    """Rename the leading module path of ``rest`` (``norm1.weight`` → ``in_layers.0.weight``)."""
    for diffusers_part, ldm_part in parts.items():
        if rest.startswith(diffusers_part + "."):
            return ldm_part + rest[len(diffusers_part):]
    return rest


def _apply_rules(state_dict: Mapping[str, torch.Tensor], rules: list[Rule], component: str) -> dict[str, torch.Tensor]:
    """Rename every key by the first rule whose pattern matches; a key no rule knows is an error."""
    renamed = {}
    for key, tensor in state_dict.items():
        for pattern, rename in rules:
            match = pattern.fullmatch(key)
            if match:
                renamed[rename(match)] = tensor
                break
        else:
            raise ValueError(
                f"{component} key {key!r} has no place in the LDM layout; this writer covers SD 1.x, 2.x and SDXL"
            )
    return renamed


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """UNet keys → ``model.diffusion_model.*``.

    LDM numbers blocks flat: ``input_blocks`` holds conv_in, then per level ``layers_per_block``
    (resnet, attention) pairs and a downsampler (none after the last level); ``output_blocks``
    holds ``layers_per_block + 1`` per level, the upsampler sitting after the attention if any.
    """
    if not isinstance(layers_per_block, int):
        raise ValueError(
            f"layers_per_block: {layers_per_block!r}; diffusers' LDM reader handles one int for every block"
        )
    per_level = layers_per_block + 1
    up_levels_with_attention = {
        int(key.split(".")[1]) for key in state_dict if re.match(r"up_blocks\.\d+\.attentions\.", key)
    }

    def input_block(match: re.Match[str]) -> int:
        return 1 + int(match[1]) * per_level + int(match[2])

    def output_block(match: re.Match[str]) -> int:
        return int(match[1]) * per_level + int(match[2])

    def upsampler(match: re.Match[str]) -> str:
        level = int(match[1])
        slot = 2 if level in up_levels_with_attention else 1
        return f"output_blocks.{level * per_level + layers_per_block}.{slot}.conv.{match[2]}"

    rules: list[Rule] = [
        (re.compile(r"time_embedding\.linear_([12])\.(.+)"), lambda m: f"time_embed.{2 * int(m[1]) - 2}.{m[2]}"),
        (re.compile(r"add_embedding\.linear_([12])\.(.+)"), lambda m: f"label_emb.0.{2 * int(m[1]) - 2}.{m[2]}"),
        (re.compile(r"conv_in\.(.+)"), lambda m: f"input_blocks.0.0.{m[1]}"),
        (re.compile(r"conv_norm_out\.(.+)"), lambda m: f"out.0.{m[1]}"),
        (re.compile(r"conv_out\.(.+)"), lambda m: f"out.2.{m[1]}"),
        (
            re.compile(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
            lambda m: f"input_blocks.{input_block(m)}.0.{_rename_part(m[3], _UNET_RESNET_PARTS)}",
        ),
        (
            re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"),
            lambda m: f"input_blocks.{input_block(m)}.1.{m[3]}",
        ),
        (
            re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)"),
            lambda m: f"input_blocks.{1 + int(m[1]) * per_level + layers_per_block}.0.op.{m[2]}",
        ),
        (
            re.compile(r"mid_block\.resnets\.(\d+)\.(.+)"),
            lambda m: f"middle_block.{2 * int(m[1])}.{_rename_part(m[2], _UNET_RESNET_PARTS)}",
        ),
        (re.compile(r"mid_block\.attentions\.0\.(.+)"), lambda m: f"middle_block.1.{m[1]}"),
        (
            re.compile(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
            lambda m: f"output_blocks.{output_block(m)}.0.{_rename_part(m[3], _UNET_RESNET_PARTS)}",
        ),
        (
            re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"),
            lambda m: f"output_blocks.{output_block(m)}.1.{m[3]}",
        ),
        (re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)"), upsampler),
    ]
    return {UNET_PREFIX + key: tensor for key, tensor in _apply_rules(state_dict, rules, "UNet").items()}


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], up_block_count: int) -> dict[str, torch.Tensor]:
    """VAE keys → ``first_stage_model.*``; the decoder's levels count up in LDM, down in diffusers."""

    def decoder_level(match: re.Match[str]) -> int:
        return up_block_count - 1 - int(match[1])

    def attention(match: re.Match[str]) -> str:
        return f"{match[1]}.mid.attn_1.{_rename_part(match[2], _VAE_ATTENTION_PARTS)}"

    rules: list[Rule] = [
        (re.compile(r"(encoder|decoder)\.conv_norm_out\.(.+)"), lambda m: f"{m[1]}.norm_out.{m[2]}"),
        (re.compile(r"((?:encoder|decoder)\.conv_(?:in|out)|(?:post_)?quant_conv)\.(.+)"), lambda m: f"{m[1]}.{m[2]}"),
        (
            re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
            lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{_rename_part(m[3], _VAE_RESNET_PARTS)}",
        ),
        (
            re.compile(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)"),
            lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}",
        ),
        (
            re.compile(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
            lambda m: f"decoder.up.{decoder_level(m)}.block.{m[2]}.{_rename_part(m[3], _VAE_RESNET_PARTS)}",
        ),
        (
            re.compile(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)"),
            lambda m: f"decoder.up.{decoder_level(m)}.upsample.conv.{m[2]}",
        ),
        (
            re.compile(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)"),
            lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_part(m[3], _VAE_RESNET_PARTS)}",
        ),
        (re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)"), attention),
    ]
    renamed = _apply_rules(state_dict, rules, "VAE")
    # LDM's VAE attention projections are 1x1 convolutions; diffusers' are linear layers.
    for key, tensor in renamed.items():
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and tensor.ndim == 2:
            renamed[key] = tensor[:, :, None, None]
    return {VAE_PREFIX + key: tensor for key, tensor in renamed.items()}


def _with_text_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 flattened ``CLIPTextModel``; its keys no longer start with ``text_model.``."""
    return {
        key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key: tensor
        for key, tensor in state_dict.items()
    }


def clip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder → ``<prefix>text_model.*`` (the HF layout, prefixed)."""
    return {prefix + key: tensor for key, tensor in _with_text_model_prefix(state_dict).items()}


def open_clip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder → open_clip's layout under ``prefix``, q/k/v fused into ``in_proj``."""
    source = _with_text_model_prefix(state_dict)
    layer_keys = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")
    converted: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in source.items():
        layer = layer_keys.fullmatch(key)
        if layer:
            projection = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", layer[2])
            if projection:
                fused.setdefault((int(layer[1]), projection[2]), {})[projection[1]] = tensor
            else:
                converted[f"transformer.resblocks.{layer[1]}.{_rename_part(layer[2], _OPEN_CLIP_LAYER_PARTS)}"] = tensor
        elif key == "text_model.embeddings.position_embedding.weight":
            converted["positional_embedding"] = tensor
        elif key == "text_model.embeddings.token_embedding.weight":
            converted["token_embedding.weight"] = tensor
        elif key.startswith("text_model.final_layer_norm."):
            converted["ln_final." + key.rsplit(".", 1)[1]] = tensor
        elif key == "text_projection.weight":
            converted["text_projection"] = tensor.T.contiguous()
        else:
            raise ValueError(f"text encoder key {key!r} has no place in the open_clip layout")
    for (layer_index, kind), projections in fused.items():
        converted[f"transformer.resblocks.{layer_index}.attn.in_proj_{kind}"] = torch.cat(
            [projections["q"], projections["k"], projections["v"]]
        )
    return {prefix + key: tensor for key, tensor in converted.items()}


# Architecture → text-encoder component → (key prefix, writer).
TEXT_ENCODER_LAYOUTS: dict[str, dict[str, tuple[str, Callable[..., dict[str, torch.Tensor]]]]] = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", clip_to_ldm)},
    "sd2": {"text_encoder": ("cond_stage_model.model.", open_clip_to_ldm)},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.", clip_to_ldm),
        "text_encoder_2": ("conditioner.embedders.1.model.", open_clip_to_ldm),
    },
}


def ldm_state_dict(pipeline, architecture: str) -> dict[str, torch.Tensor]:
    """The whole pipeline (UNet, VAE, text encoders) as one LDM-layout state dict."""
    if architecture not in TEXT_ENCODER_LAYOUTS:
        raise ValueError(f"architecture: {architecture!r}; expected one of {', '.join(TEXT_ENCODER_LAYOUTS)}")
    checkpoint = unet_to_ldm(pipeline.unet.state_dict(), pipeline.unet.config.layers_per_block)
    checkpoint.update(vae_to_ldm(pipeline.vae.state_dict(), len(pipeline.vae.config.up_block_types)))
    for component, (prefix, writer) in TEXT_ENCODER_LAYOUTS[architecture].items():
        checkpoint.update(writer(getattr(pipeline, component).state_dict(), prefix))
    return checkpoint


def save_ldm_checkpoint(pipeline, path: str | os.PathLike[str], architecture: str) -> Path:
    """Write ``pipeline`` to ``path`` as an LDM-layout ``.safetensors`` checkpoint."""
    tensors = {key: tensor.detach().contiguous() for key, tensor in ldm_state_dict(pipeline, architecture).items()}
    save_file(tensors, os.fspath(path), metadata={"format": "pt"})
    return Path(path)

"""Tiny SD 1.x and SDXL pipelines with random weights: the embedded default model of ``selma demo``
and of the tests, built from configs offline in well under a second.

They keep the real models' structure — block kinds, cross-attention, SDXL's two text encoders and
time conditioning — at toy widths, and the real tokenizer and schedulers, so everything from prompt
to LoRA file runs unchanged. Weights are seeded: the same call builds the same model.

SDXL's two tiny text encoders have different widths (32 and 64) on purpose: diffusers tells them
apart in a single-file checkpoint by their width, so equal widths would load CLIP-L's weights into
the OpenCLIP encoder.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..text import clip_tokenizer
from .configs import CONFIGS_PATH

TINY_RESOLUTION = 64


def _tokenizer(pad_token: str) -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as folder:
        return CLIPTokenizer.from_pretrained(clip_tokenizer.write_tokenizer_folder(folder, pad_token=pad_token))


def _scheduler_config(architecture: str) -> dict:
    return json.loads((CONFIGS_PATH / architecture / "scheduler" / "scheduler_config.json").read_text())


def _text_config(hidden_size: int, hidden_act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=clip_tokenizer.VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=clip_tokenizer.MODEL_MAX_LENGTH,
        hidden_act=hidden_act,
        projection_dim=hidden_size,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def _vae(layers_per_block: int, scaling_factor: float) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=layers_per_block,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=TINY_RESOLUTION,
        scaling_factor=scaling_factor,
    )


def tiny_sd1_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD 1.x in miniature: CLIP-L-style encoder (width 32), conv attention projections, one layer per block."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return StableDiffusionPipeline(
        vae=_vae(layers_per_block=1, scaling_factor=0.18215),
        text_encoder=CLIPTextModel(_text_config(32, "quick_gelu")),
        tokenizer=_tokenizer(clip_tokenizer.END_OF_TEXT),
        unet=unet,
        scheduler=PNDMScheduler.from_config(_scheduler_config("sd1")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL in miniature: CLIP-L-style (32) + OpenCLIP-style (64, projected) encoders, text_time conditioning."""
    torch.manual_seed(seed)
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=32 + 64,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # pooled text embedding (64) + 6 time ids (original size, crop, target size) of time_embed_dim each
        projection_class_embeddings_input_dim=64 + 6 * time_embed_dim,
        norm_num_groups=32,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(layers_per_block=2, scaling_factor=0.13025),
        text_encoder=CLIPTextModel(_text_config(32, "quick_gelu")),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(64, "gelu")),
        tokenizer=_tokenizer(clip_tokenizer.END_OF_TEXT),
        tokenizer_2=_tokenizer("!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(_scheduler_config("sdxl")),
    )


def save_pipeline(pipeline: StableDiffusionPipeline | StableDiffusionXLPipeline, folder: Path) -> Path:
    """Write ``pipeline`` as a diffusers folder with safetensors weights."""
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder

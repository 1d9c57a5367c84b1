"""The one place that knows LoRA key names: checked against diffusers' real UNets and an LDM writer."""

from __future__ import annotations

import json

import pytest
import torch

from comfyui_selma.trainer.lora.architectures import (
    TEXT_ENCODER_1,
    UNET,
    ModulePath,
    architecture,
    detect_architecture,
    kohya_module_name,
    parse_module_path,
)
from comfyui_selma.trainer.families.configs import ARCHITECTURES, CONFIGS_PATH


def _unet_config(name: str) -> dict:
    return json.loads((CONFIGS_PATH / name / "unet" / "config.json").read_text())


def _meta_unet_layers(name: str) -> dict[str, tuple[int, ...]]:
    """Every Linear/Conv2d weight of the real-size diffusers UNet of a family, built on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_unet_config(name))
    return {path: tuple(module.weight.shape) for path, module in unet.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_catalog_holds_every_layer_of_the_real_unet_with_its_shape(name):
    layers = _meta_unet_layers(name)
    catalog = {module.diffusers: module for module in architecture(name).unet_modules}
    assert set(layers) <= set(catalog), sorted(set(layers) - set(catalog))[:5]
    extra = set(catalog) - set(layers)
    assert all(path.endswith("conv_shortcut") for path in extra), sorted(extra)[:5]
    for path, shape in layers.items():
        module = catalog[path]
        if module.out_features is not None:
            assert (module.out_features, module.in_features) == shape[:2], path


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_ldm_names_match_the_ldm_checkpoint_writer(name):
    from ldm_checkpoint import UNET_PREFIX, unet_to_ldm

    layers = _meta_unet_layers(name)
    renamed = unet_to_ldm({path + ".weight": path for path in layers}, _unet_config(name)["layers_per_block"])
    expected = {diffusers: ldm[len(UNET_PREFIX):-len(".weight")] for ldm, diffusers in renamed.items()}
    arch = architecture(name)
    for diffusers_path, ldm_path in expected.items():
        assert arch.unet_module(diffusers_path).ldm == ldm_path


def test_kohya_names_follow_sd_scripts_per_family():
    sd1, sdxl = architecture("sd1"), architecture("sdxl")
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert sd1.kohya_unet_name(sd1.unet_module(path)) == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
    assert sdxl.kohya_unet_name(sdxl.unet_module(path)) == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k"
    assert [encoder.kohya_prefix for encoder in sd1.text_encoders] == ["lora_te_"]
    assert [encoder.kohya_prefix for encoder in architecture("sd2").text_encoders] == ["lora_te_"]
    assert [encoder.kohya_prefix for encoder in sdxl.text_encoders] == ["lora_te1_", "lora_te2_"]


def test_sdxl_has_560_attention_projections_and_sd1_128():
    assert len(architecture("sdxl").attention_projections()) == 560
    assert len(architecture("sd1").attention_projections()) == 128


@pytest.mark.parametrize("module, expected", [
    ("lora_unet_input_blocks_4_1_proj_in", "lora_unet_input_blocks_4_1_proj_in"),
    ("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k",
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"),
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0"),
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_ff_net_2",
     "lora_unet_input_blocks_4_1_transformer_blocks_1_ff_net_2"),
    ("unet.up_blocks.0.attentions.2.transformer_blocks.9.attn1.processor.to_out",
     "lora_unet_output_blocks_2_1_transformer_blocks_9_attn1_to_out_0"),
    ("text_encoders.clip_g.transformer.text_model.encoder.layers.31.mlp.fc2",
     "lora_te2_text_model_encoder_layers_31_mlp_fc2"),
    ("text_encoder.encoder.layers.0.self_attn.q_proj", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
])
def test_every_layout_names_the_same_sdxl_module(module, expected):
    assert kohya_module_name(parse_module_path(module), architecture("sdxl")) == expected


def test_sd1_reads_ldm_names_into_diffusers_naming():
    path = parse_module_path("diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_v")
    assert kohya_module_name(path, architecture("sd1")) == \
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v"


def _shapes(name: str, paths: list[str]) -> dict[ModulePath, tuple[int, int]]:
    arch = architecture(name)
    shapes = {}
    for path in paths:
        module = arch.unet_module(path)
        shapes[ModulePath(UNET, path.replace(".", "_"), "diffusers")] = (module.out_features, module.in_features)
    return shapes


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_family_is_told_by_the_cross_attention_key_width(name):
    # down_blocks.1 attention exists in every family; only attn2.to_k's in-features differ (768/1024/2048)
    shapes = _shapes(name, ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"])
    assert detect_architecture(shapes, source="x.safetensors").name == name


def test_self_attention_only_lora_of_sd1_or_sd2_needs_metadata_or_an_explicit_family():
    shapes = _shapes("sd1", ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"])
    with pytest.raises(ValueError, match=r"x\.safetensors: could be sd1 or sd2"):
        detect_architecture(shapes, source="x.safetensors")
    assert detect_architecture(shapes, {"ss_base_model_version": "sd_v2"}).name == "sd2"
    assert detect_architecture(shapes, requested="sd1").name == "sd1"


def test_a_layer_sdxl_lacks_rules_sdxl_out_even_when_asked_for():
    shapes = _shapes("sd1", ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"])
    with pytest.raises(ValueError, match="SDXL UNet has no layer 'down_blocks_0_attentions_0"):
        detect_architecture(shapes, source="x.safetensors", requested="sdxl")


def test_text_encoder_prefix_and_width_tell_the_family():
    sd2_text = {ModulePath(TEXT_ENCODER_1, "text_model_encoder_layers_0_self_attn_q_proj", "kohya", "lora_te_"):
                (1024, 1024)}
    assert detect_architecture(sd2_text).name == "sd2"
    sdxl_text = {ModulePath(TEXT_ENCODER_1, "text_model_encoder_layers_0_self_attn_q_proj", "kohya", "lora_te1_"):
                 (768, 768)}
    assert detect_architecture(sdxl_text).name == "sdxl"


def test_metadata_names_the_family_when_no_family_has_the_shapes():
    tiny = {ModulePath(UNET, "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", "kohya"): (32, 32)}
    with pytest.raises(ValueError, match=r"tiny\.safetensors: fits no supported architecture \(.*not sd1: .*768"):
        detect_architecture(tiny, source="tiny.safetensors")
    assert detect_architecture(tiny, {"modelspec.architecture": "stable-diffusion-v1/lora"}).name == "sd1"
    # names rule SDXL out whatever the metadata says
    with pytest.raises(ValueError, match="not sdxl: the SDXL UNet has no layer"):
        detect_architecture(tiny, {"ss_base_model_version": "sdxl_base_v1-0"}, source="tiny.safetensors")

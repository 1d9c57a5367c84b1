"""Reading LoRA files of every common layout into one representation; writing kohya layout; refusing bad files."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from lora_factories import attention_modules, random_lora, random_module, text_encoder_modules, write_expert
from safetensors import safe_open
from safetensors.torch import save_file

from comfyui_selma.trainer.lora.file import (
    Lora,
    LoraFileError,
    kohya_state_dict,
    lora_from_state_dict,
    read_lora,
    write_lora,
)

_TEXT_PATH = re.compile(r"lora_te[12]?_text_model_encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12])")


def _text_dotted(kohya_name: str) -> str:
    match = _TEXT_PATH.fullmatch(kohya_name)
    part = match[2].replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
    return f"text_model.encoder.layers.{match[1]}.{part}"


def _expert_with_every_kind_of_layer(name: str) -> Lora:
    """Attention projections, text-encoder layers of every encoder, and for SD 1.x two convolutions."""
    lora = random_lora(name, attention_modules(name, 10) + text_encoder_modules(name), rank=4, seed=1, alpha=8)
    if name == "sd1":
        lora.modules["lora_unet_down_blocks_0_attentions_0_proj_in"] = random_module(320, 320, 4, 7, 2.0, (1, 1))
        lora.modules["lora_unet_down_blocks_0_resnets_0_conv1"] = random_module(320, 320, 4, 8, 4.0, (3, 3))
    first = next(iter(lora.modules))
    lora.modules[first] = random_module(*lora.modules[first].weight_shape[:2], rank=4, seed=9, alpha=2.0)
    return lora


def _diffusers_path(lora: Lora, kohya_name: str) -> str:
    return lora.architecture.unet_module(kohya_name.removeprefix("lora_unet_")).diffusers


def _comfyui_layout(lora: Lora) -> dict[str, torch.Tensor]:
    """ComfyUI's native keys, the UNet part renamed by the independent LDM checkpoint writer."""
    from ldm_checkpoint import UNET_PREFIX, unet_to_ldm

    unet = {name: module for name, module in lora.modules.items() if name.startswith("lora_unet_")}
    ldm_of = {kohya: ldm for ldm, kohya in unet_to_ldm(
        {_diffusers_path(lora, name) + ".weight": name for name in unet}, layers_per_block=2).items()}
    encoders = {encoder.kohya_prefix: encoder.comfy_name for encoder in lora.architecture.text_encoders}
    tensors = {}
    for name, module in lora.modules.items():
        if name in ldm_of:
            prefix = "diffusion_model." + ldm_of[name][len(UNET_PREFIX):-len(".weight")]
        else:
            encoder = next(prefix for prefix in encoders if name.startswith(prefix))
            prefix = f"text_encoders.{encoders[encoder]}.transformer.{_text_dotted(name)}"
        tensors |= {f"{prefix}.lora_up.weight": module.up, f"{prefix}.lora_down.weight": module.down,
                    f"{prefix}.alpha": torch.tensor(module.alpha)}
    return tensors


def _diffusers_layout(lora: Lora) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers/PEFT keys (lora_A/lora_B, no alpha tensors) with alphas in the adapter metadata, as
    ``save_lora_weights`` writes them; the second encoder without ``text_model.`` as transformers 5 names it."""
    components = {"lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
    tensors, alpha_patterns = {}, {}
    for name, module in lora.modules.items():
        if name.startswith("lora_unet_"):
            component, path = "unet", _diffusers_path(lora, name)
        else:
            prefix = next(prefix for prefix in ("lora_te1_", "lora_te2_", "lora_te_") if name.startswith(prefix))
            component, path = components[prefix], _text_dotted(name)
            if component == "text_encoder_2":
                path = path.removeprefix("text_model.")
        tensors |= {f"{component}.{path}.lora_A.weight": module.down, f"{component}.{path}.lora_B.weight": module.up}
        if module.alpha != 8:
            alpha_patterns.setdefault(component, {})[path] = module.alpha
    config = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        config |= {f"{component}.r": 4, f"{component}.lora_alpha": 8,
                   f"{component}.alpha_pattern": alpha_patterns.get(component, {})}
    return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(config)}


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_kohya_comfyui_and_diffusers_layouts_read_to_the_same_delta_weights(name, tmp_path):
    expert = _expert_with_every_kind_of_layer(name)
    save_file(kohya_state_dict(expert), tmp_path / "kohya.safetensors")
    save_file(_comfyui_layout(expert), tmp_path / "comfyui.safetensors")
    tensors, metadata = _diffusers_layout(expert)
    save_file(tensors, tmp_path / "diffusers.safetensors", metadata=metadata)
    for layout in ("kohya", "comfyui", "diffusers"):
        read = read_lora(tmp_path / f"{layout}.safetensors")
        assert read.architecture.name == name and read.layouts == (layout,)
        assert set(read.modules) == set(expert.modules), layout
        for module_name, module in expert.modules.items():  # same factors and alpha: the same ΔW
            read_module = read.modules[module_name]
            assert torch.equal(read_module.down, module.down) and torch.equal(read_module.up, module.up), module_name
            assert read_module.alpha == module.alpha, f"{layout}: {module_name}"


def test_a_lora_saved_by_diffusers_from_peft_reads_with_its_alphas(tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        alpha_pattern={"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2},
                        init_lora_weights=False)
    unet.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=config.to_dict())
    read = read_lora(tmp_path / "pytorch_lora_weights.safetensors", architecture="sd1")
    layers = {path: layer for path, layer in unet.named_modules() if hasattr(layer, "get_delta_weight")}
    assert len(read.modules) == len(layers) == 32
    for path, layer in layers.items():
        module = read.modules["lora_unet_" + path.replace(".", "_")]
        torch.testing.assert_close(module.delta_weight(), layer.get_delta_weight("default"), msg=path)
    assert read.modules["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"].alpha == 2


def test_a_trainer_hands_over_peft_state_dicts_as_they_are_with_its_alpha():
    down, up = torch.randn(4, 320), torch.randn(320, 4)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {f"{path}.lora_A.weight": down, f"{path}.lora_B.weight": up,
               "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 768),
               "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(768, 4)}
    lora = lora_from_state_dict(tensors, source="run", architecture="sd1", default_alpha=8)
    assert set(lora.modules) == {"lora_unet_" + path.replace(".", "_"),
                                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj"}
    assert all(module.alpha == 8 and module.scale == 2 for module in lora.modules.values())


def test_written_file_is_kohya_layout_with_string_metadata(tmp_path):
    expert = random_lora("sdxl", attention_modules("sdxl", 4) + text_encoder_modules("sdxl"), rank=4, seed=2,
                         title="counting")
    path = write_expert(tmp_path / "expert.safetensors", expert)
    with safe_open(path, framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
        alpha = handle.get_tensor(keys[0].split(".")[0] + ".alpha")
    assert all(re.fullmatch(r"lora_(unet|te1|te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)", key)
               for key in keys)
    assert alpha.ndim == 0 and alpha.item() == 4
    assert all(isinstance(value, str) for value in metadata.values())
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.title"] == "counting"
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "4"
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert not list(tmp_path.glob(".*tmp")), "the atomic write left a temporary file"


class _RunsCodeWhenUnpickled:
    marker = Path()

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("file_name", ["expert.ckpt", "expert.pt", "expert.bin", "disguised.safetensors"])
def test_pickle_files_are_refused_without_unpickling(file_name, tmp_path):
    _RunsCodeWhenUnpickled.marker = tmp_path / "code-ran"
    path = tmp_path / file_name
    if file_name.endswith(".bin"):
        path.write_bytes(pickle.dumps(_RunsCodeWhenUnpickled()))
    else:
        torch.save({"lora_unet_x.lora_down.weight": _RunsCodeWhenUnpickled()}, path)
    with pytest.raises(LoraFileError, match=re.escape(str(path)) + ".*pickle.*never unpickled"):
        read_lora(path)
    assert not _RunsCodeWhenUnpickled.marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "text", "empty"])
def test_a_truncated_or_non_safetensors_file_is_an_error_naming_the_file(damage, tmp_path):
    path = write_expert(tmp_path / "expert.safetensors", random_lora("sd1", attention_modules("sd1", 2), 4, 1))
    data = path.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "text": b"not a LoRA at all, just text", "empty": b""}
    path.write_bytes(damaged[damage])
    with pytest.raises(LoraFileError, match=re.escape(str(path)) + ": not a .*safetensors file"):
        read_lora(path)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nan_or_inf_is_an_error_naming_file_and_key(bad_value, tmp_path):
    tensors = kohya_state_dict(random_lora("sd1", attention_modules("sd1", 3), 4, 1))
    key = sorted(tensors)[4]
    tensors[key].view(-1)[0] = bad_value
    path = tmp_path / "diverged.safetensors"
    save_file(tensors, path)
    with pytest.raises(LoraFileError, match=re.escape(f"{path}: key {key!r} holds 1 NaN/Inf")):
        read_lora(path)


def test_a_down_weight_without_its_up_weight_is_an_error_naming_the_key(tmp_path):
    tensors = kohya_state_dict(random_lora("sd1", attention_modules("sd1", 2), 4, 1))
    up_key = next(key for key in tensors if key.endswith(".lora_up.weight"))
    del tensors[up_key]
    with pytest.raises(LoraFileError, match=re.escape(up_key.replace("lora_up", "lora_down")) + ".* no up weight"):
        lora_from_state_dict(tensors, source="expert.safetensors")


@pytest.mark.parametrize("key, named", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a", "LoHa"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale", "DoRA"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_mid.weight", "Tucker"),
    ("diffusion_model.input_blocks.1.1.proj_in.diff", "full weight"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.weight", "not a LoRA key"),
])
def test_keys_of_other_adapter_formats_are_refused_by_name(key, named):
    with pytest.raises(LoraFileError, match=re.escape(f"expert.safetensors: key {key!r}") + f".*{named}"):
        lora_from_state_dict({key: torch.zeros(2, 2)}, source="expert.safetensors")


def test_a_module_no_family_has_is_an_error_naming_the_key():
    tensors = {"lora_vae_decoder_conv_in.lora_down.weight": torch.zeros(2, 4),
               "lora_vae_decoder_conv_in.lora_up.weight": torch.zeros(4, 2)}
    message = "expert.safetensors: key 'lora_vae_decoder_conv_in.lora_down.weight' names no"
    with pytest.raises(LoraFileError, match=message):
        lora_from_state_dict(tensors, source="expert.safetensors")


def test_missing_alpha_means_scale_one_as_every_loader_reads_it():
    tensors = kohya_state_dict(random_lora("sd1", attention_modules("sd1", 1), rank=4, seed=1, alpha=2))
    del tensors[next(key for key in tensors if key.endswith(".alpha"))]
    module = next(iter(lora_from_state_dict(tensors, architecture="sd1").modules.values()))
    assert module.alpha == module.rank == 4 and module.scale == 1


def test_write_then_read_keeps_modules_alphas_and_dtype(tmp_path):
    expert = random_lora("sd2", attention_modules("sd2", 6), rank=3, seed=5, alpha=1.5)
    path = tmp_path / "expert.safetensors"
    write_lora(expert, path, dtype=torch.float16)
    read = read_lora(path)
    assert read.architecture.name == "sd2" and read.title == "expert"
    for name, module in expert.modules.items():
        assert read.modules[name].down.dtype == torch.float16 and read.modules[name].alpha == 1.5
        torch.testing.assert_close(read.modules[name].delta_weight(), module.delta_weight(), rtol=2e-3, atol=1e-5)


# --- `selma lora info` on a file made by someone else ----------------------------------------------------------

# What a shared LoRA's metadata can hold to act on a terminal: an OSC title change, a screen clear, an 8-bit CSI,
# DEL, a line break that fakes another key, and a right-to-left override that reverses what follows on screen.
HOSTILE_TEXT = "ok\x1b]0;owned\x07 \x1b[2J\x9b31m\x7f\nss_network_dim: 1\u202egpj.exe"
TERMINAL_CONTROLS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def test_lora_info_escapes_control_characters_of_a_shared_file_in_text_and_json(tmp_path, capsys):
    from comfyui_selma.trainer.cli import main

    lora = random_lora("sd1", attention_modules("sd1", 2), rank=2, seed=0)
    path = tmp_path / "shared.safetensors"
    save_file(kohya_state_dict(lora), str(path),
              metadata={**lora.metadata, "modelspec.title": HOSTILE_TEXT, "note\x1b[8m": "hidden key"})
    for flags in ([], ["--full"]):
        assert main(["lora", "info", *flags, str(path)]) == 0
        printed = capsys.readouterr().out
        assert not TERMINAL_CONTROLS.search(printed), f"raw control characters printed with {flags}"
        assert "\\x1b]0;owned\\x07" in printed and "\\x9b31m" in printed and "\\u202egpj.exe" in printed
        assert "\n  ss_network_dim: 1" not in printed, "a line break in a value must not start a new line"
        assert "  note\\x1b[8m: hidden key" in printed
    assert main(["lora", "info", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert not TERMINAL_CONTROLS.search(printed)
    assert json.loads(printed)["metadata"]["modelspec.title"] == HOSTILE_TEXT, "JSON keeps the exact value"


def test_lora_info_errors_escape_control_characters_of_the_file_name(tmp_path, capsys):
    from comfyui_selma.trainer.cli import main

    path = tmp_path / "name\x1b[2J\u202e.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    assert main(["lora", "info", str(path)]) == 2
    error = capsys.readouterr().err
    assert not TERMINAL_CONTROLS.search(error) and "name\\x1b[2J\\u202e.safetensors" in error

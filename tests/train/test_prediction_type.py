"""What a base model's UNet predicts — noise (epsilon) or velocity (v) — and what the LoRA then learns.

SD 2.x single files come as the 512 px epsilon model and the 768 px v model with the same shapes, and
some SDXL files predict v. A single file has no scheduler config, so the prediction type is read from
its weights as ComfyUI reads it (``comfy/supported_models.py``, ``model_type`` of SD20 and SDXL) — the
LoRA is used in ComfyUI on that file and must learn what ComfyUI samples with. The trainer, its LoRA's
metadata and ``selma render`` all follow what is detected; the ``prediction_type`` setting overrides it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ldm_checkpoint import ldm_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from train_helpers import CAPTIONS, events_of, one_torch_thread, tiny_config, write_dataset  # noqa: F401

from comfyui_selma.nodes.train import SelmaTrainLoraExpert
from comfyui_selma.trainer.train import loop as train_module
from comfyui_selma.trainer.families.configs import ModelFamily
from comfyui_selma.trainer.families.loading import SD2_V_PREDICTION_PROBE, checkpoint_family
from comfyui_selma.trainer.render.run import load_renderer_pipeline, native_size
from comfyui_selma.trainer.settings import help_of
from comfyui_selma.trainer.train.loop import run_training
from comfyui_selma.trainer.train.config import TrainConfig, read_config, write_config
from comfyui_selma.trainer.train.launch import check_inputs

UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"
TEXT_ENCODER_KEYS = {"sd1": "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                     "sd2": "cond_stage_model.model.ln_final.weight",
                     "sdxl": "conditioner.embedders.1.model.ln_final.weight"}


def spread(population_std: float, length: int = 320) -> torch.Tensor:
    """A bias whose population standard deviation (ComfyUI's ``unbiased=False``) is ``population_std``."""
    return torch.tensor([population_std, -population_std] * (length // 2))


def synthetic_checkpoint(path: Path, architecture: str, probe: torch.Tensor | None = None, in_channels: int = 4,
                         v_pred_key: bool = False) -> Path:
    """Just the keys detection reads: a UNet input convolution, the family's text encoder, maybe the probe."""
    tensors = {UNET_INPUT: torch.zeros(8, in_channels, 3, 3), TEXT_ENCODER_KEYS[architecture]: torch.ones(4)}
    if probe is not None:
        tensors[SD2_V_PREDICTION_PROBE] = probe
    if v_pred_key:
        tensors["v_pred"] = torch.tensor([])  # what ComfyUI writes into a v-prediction model it saves
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(("architecture", "probe", "in_channels", "v_pred_key", "expected"), [
    ("sd2", spread(0.2), 4, False, "v_prediction"),  # v2-1_768-v: its norm1.bias std is well above 0.09
    ("sd2", spread(0.02), 4, False, "epsilon"),  # v2-1_512 base
    ("sd2", spread(0.08, length=2), 4, False, "epsilon"),  # population std 0.08; the sample std would be 0.113
    ("sd2", spread(0.2), 9, False, "epsilon"),  # an inpainting UNet is never v (ComfyUI's rule)
    ("sd2", None, 4, False, "epsilon"),  # no probe: other shapes, ComfyUI says epsilon
    ("sdxl", None, 4, True, "v_prediction"),
    ("sdxl", None, 4, False, "epsilon"),
    ("sd1", spread(0.2), 4, True, "epsilon"),  # ComfyUI reads neither sign for SD 1.x
])
def test_single_files_are_told_v_prediction_or_epsilon_by_comfyuis_rules(tmp_path, architecture, probe, in_channels,
                                                                          v_pred_key, expected):
    checkpoint = synthetic_checkpoint(tmp_path / "model.safetensors", architecture, probe, in_channels, v_pred_key)
    assert checkpoint_family(checkpoint) == ModelFamily(architecture, expected)


def test_the_default_resolution_and_the_setting_follow_the_detected_prediction_type(tmp_path):
    dataset = write_dataset(tmp_path / "dataset", captions=CAPTIONS[:1])
    base_512 = synthetic_checkpoint(tmp_path / "v2-1_512-ema-pruned.safetensors", "sd2", spread(0.02))
    base_768_v = synthetic_checkpoint(tmp_path / "v2-1_768-ema-pruned.safetensors", "sd2", spread(0.2))
    expected = {(base_512, "auto"): ("epsilon", 512), (base_768_v, "auto"): ("v_prediction", 768),
                (base_512, "v_prediction"): ("v_prediction", 768), (base_768_v, "epsilon"): ("epsilon", 512)}
    for (model, setting), (prediction_type, resolution) in expected.items():
        config = TrainConfig(pretrained_model_name_or_path=str(model), train_data_dir=str(dataset),
                             prediction_type=setting)
        family = check_inputs(config).family
        assert (family.prediction_type, config.resolution_for(family)) == (prediction_type, resolution), \
            (model.name, setting)
    assert native_size(base_512) == 512 and native_size(base_768_v) == 768  # selma render's default size


# ----------------------------------------------------------------------------- a tiny SD 2.x single file

def _tiny_sd2_pipeline(prediction_type: str):
    """SD 2.x in miniature (OpenCLIP-style encoder, linear attention projections) with the real model's
    four levels and two layers per block, so ``output_blocks.11.1`` — the attention ComfyUI probes — exists."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from comfyui_selma.trainer.families.tiny import TINY_RESOLUTION, _scheduler_config, _text_config, _tokenizer, _vae

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2, block_out_channels=(32, 32, 32, 32), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=(2, 2, 2, 2), use_linear_projection=True, norm_num_groups=32)
    scheduler = DDIMScheduler.from_config({**_scheduler_config("sd2"), "prediction_type": prediction_type})
    return StableDiffusionPipeline(vae=_vae(layers_per_block=1, scaling_factor=0.18215),
                                   text_encoder=CLIPTextModel(_text_config(32, "gelu")), tokenizer=_tokenizer("!"),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory) -> dict[str, Path]:
    """Two tiny SD 2.x single files, the same weights but for ComfyUI's probe (std 0: epsilon; 0.2: v), and
    for each a config folder whose scheduler says the opposite — the trap of one shipped config for every file."""
    from comfyui_selma.trainer.families.tiny import save_pipeline

    root = tmp_path_factory.mktemp("tiny-sd2")
    files: dict[str, Path] = {}
    for prediction_type, probe_std, config_says in (("epsilon", 0.0, "v_prediction"), ("v_prediction", 0.2, "epsilon")):
        pipeline = _tiny_sd2_pipeline(config_says)
        save_pipeline(pipeline, root / f"config-{prediction_type}")
        tensors = {key: tensor.contiguous() for key, tensor in ldm_state_dict(pipeline, "sd2").items()}
        assert SD2_V_PREDICTION_PROBE in tensors
        tensors[SD2_V_PREDICTION_PROBE] = spread(probe_std, tensors[SD2_V_PREDICTION_PROBE].numel())
        files[prediction_type] = root / f"tiny-sd2-{prediction_type}.safetensors"
        save_file(tensors, str(files[prediction_type]))
    return files


@pytest.mark.parametrize(("prediction_type", "v_parameterization", "base_model_version", "modelspec_architecture",
                          "modelspec_prediction"), [
    ("epsilon", "False", "sd_v2", "stable-diffusion-v2-512/lora", "epsilon"),
    ("v_prediction", "True", "sd_v2_v", "stable-diffusion-v2-768-v/lora", "v"),
])
@pytest.mark.slow
def test_an_sd2_single_file_is_trained_on_the_targets_its_weights_say_and_the_lora_says_so(
        tmp_path, monkeypatch, tiny_sd2, prediction_type, v_parameterization, base_model_version,
        modelspec_architecture, modelspec_prediction):
    checkpoint = tiny_sd2[prediction_type]
    config_folder = checkpoint.with_name(f"config-{prediction_type}")  # its scheduler says the other type
    targets: list[str] = []
    real_target = train_module.diffusion_target

    def recording_target(noise_scheduler, latents, noise, timesteps):
        targets.append(noise_scheduler.config.prediction_type)
        return real_target(noise_scheduler, latents, noise, timesteps)

    monkeypatch.setattr(train_module, "diffusion_target", recording_target)
    dataset = write_dataset(tmp_path / "dataset", captions=CAPTIONS[:2])
    lines: list[str] = []
    lora = run_training(tiny_config(checkpoint, dataset, tmp_path / "cache", model_config_dir=str(config_folder),
                                    max_train_steps=1), tmp_path / "run", echo=lines.append)

    assert targets and set(targets) == {prediction_type}
    start = next(event for event in events_of(lines) if event["event"] == "start")
    assert (start["architecture"], start["prediction_type"]) == ("sd2", prediction_type)
    with safe_open(str(lora), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["selma.prediction_type"] == prediction_type
    assert metadata["ss_v_parameterization"] == v_parameterization and metadata["ss_v2"] == "True"
    assert metadata["ss_base_model_version"] == base_model_version
    assert metadata["modelspec.architecture"] == modelspec_architecture
    assert metadata["modelspec.prediction_type"] == modelspec_prediction
    assert metadata["modelspec.resolution"] == "64x64"  # the trained size, not the family's


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["default", "euler"])
def test_selma_render_samples_a_single_file_with_its_detected_prediction_type(tiny_sd2, sampler):
    for prediction_type, checkpoint in tiny_sd2.items():
        config_folder = checkpoint.with_name(f"config-{prediction_type}")
        pipeline = load_renderer_pipeline(checkpoint, "cpu", sampler=sampler, model_config=config_folder)
        assert pipeline.scheduler.config.prediction_type == prediction_type, (checkpoint.name, sampler)


def test_prediction_type_is_one_setting_for_the_cli_the_config_file_and_the_node(tmp_path, comfy):
    help_text = subprocess.run([sys.executable, "-m", "comfyui_selma.trainer.cli", "train", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "--prediction-type {auto,epsilon,v_prediction}" in help_text

    spec = SelmaTrainLoraExpert.INPUT_TYPES()["optional"]["prediction_type"]
    assert spec[0] == ["auto", "epsilon", "v_prediction"]
    assert spec[1]["default"] == "auto" and spec[1]["tooltip"] == help_of(TrainConfig, "prediction_type")

    dataset = write_dataset(comfy.output_dir / "selma" / "datasets" / "counting", captions=CAPTIONS[:1])
    model = synthetic_checkpoint(comfy.models_dir("checkpoints") / "v2-1_512-ema-pruned.safetensors", "sd2",
                                 spread(0.02))
    with pytest.raises(ValueError, match="prediction_type: 'sample'; expected one of auto, epsilon, v_prediction"):
        SelmaTrainLoraExpert().train(
            dataset_path=str(dataset), base_checkpoint="", lora_name="expert", rank=4, alpha=4.0, learning_rate=3e-4,
            steps=1, batch_size=1, gradient_accumulation=1, resolution=64, precision="fp16", seed=0, save_every=0,
            gpus=1, base_model_path=str(model), prediction_type="sample")

    config = TrainConfig(pretrained_model_name_or_path=str(model), train_data_dir=str(dataset),
                         prediction_type="v_prediction")
    config_file = write_config(config, tmp_path / "run")
    assert 'prediction_type = "v_prediction"' in config_file.read_text()
    assert read_config(config_file).prediction_type == "v_prediction"

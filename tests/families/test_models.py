"""Base models: the offline configs, the CLIP tokenizer, tiny test models and single-file checkpoints."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils
from ldm_checkpoint import TEXT_ENCODER_LAYOUTS, open_clip_to_ldm, unet_to_ldm, vae_to_ldm
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from comfyui_selma.trainer.text import clip_tokenizer
from comfyui_selma.trainer.families.configs import ARCHITECTURES, CONFIGS_PATH, config_folder, detect_architecture
from comfyui_selma.trainer.families.loading import checkpoint_family, load_pipeline

# Published sizes of the real models (parameters).
UNET_PARAMETERS = {"sd1": 859_520_964, "sd2": 865_910_724, "sdxl": 2_567_463_684}
TEXT_ENCODER_PARAMETERS = {  # CLIP ViT-L/14, OpenCLIP ViT-H/14 (23 of 24 layers), OpenCLIP bigG/14 + projection
    "sd1": {"text_encoder": 123_060_480},
    "sd2": {"text_encoder": 340_387_840},
    "sdxl": {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}
VAE_PARAMETERS = 83_653_863
PAD_TOKENS = {  # OpenAI's CLIP-L pads with <|endoftext|>, the OpenCLIP encoders with "!"
    "sd1": {"tokenizer": "<|endoftext|>"},
    "sd2": {"tokenizer": "!"},
    "sdxl": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
}
# diffusers' own name for each family, from infer_diffusers_model_type.
DIFFUSERS_MODEL_TYPES = {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}


@pytest.fixture
def selma_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SELMA_CACHE_DIR", str(tmp_path))
    return tmp_path


@contextmanager
def _network_refused() -> Iterator[list[str]]:
    """Fail any connection or name lookup, and record it in case a library swallows the error.

    The hub's offline switches are cleared: loading must stay offline without them.
    """
    attempts: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(repr(args[:2]))
        raise OSError("network use in an offline test")

    with pytest.MonkeyPatch.context() as patch:
        for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
            patch.delenv(variable, raising=False)
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket.socket, "connect_ex", refuse)
        patch.setattr(socket, "getaddrinfo", refuse)
        yield attempts


def _load_offline(path: Path, **options: object) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    with _network_refused() as attempts:
        pipeline = load_pipeline(path, **options)
    assert attempts == [], f"loading {path} tried the network"
    return pipeline


@pytest.fixture(scope="module")
def tiny_sd1_from_folder(tiny_sd1_folder: Path) -> StableDiffusionPipeline:
    return _load_offline(tiny_sd1_folder)


@pytest.fixture(scope="module")
def tiny_sdxl_from_folder(tiny_sdxl_folder: Path) -> StableDiffusionXLPipeline:
    return _load_offline(tiny_sdxl_folder)


def _meta_models(folder: Path, architecture: str) -> dict[str, torch.nn.Module]:
    """The full-size UNet, VAE and text encoders built from ``folder``'s configs on the meta device."""
    with torch.device("meta"):
        models: dict[str, torch.nn.Module] = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
        }
        if architecture == "sdxl":
            second_config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            models["text_encoder_2"] = CLIPTextModelWithProjection(second_config)
    return models


def _shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {key: tensor.shape for key, tensor in state_dict.items()}


def _parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _assert_same_weights(loaded: torch.nn.Module, reference: torch.nn.Module, component: str) -> None:
    loaded_state, reference_state = loaded.state_dict(), reference.state_dict()
    assert loaded_state.keys() == reference_state.keys(), component
    different = [key for key in reference_state if not torch.equal(loaded_state[key], reference_state[key])]
    assert not different, f"{component}: {len(different)} tensors differ, e.g. {different[:3]}"


def test_clip_tokenizer_gives_the_real_clip_token_ids(tmp_path: Path) -> None:
    merges = clip_tokenizer.read_merges()
    assert len(merges) == 48_894
    assert len(clip_tokenizer.build_vocab(merges)) == 49_408
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer.write_tokenizer_folder(tmp_path))
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.model_max_length) == ("<|endoftext|>", 49407, 77)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_config_folder_holds_the_real_model_configs_and_tokenizers(architecture: str, selma_cache: Path) -> None:
    folder = config_folder(architecture)
    assert folder.parent == selma_cache / "configs" and folder.name.startswith(f"{architecture}-")
    models = _meta_models(folder, architecture)
    assert _parameter_count(models["unet"]) == UNET_PARAMETERS[architecture]
    assert _parameter_count(models["vae"]) == VAE_PARAMETERS
    for component, parameters in TEXT_ENCODER_PARAMETERS[architecture].items():
        assert _parameter_count(models[component]) == parameters, component
    for subfolder, pad_token in PAD_TOKENS[architecture].items():
        tokenizer = CLIPTokenizer.from_pretrained(folder / subfolder)
        assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert tokenizer.pad_token == pad_token, subfolder


def test_config_folder_is_built_once_and_reused(selma_cache: Path) -> None:
    folder = config_folder("sd1")
    marker = folder / "tokenizer" / "vocab.json"
    built_at = marker.stat().st_mtime_ns
    assert config_folder("sd1") == folder
    assert marker.stat().st_mtime_ns == built_at
    assert [path.name for path in (selma_cache / "configs").iterdir()] == [folder.name]  # no temporary left


def test_shipped_schedulers_predict_what_the_real_models_were_trained_to() -> None:
    """SD 2.1 is the 768-v model (v-prediction); SD 1.5 and SDXL predict noise."""

    def prediction_type(architecture: str) -> str:
        scheduler_config = CONFIGS_PATH / architecture / "scheduler" / "scheduler_config.json"
        return json.loads(scheduler_config.read_text())["prediction_type"]

    assert {architecture: prediction_type(architecture) for architecture in ARCHITECTURES} == {
        "sd1": "epsilon",
        "sd2": "v_prediction",
        "sdxl": "epsilon",
    }


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_full_size_ldm_layout_round_trips_through_diffusers_readers(architecture: str) -> None:
    """The checkpoint writer inverts diffusers' readers exactly at full size (meta device, no memory),
    and the file it writes is the family diffusers and detect_architecture both recognise."""
    models = _meta_models(CONFIGS_PATH / architecture, architecture)
    unet, vae = models["unet"], models["vae"]
    checkpoint = unet_to_ldm(unet.state_dict(), unet.config.layers_per_block)
    unet_read_back = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert _shapes(unet_read_back) == _shapes(unet.state_dict())
    written_vae = vae_to_ldm(vae.state_dict(), len(vae.config.up_block_types))
    vae_read_back = single_file_utils.convert_ldm_vae_checkpoint(written_vae, dict(vae.config))
    assert _shapes(vae_read_back) == _shapes(vae.state_dict())
    for component, (prefix, writer) in TEXT_ENCODER_LAYOUTS[architecture].items():
        encoder = models[component]
        written = writer(encoder.state_dict(), prefix)
        if writer is open_clip_to_ldm:
            read_back = single_file_utils.convert_open_clip_checkpoint(encoder, written, prefix=prefix)
        else:
            read_back = single_file_utils.convert_ldm_clip_checkpoint(written)
        if not hasattr(encoder, "text_model"):  # transformers 5 flattened CLIPTextModel
            read_back = {key.removeprefix("text_model."): tensor for key, tensor in read_back.items()}
        assert _shapes(read_back) == _shapes(encoder.state_dict()), component
        checkpoint.update(written)
    assert single_file_utils.infer_diffusers_model_type(checkpoint) == DIFFUSERS_MODEL_TYPES[architecture]
    assert detect_architecture(checkpoint) == architecture


def test_tiny_sd1_renders_64px_in_two_steps(tiny_sd1_from_folder: StableDiffusionPipeline) -> None:
    image = tiny_sd1_from_folder(
        "a photo of a cat", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)


def test_tiny_sdxl_renders_64px_in_two_steps(tiny_sdxl_from_folder: StableDiffusionXLPipeline) -> None:
    image = tiny_sdxl_from_folder(
        "a photo of a cat", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
def test_single_file_checkpoint_loads_offline_into_the_same_weights_as_the_folder(
    architecture: str, request: pytest.FixtureRequest
) -> None:
    checkpoint: Path = request.getfixturevalue(f"tiny_{architecture}_checkpoint")
    folder: Path = request.getfixturevalue(f"tiny_{architecture}_folder")
    reference = request.getfixturevalue(f"tiny_{architecture}_from_folder")
    assert checkpoint_family(checkpoint).architecture == architecture
    loaded = _load_offline(checkpoint, config=folder)  # the shipped configs are full size; the folder's fit
    assert type(loaded) is type(reference)
    components = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if architecture == "sdxl" else [])
    for component in components:
        _assert_same_weights(getattr(loaded, component), getattr(reference, component), component)


def test_tiny_sdxl_checkpoint_uses_the_original_key_layout(tiny_sdxl_checkpoint: Path) -> None:
    with safe_open(str(tiny_sdxl_checkpoint), framework="pt") as checkpoint:
        keys = set(checkpoint.keys())
    assert {key.split(".")[0] for key in keys} == {"model", "first_stage_model", "conditioner"}
    assert all(key.startswith("model.diffusion_model.") for key in keys if key.startswith("model."))
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys


def test_unrelated_safetensors_file_is_rejected_naming_the_file_and_the_expected_keys(tmp_path: Path) -> None:
    unrelated = tmp_path / "some-lora.safetensors"
    save_file({"lora_unet_down.lora_down.weight": torch.zeros(2, 2)}, str(unrelated))
    with pytest.raises(ValueError) as error:
        load_pipeline(unrelated)
    message = str(error.value)
    assert str(unrelated) in message
    assert "model.diffusion_model." in message and "conditioner.embedders.1.model." in message


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin"])
def test_pickled_checkpoint_is_refused_without_being_opened(tmp_path: Path, name: str) -> None:
    pickled = tmp_path / name
    pickled.write_bytes(b"not even a pickle")
    with pytest.raises(ValueError, match=r"never unpickled.*\.safetensors"):
        load_pipeline(pickled)


def test_folder_of_the_wrong_family_is_refused(tiny_sd1_folder: Path) -> None:
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline"):
        load_pipeline(tiny_sd1_folder, architecture="sdxl")


def test_missing_model_path_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_pipeline(tmp_path / "nowhere.safetensors")

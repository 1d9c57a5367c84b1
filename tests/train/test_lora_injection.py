"""LoRA layers go into the UNet and the text encoders through peft itself.

ComfyUI users install this pack into an environment that already owns transformers and peft, in
whatever versions. transformers' ``add_adapter`` refuses peft releases it was not released with
(transformers 5.24 refuses every peft below 0.22), so the trainer must not depend on it.
"""

from __future__ import annotations

import pytest
import torch
from train_helpers import tiny_config, write_dataset

from comfyui_selma.trainer.train.loop import add_lora, load_base_model


@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
def test_text_encoder_lora_does_not_go_through_the_version_gated_add_adapter(
        architecture, tiny_sd1_folder, tiny_sdxl_folder, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def refuse(*_arguments, **_keywords):
        raise ValueError("The version of PEFT you are using is not compatible, please use a version >= 0.22.0")

    monkeypatch.setattr(PreTrainedModel, "add_adapter", refuse)
    folder = tiny_sd1_folder if architecture == "sd1" else tiny_sdxl_folder
    config = tiny_config(folder, write_dataset(tmp_path / "dataset"), tmp_path / "cache", train_text_encoder=True)
    model = load_base_model(config, architecture, torch.float32)

    add_lora(model, config)

    for component in (model.unet, *model.text_encoders):
        lora_parameters = [name for name, _ in component.named_parameters() if "lora_A" in name]
        assert lora_parameters, f"{type(component).__name__} got no LoRA layers"
    assert len(model.text_encoders) == (2 if architecture == "sdxl" else 1)

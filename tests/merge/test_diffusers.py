"""A merged LoRA loads in diffusers' ``load_lora_weights`` (tiny SD 1.x) and every module gets its LoRA."""

from __future__ import annotations

import re

import pytest
import torch
from lora_factories import random_module, one_torch_thread  # noqa: F401 (fixture)

from comfyui_selma.trainer.lora.architectures import architecture, kohya_module_name, parse_module_path
from comfyui_selma.trainer.lora.file import Lora, read_lora, write_lora
from comfyui_selma.trainer.merge.run import MergeConfig, merge_files

UNET_TARGETS = re.compile(r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)")
TEXT_TARGETS = re.compile(r".*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _targets(pipeline, family: str) -> dict[str, tuple[str, torch.nn.Module]]:
    """kohya name → (diffusers component path, layer) of every layer the experts adapt."""
    arch = architecture(family)
    targets = {}
    components = (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS), ("text_encoder_2", TEXT_TARGETS))
    for component, pattern in components:
        model = getattr(pipeline, component, None)
        for path, layer in model.named_modules() if model is not None else ():
            if pattern.fullmatch(path):
                name = kohya_module_name(parse_module_path(f"{component}.{path}"), arch)
                targets[name] = (f"{component}.{path}", layer)
    return targets


def _unet_output(pipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 32, 32, generator=generator)
    tokens = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407]])
    extra = {}
    if hasattr(pipeline, "text_encoder_2"):  # SDXL: both encoders' states, pooled text and size/crop ids
        second = pipeline.text_encoder_2(tokens, output_hidden_states=True)
        text = torch.cat([pipeline.text_encoder(tokens, output_hidden_states=True).hidden_states[-2],
                          second.hidden_states[-2]], dim=-1)
        extra["added_cond_kwargs"] = {"text_embeds": second.text_embeds,
                                      "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    else:
        text = pipeline.text_encoder(tokens)[0]
    with torch.no_grad():
        return pipeline.unet(sample, 10, encoder_hidden_states=text, **extra).sample


# SDXL files use LDM module names (input_blocks_4_1_...), which diffusers maps back to its own.
@pytest.mark.slow
@pytest.mark.parametrize("family, method, layers", [("sd1", "linear", 40), ("sd1", "svd", 40), ("sdxl", "linear", 112)])
def test_merged_lora_loads_in_diffusers_with_every_module_and_changes_the_output(family, method, layers, request,
                                                                                 tmp_path):
    from diffusers import DiffusionPipeline

    folder = request.getfixturevalue(f"tiny_{family}_folder")
    pipeline = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    targets = _targets(pipeline, family)
    assert len(targets) == layers  # 8 projections per transformer block + q/k/v/out per text-encoder layer
    experts = []
    for index in range(2):
        modules = {name: random_module(layer.out_features, layer.in_features, rank=4, seed=100 * index + number,
                                       alpha=2.0)
                   for number, (name, (_, layer)) in enumerate(sorted(targets.items()))}
        lora = Lora(modules=modules, architecture=architecture(family), source=f"expert{index}")
        experts.append(write_lora(lora, tmp_path / f"expert{index}.safetensors"))
    merged_path = tmp_path / "merged.safetensors"
    merge_files(experts, merged_path, MergeConfig(method=method, weights="0.6,0.4", architecture=family, rank=4))
    merged = read_lora(merged_path, architecture=family)

    before = _unet_output(pipeline)
    pipeline.load_lora_weights(str(merged_path), adapter_name="merged")
    for name, (path, _) in targets.items():
        component, module_path = path.split(".", 1)
        layer = getattr(pipeline, component).get_submodule(module_path)  # PEFT swapped in a LoRA layer
        assert hasattr(layer, "lora_A") and "merged" in layer.lora_A, f"{path} got no LoRA"
        torch.testing.assert_close(layer.get_delta_weight("merged"), merged.modules[name].delta_weight(),
                                   rtol=1e-4, atol=1e-6, msg=path)
    assert not torch.allclose(_unet_output(pipeline), before, atol=1e-4)

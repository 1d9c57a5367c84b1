"""FLOPs of the UNet per image, counted from the modules: what a GPU row's model FLOP utilisation is measured
against.

Run from the repository root:

    .venv/bin/python benchmarks/flops.py                 # SD 1.5 at 512 px and SDXL at 1024 px, rank 128

Each UNet is built at full size from the shipped configs (``trainer/data/configs``) on the meta device (shapes
only: no memory, no arithmetic) and run once under ``torch.utils.flop_counter.FlopCounterMode``, which adds
up the FLOPs of every matrix product, convolution and attention product that the forward (and backward)
pass dispatches. Three counts per model, per image (batch 1; every count is linear in the batch):

- **forward**: one UNet evaluation (a sampler step without classifier-free guidance; with it, twice this);
- **LoRA training**: forward + backward with the base frozen and this project's LoRA (``trainer.train.loop.add_lora``:
  rank ``--rank``, the attention projections) trainable: the backward pass computes the activations'
  gradients through the whole UNet but weight gradients only for the LoRA factors, so about 2x forward;
- **full training**: forward + backward with every UNet weight trainable (about 3x forward), for reference.

Element-wise work (norms, activations, softmax) is not counted, as is usual for model FLOP utilisation.
Prints a table and writes ``benchmarks/results/flops.json`` (ignored by git); ``gpu_rows.py`` calls
:func:`count_unet_flops` itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPOSITORY_ROOT / "benchmarks" / "results" / "flops.json"
# The settings SELMA trains at: (architecture, resolution in pixels).
SELMA_CASES = (("sd1", 512), ("sdxl", 1024))
VAE_DOWNSCALE = 8
TEXT_TOKENS = 77


def build_unet(architecture: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32,
               config: dict | None = None):
    """The UNet of ``architecture`` with random weights (none on meta): full size from the shipped config, or
    from ``config`` (a UNet config, e.g. a tiny model's)."""
    from diffusers import UNet2DConditionModel

    from comfyui_selma.trainer.families.configs import config_folder

    config = config or UNet2DConditionModel.load_config(config_folder(architecture) / "unet")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in ``dtype``: no full-precision copy first, on a GPU too
    try:
        with torch.device(device):
            return UNet2DConditionModel.from_config(config)
    finally:
        torch.set_default_dtype(default_dtype)


def unet_inputs(unet, batch: int, resolution: int, device: str | torch.device = "meta",
                dtype: torch.dtype = torch.float32) -> dict:
    """Keyword arguments of one UNet call on ``batch`` images at ``resolution`` px: latents, timesteps, text
    states and, for SDXL, the pooled text embedding and the six size/crop time ids."""
    config = unet.config
    side = resolution // VAE_DOWNSCALE
    inputs = {"sample": torch.randn(batch, config.in_channels, side, side, device=device, dtype=dtype),
              "timestep": torch.full((batch,), 500, device=device, dtype=torch.long),
              "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, config.cross_attention_dim, device=device,
                                                   dtype=dtype)}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
                                       "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution,
                                                                  resolution]] * batch, device=device, dtype=dtype)}
    return inputs


def add_selma_lora(unet, architecture: str, rank: int) -> int:
    """Put this project's training LoRA (rank = alpha = ``rank``, the attention projections) on ``unet``, the
    base frozen, through the trainer's own :func:`add_lora`; the number of trainable parameters."""
    from comfyui_selma.trainer.train.loop import BaseModel, add_lora
    from comfyui_selma.trainer.train.config import TrainConfig

    unet.requires_grad_(False)
    model = BaseModel(architecture=architecture, unet=unet, vae=None, text_encoders=[], tokenizers=[],
                      noise_scheduler=None, sha256="", vae_scaling_factor=0.0)
    add_lora(model, TrainConfig(network_dim=rank, network_alpha=float(rank)))
    return sum(parameter.numel() for parameter in unet.parameters() if parameter.requires_grad)


def _counted(unet, inputs: dict, backward: bool) -> int:
    with FlopCounterMode(display=False) as counter:
        output = unet(**inputs).sample
        if backward:
            output.float().square().mean().backward()
    return counter.get_total_flops()


def count_unet_flops(architecture: str, resolution: int, rank: int, config: dict | None = None) -> dict:
    """Forward, LoRA-training and full-training FLOPs per image of the full-size UNet (or of ``config``'s; see
    the module doc)."""
    unet = build_unet(architecture, config=config)
    parameters = sum(parameter.numel() for parameter in unet.parameters())
    inputs = unet_inputs(unet, 1, resolution)
    forward = _counted(unet, inputs, backward=False)
    full_training = _counted(unet, inputs, backward=True)
    lora_parameters = add_selma_lora(unet, architecture, rank)
    lora_training = _counted(unet, inputs, backward=True)
    return {"architecture": architecture, "resolution": resolution, "rank": rank, "unet_parameters": parameters,
            "lora_parameters": lora_parameters, "forward_flops": forward, "lora_training_flops": lora_training,
            "full_training_flops": full_training}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=128, help="LoRA rank of the training count (SELMA: 128)")
    parser.add_argument("--results", default=str(RESULTS_PATH), help="where the results file goes")
    arguments = parser.parse_args()
    started = time.perf_counter()
    rows = [count_unet_flops(architecture, resolution, arguments.rank) for architecture, resolution in SELMA_CASES]
    print(f"{'UNet':<6} {'px':>5} {'params':>8} {'LoRA params':>11} {'forward':>9} {'LoRA train':>10} "
          f"{'full train':>10}   (TFLOP per image; LoRA rank {arguments.rank}, attention projections)")
    for row in rows:
        print(f"{row['architecture']:<6} {row['resolution']:>5} {row['unet_parameters'] / 1e6:>7.1f}M "
              f"{row['lora_parameters'] / 1e6:>10.1f}M {row['forward_flops'] / 1e12:>9.3f} "
              f"{row['lora_training_flops'] / 1e12:>10.3f} {row['full_training_flops'] / 1e12:>10.3f}")
    print(f"counted in {time.perf_counter() - started:.1f} s (meta device, torch {torch.__version__})")
    results = Path(arguments.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"rows": rows, "torch": torch.__version__}, indent=2) + "\n")
    print(f"written: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

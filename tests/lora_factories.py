"""Random LoRA experts for the LoRA-file and merge tests: real module names, small ranks, seeded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from comfyui_selma.trainer.lora.architectures import architecture
from comfyui_selma.trainer.lora.file import Lora, LoraModule, lora_metadata, write_lora


def random_module(out_features: int, in_features: int, rank: int, seed: int, alpha: float | None = None,
                  kernel: tuple[int, ...] = ()) -> LoraModule:
    """A LoRA layer with Gaussian factors of a trained-LoRA-like scale (ΔW entries around 1e-2)."""
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, in_features, *kernel, generator=generator) / in_features**0.5
    up = torch.randn(out_features, rank, *((1, 1) if kernel else ()), generator=generator) * 0.05
    return LoraModule(down=down, up=up, alpha=float(rank if alpha is None else alpha))


def best_rank_error(delta: torch.Tensor, rank: int) -> float:
    """||ΔW − its best rank-``rank`` approximation||_F, from a float64 SVD (Eckart–Young)."""
    singular_values = torch.linalg.svdvals(delta.double())
    return float(singular_values[rank:].square().sum().sqrt())


def attention_modules(architecture_name: str, count: int) -> list[tuple[str, int, int]]:
    """(kohya name, out, in) of the first ``count`` UNet attention projections of a family."""
    projections = architecture(architecture_name).attention_projections()[:count]
    return [(name, module.out_features, module.in_features) for name, module in projections]


def text_encoder_modules(architecture_name: str, layers: int = 1, mlp: bool = True) -> list[tuple[str, int, int]]:
    """(kohya name, out, in) of q/k/v/out projections (and the MLP) of the first text-encoder layers."""
    modules = []
    for encoder in architecture(architecture_name).text_encoders:
        width = encoder.hidden_size
        for layer in range(layers):
            base = f"{encoder.kohya_prefix}text_model_encoder_layers_{layer}_"
            modules += [(base + f"self_attn_{p}_proj", width, width) for p in ("q", "k", "v", "out")]
            if mlp:
                modules += [(base + "mlp_fc1", 4 * width, width), (base + "mlp_fc2", width, 4 * width)]
    return modules


def random_lora(architecture_name: str, modules: list[tuple[str, int, int]], rank: int, seed: int,
                alpha: float | None = None, title: str = "expert") -> Lora:
    arch = architecture(architecture_name)
    layers = {name: random_module(out, in_, rank, seed * 10_000 + index, alpha)
              for index, (name, out, in_) in enumerate(modules)}
    return Lora(modules=layers, architecture=arch,
                metadata=lora_metadata(arch, title=title, rank=rank, alpha=rank if alpha is None else alpha))


def write_expert(path: Path, lora: Lora) -> Path:
    write_lora(lora, path)
    return path


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run a test's small eigen/QR problems on one thread: on a shared 2-core machine MKL's threaded LAPACK
    waits on busy cores (a 320x320 eigh took 3.7 s on 2 threads, 7 ms on 1). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

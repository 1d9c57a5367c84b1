"""Which accelerator torch sees: one answer for the renderer and the trainer."""

from __future__ import annotations


def accelerator_available() -> bool:
    """Whether torch sees a GPU (CUDA, ROCm, XPU, MPS…)."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return accelerator.is_available()
    return torch.cuda.is_available()

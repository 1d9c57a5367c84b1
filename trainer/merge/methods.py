"""Merge methods: pure functions from the experts' versions of one layer to one merged layer.

Every method sees ΔW_i = scale_i · up_i · down_i (scale = alpha / rank) of expert i, the expert's
weight w_i, and ``None`` where an expert has no such layer (it counts as ΔW_i = 0). :data:`METHODS`
maps each method's name to its function; the CLI, the node and the tests all go through it.

- ``mean_ab``: SELMA's formula as printed — average the down matrices and the up matrices
  separately: down = Σ w_i·scale_i·down_i, up = Σ w_i·up_i (alpha = rank, so scale 1). Not the
  same function as a weighted sum of ΔW: it adds the cross terms up_i·down_j.
- ``linear``: the exact Σ w_i·ΔW_i, what SELMA's released code computes, stored losslessly by
  stacking ranks: down = concat(w_i·scale_i·down_i), up = concat(up_i), alpha = rank = Σ rank_i.
- ``svd``: the best rank-k approximation of Σ w_i·ΔW_i (Eckart–Young), computed from the stacked
  factors without forming ΔW: cost O((out+in)·R² + R³) for total rank R, see :func:`.low_rank.truncate_product`.
- ``ties`` (Yadav et al. 2023): trim each ΔW_i to its ``density`` largest-magnitude entries, elect
  each entry's sign from Σ w_i·trimmed_i, average the weighted entries that agree with it
  (Σ_agree w_i·t_i / Σ_agree w_i), times Σ w_i (so weights 1/N give the paper's λ = 1, and where no
  entry is trimmed or in conflict TIES equals ``linear``); then re-factored to rank k.
- ``dare`` (Yu et al. 2024): keep each entry of each ΔW_i with probability ``density`` and rescale
  the kept by 1/density (seeded), then Σ w_i·ΔW_i; re-factored to rank k.

k (``rank``) defaults to the experts' largest rank. All arithmetic is float32.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..lora.file import LoraModule
from .low_rank import truncate_dense, truncate_product

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MergeOptions:
    """Method settings for one layer. ``rank=None``: the experts' largest rank."""

    rank: int | None = None
    density: float = 0.2
    seed: int = 0


MergeFunction = Callable[[Sequence[LoraModule | None], Sequence[float], MergeOptions], LoraModule]


def module_seed(seed: int, module_name: str) -> int:
    """The DARE seed of one layer: the same for a layer whatever other layers a merge holds."""
    return (seed * 1_000_003 + zlib.crc32(module_name.encode("utf-8"))) % (2**63)


def _present(modules: Sequence[LoraModule | None], weights: Sequence[float]) -> list[tuple[LoraModule, float]]:
    present = [(module, float(weight)) for module, weight in zip(modules, weights, strict=True) if module is not None]
    if not present:
        raise ValueError("no expert has this layer")
    return present


def _as_module(up: torch.Tensor, down: torch.Tensor, like: LoraModule, alpha: float | None = None) -> LoraModule:
    """2-D factors back into a layer shaped like ``like`` (convolutions get their kernel back)."""
    rank = down.shape[0]
    kernel = like.kernel_size
    if kernel:
        down = down.reshape(rank, like.in_features, *kernel)
        up = up.reshape(like.out_features, rank, 1, 1)
    return LoraModule(down=down.contiguous(), up=up.contiguous(), alpha=float(rank if alpha is None else alpha))


def stacked_factors(
    modules: Sequence[LoraModule | None], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, R], down [R, in]) with up @ down = Σ w_i·ΔW_i exactly; R = Σ rank_i."""
    import torch

    present = _present(modules, weights)
    up = torch.cat([module.up_matrix() for module, _ in present], dim=1)
    down = torch.cat([module.down_matrix() for module, _ in present], dim=0)
    row_scales = torch.tensor([weight * module.scale for module, weight in present], dtype=down.dtype)
    return up, down.mul_(row_scales.repeat_interleave(torch.tensor([module.rank for module, _ in present]))[:, None])


def _target_rank(present: Sequence[tuple[LoraModule, float]], options: MergeOptions) -> int:
    return options.rank if options.rank else max(module.rank for module, _ in present)


def mean_ab(modules: Sequence[LoraModule | None], weights: Sequence[float], options: MergeOptions) -> LoraModule:
    """SELMA's printed formula: average down and up separately (equal ranks required)."""
    present = _present(modules, weights)
    ranks = {module.rank for module, _ in present}
    if len(ranks) != 1:
        raise ValueError(f"mean_ab needs equal ranks; the experts have ranks {sorted(ranks)}")
    down = sum(weight * module.scale * module.down_matrix() for module, weight in present)
    up = sum(weight * module.up_matrix() for module, weight in present)
    return _as_module(up, down, present[0][0])


def linear(modules: Sequence[LoraModule | None], weights: Sequence[float], options: MergeOptions) -> LoraModule:
    """Exact Σ w_i·ΔW_i with the ranks stacked (alpha = total rank, scale 1)."""
    up, down = stacked_factors(modules, weights)
    return _as_module(up, down, _present(modules, weights)[0][0])


def svd(modules: Sequence[LoraModule | None], weights: Sequence[float], options: MergeOptions) -> LoraModule:
    """Σ w_i·ΔW_i re-factored to rank k through the stacked factors (:func:`truncate_product`)."""
    present = _present(modules, weights)
    up, down = stacked_factors(modules, weights)
    new_up, new_down = truncate_product(up, down, _target_rank(present, options))
    return _as_module(new_up, new_down, present[0][0])


def _deltas(modules: Sequence[LoraModule | None]) -> torch.Tensor:
    """[N, out, in·k·k] ΔW of every expert, zeros where one lacks the layer."""
    import torch

    like = next(module for module in modules if module is not None)
    shape = (like.out_features, like.down_matrix().shape[1])
    return torch.stack([
        torch.zeros(shape) if module is None else module.scale * (module.up_matrix() @ module.down_matrix())
        for module in modules
    ])


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``int(density · numel)`` largest-magnitude entries set to zero."""
    import torch

    keep = int(density * delta.numel())
    if keep >= delta.numel():
        return delta.clone()
    if keep <= 0:
        return torch.zeros_like(delta)
    magnitude = delta.abs().flatten()
    threshold = torch.kthvalue(magnitude, magnitude.numel() - keep + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def ties(modules: Sequence[LoraModule | None], weights: Sequence[float], options: MergeOptions) -> LoraModule:
    """TIES: trim, elect sign, disjoint weighted mean × Σw; re-factored to rank k."""
    import torch

    present = _present(modules, weights)
    weight = torch.tensor([float(value) for value in weights]).reshape(-1, 1, 1)
    trimmed = torch.stack([trim_to_density(delta, options.density) for delta in _deltas(modules)])
    elected = torch.where((weight * trimmed).sum(dim=0) >= 0, 1.0, -1.0)
    agrees = (torch.sign(trimmed) == elected).to(torch.float32)
    agreeing_weight = (agrees * weight).sum(dim=0)
    disjoint_mean = (agrees * weight * trimmed).sum(dim=0) / agreeing_weight.where(agreeing_weight != 0, 1.0)
    merged = disjoint_mean * float(weight.sum())
    up, down = truncate_dense(merged, _target_rank(present, options))
    return _as_module(up, down, present[0][0])


def dare_masks(shape: tuple[int, ...], count: int, density: float, seed: int) -> torch.Tensor:
    """[count, *shape] keep-masks: expert i's is the i-th ``torch.rand`` draw of a generator seeded ``seed``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.rand(shape, generator=generator) < density for _ in range(count)])


def dare(modules: Sequence[LoraModule | None], weights: Sequence[float], options: MergeOptions) -> LoraModule:
    """DARE: random drop with rescale 1/density, then Σ w_i·ΔW_i; re-factored to rank k (seeded)."""
    import torch

    present = _present(modules, weights)
    deltas = _deltas(modules)
    keep = dare_masks(tuple(deltas.shape[1:]), len(modules), options.density, options.seed)
    weight = torch.tensor([float(value) for value in weights]).reshape(-1, 1, 1)
    merged = (weight * deltas * keep / options.density).sum(dim=0)
    up, down = truncate_dense(merged, _target_rank(present, options))
    return _as_module(up, down, present[0][0])


METHODS: dict[str, MergeFunction] = {
    "mean_ab": mean_ab,
    "linear": linear,
    "svd": svd,
    "ties": ties,
    "dare": dare,
}
# Methods that re-factor to a chosen rank, and the settings each one reads.
RANKED_METHODS = ("svd", "ties", "dare")
DENSITY_METHODS = ("ties", "dare")
SEEDED_METHODS = ("dare",)

"""Each merge method against its definition, on small random layers (dense references written out plainly)."""

from __future__ import annotations

import pytest
import torch
from lora_factories import best_rank_error, random_module, one_torch_thread  # noqa: F401 (fixture)

from comfyui_selma.trainer.lora.file import LoraModule
from comfyui_selma.trainer.merge.methods import (
    METHODS,
    MergeOptions,
    dare,
    linear,
    mean_ab,
    module_seed,
    svd,
    ties,
)


WEIGHTS = [0.5, 0.3, -0.2]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _experts(kernel: tuple[int, ...] = (), ranks=(4, 6, 3), alphas=(4.0, 3.0, 12.0)) -> list[LoraModule]:
    return [random_module(24, 16, rank, seed, alpha, kernel)
            for seed, (rank, alpha) in enumerate(zip(ranks, alphas, strict=True))]


def _dense(module: LoraModule) -> torch.Tensor:
    """ΔW the long way: alpha / rank · up · down, flattened to [out, in·kh·kw]."""
    return module.alpha / module.down.shape[0] * module.up.reshape(module.up.shape[0], -1) @ \
        module.down.reshape(module.down.shape[0], -1)


def _weighted_sum(experts, weights) -> torch.Tensor:
    return sum(weight * _dense(expert) for expert, weight in zip(experts, weights, strict=True) if expert is not None)


def test_registry_names_every_method():
    assert list(METHODS) == ["mean_ab", "linear", "svd", "ties", "dare"]


@pytest.mark.parametrize("kernel", [(), (3, 3)])
def test_linear_equals_the_weighted_sum_of_delta_weights(kernel):
    experts = _experts(kernel)
    merged = linear(experts, WEIGHTS, MergeOptions())
    assert merged.rank == 13 and merged.alpha == 13 and merged.down.shape[2:] == kernel
    torch.testing.assert_close(_dense(merged), _weighted_sum(experts, WEIGHTS), rtol=1e-5, atol=1e-7)


def test_a_missing_expert_counts_as_zero():
    experts = _experts()
    with_gap = [experts[0], None, experts[2]]
    torch.testing.assert_close(_dense(linear(with_gap, WEIGHTS, MergeOptions())),
                               WEIGHTS[0] * _dense(experts[0]) + WEIGHTS[2] * _dense(experts[2]))


def test_mean_ab_averages_the_down_and_the_up_matrices_separately():
    experts = _experts(ranks=(4, 4, 4), alphas=(8.0, 8.0, 8.0))
    weights = [1 / 3] * 3
    merged = mean_ab(experts, weights, MergeOptions())
    down = sum(expert.down for expert in experts) / 3
    up = sum(expert.up for expert in experts) / 3
    torch.testing.assert_close(_dense(merged), 8.0 / 4 * up @ down)
    assert not torch.allclose(_dense(merged), _weighted_sum(experts, weights), atol=1e-4), \
        "mean_ab should differ from the weighted sum of ΔW (it adds cross terms)"


def test_mean_ab_refuses_experts_of_different_ranks():
    with pytest.raises(ValueError, match=r"mean_ab needs equal ranks; the experts have ranks \[3, 4, 6\]"):
        mean_ab(_experts(), WEIGHTS, MergeOptions())


@pytest.mark.parametrize("kernel", [(), (3, 3)])
def test_svd_at_full_total_rank_equals_linear(kernel):
    experts = _experts(kernel)
    merged = svd(experts, WEIGHTS, MergeOptions(rank=13))
    torch.testing.assert_close(_dense(merged), _dense(linear(experts, WEIGHTS, MergeOptions())), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (40, 40), (10, 24), (24, 12)])  # the last two: R >= out or in
@pytest.mark.parametrize("rank", [1, 5, 9])
def test_svd_at_lower_rank_is_the_best_approximation(shape, rank):
    experts = [random_module(*shape, rank=r, seed=seed) for seed, r in enumerate((4, 6, 3))]
    merged = svd(experts, WEIGHTS, MergeOptions(rank=rank))
    target = _weighted_sum(experts, WEIGHTS)
    assert merged.rank == rank
    error = float((target - _dense(merged)).norm())
    assert error == pytest.approx(best_rank_error(target, rank), rel=1e-4, abs=1e-7)


def test_svd_rank_defaults_to_the_largest_expert_rank():
    assert svd(_experts(), WEIGHTS, MergeOptions()).rank == 6


def _ties_reference(experts, weights, density):
    """TIES written out entry by entry: trim each ΔW to its top-k magnitudes, elect the sign of the weighted
    sum, average the agreeing weighted entries, scale by the sum of the weights."""
    deltas = [_dense(expert) for expert in experts]
    trimmed = []
    for delta in deltas:
        keep = int(density * delta.numel())
        threshold = delta.abs().flatten().sort(descending=True).values[keep - 1]
        trimmed.append(torch.where(delta.abs() >= threshold, delta, 0.0))
    merged = torch.zeros_like(deltas[0])
    for row in range(merged.shape[0]):
        for column in range(merged.shape[1]):
            values = [t[row, column].item() for t in trimmed]
            sign = 1.0 if sum(w * v for w, v in zip(weights, values, strict=True)) >= 0 else -1.0
            agreeing = [(w, v) for w, v in zip(weights, values, strict=True) if v != 0 and (v > 0) == (sign > 0)]
            if agreeing:
                merged[row, column] = sum(w * v for w, v in agreeing) / sum(w for w, _ in agreeing) * sum(weights)
    return merged


def test_ties_matches_a_dense_reference():
    experts = [random_module(12, 10, rank, seed) for seed, rank in enumerate((3, 4, 2))]
    weights = [0.5, 0.3, 0.2]
    merged = ties(experts, weights, MergeOptions(rank=10, density=0.3))
    torch.testing.assert_close(_dense(merged), _ties_reference(experts, weights, 0.3), rtol=1e-4, atol=1e-6)


def test_ties_without_trimming_or_sign_conflicts_equals_linear():
    base = random_module(12, 10, 3, 0)
    experts = [LoraModule(base.down * factor, base.up, base.alpha) for factor in (1.0, 2.0, 0.5)]
    weights = [0.2, 0.5, 0.3]
    torch.testing.assert_close(_dense(ties(experts, weights, MergeOptions(rank=10, density=1.0))),
                               _weighted_sum(experts, weights), rtol=1e-4, atol=1e-6)


def test_dare_matches_a_dense_reference():
    experts = [random_module(12, 10, rank, seed) for seed, rank in enumerate((3, 4, 2))]
    options = MergeOptions(rank=10, density=0.4, seed=module_seed(7, "lora_unet_x"))
    generator = torch.Generator().manual_seed(options.seed)
    reference = torch.zeros(12, 10)
    for expert, weight in zip(experts, WEIGHTS, strict=True):
        keep = torch.rand(12, 10, generator=generator) < 0.4
        reference += weight * torch.where(keep, _dense(expert) / 0.4, 0.0)
    torch.testing.assert_close(_dense(dare(experts, WEIGHTS, options)), reference, rtol=1e-4, atol=1e-6)


def test_dare_is_reproducible_by_seed_and_changes_with_it():
    experts = _experts()
    first = _dense(dare(experts, WEIGHTS, MergeOptions(density=0.5, seed=3)))
    assert torch.equal(first, _dense(dare(experts, WEIGHTS, MergeOptions(density=0.5, seed=3))))
    assert not torch.allclose(first, _dense(dare(experts, WEIGHTS, MergeOptions(density=0.5, seed=4))))

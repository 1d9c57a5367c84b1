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
  factors without forming ΔW: cost O((out+in)·R² + R³) for total rank R, see :func:`truncate_product`.
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

from .lora_file import LoraModule

if TYPE_CHECKING:
    import numpy as np
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


def _balanced(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank-1 term so its up column and down row have equal norms (safe in float16).

    In place: callers pass factors they just computed, and a merge of 560 layers then allocates no copies.
    """
    import torch

    ratio = torch.sqrt(down.norm(dim=1) / up.norm(dim=0).clamp_min(1e-30)).clamp_min(1e-30)
    zero = (down.norm(dim=1) == 0) | (up.norm(dim=0) == 0)
    ratio = torch.where(zero, torch.ones_like(ratio), ratio)
    return up.mul_(ratio), down.div_(ratio[:, None])


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


# truncate_product's Cholesky route gives new_up = up·T⁻¹·V_k, orthonormal when T is exact. Rounding in the
# float32 Gram upᵀ·up (it grows like cond(up)²) shows as a departure of new_upᵀ·new_up from I, and the merge's
# error then exceeds the optimum by about that departure squared (measured: 1e-2 → 1e-5 relative, 4e-2 → 9e-4).
# Beyond √ε(float32) the Householder QR route is taken instead. Random factors depart by ~1e-6. The same bound
# decides whether inverse iteration's eigenvectors are kept (see _tridiagonal_top_eigenvectors).
_ORTHONORMAL_TOLERANCE = 3.5e-4


def _orthonormal(columns: torch.Tensor) -> bool:
    """Whether ``columnsᵀ·columns`` is the identity to :data:`_ORTHONORMAL_TOLERANCE`."""
    import torch

    gram = columns.T @ columns
    return bool((gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max() <= _ORTHONORMAL_TOLERANCE)


def _row_gram(matrix: torch.Tensor) -> np.ndarray:
    """``matrix @ matrix.T`` in the lower triangle of a Fortran-ordered array: BLAS syrk, half a product's work."""
    from scipy.linalg import blas

    array = matrix.numpy()
    if array.flags.f_contiguous:
        return blas.ssyrk(1.0, array, lower=1)
    return blas.ssyrk(1.0, array.T, trans=1, lower=1)


def _tridiagonal_top_eigenvectors(diagonal: np.ndarray, off_diagonal: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` leading eigenvectors (ascending order) of a symmetric tridiagonal matrix.

    All eigenvalues by root-free QR (sterf, O(n²)), then inverse iteration (stein) for the wanted ones
    only, with re-orthogonalisation inside clusters: at 640 x 640 with 128 wanted this takes about 60% of
    the MRRR algorithm's time (stemr on an index range bisects for its eigenvalues). One block is declared;
    inverse iteration is still correct where the matrix splits. Where either step reports a failure to
    converge, or the vectors come out non-finite (a zero matrix) or not orthonormal to √ε, MRRR computes
    them instead.
    """
    import numpy as np
    import torch
    from scipy.linalg import lapack

    size = diagonal.shape[0]
    values, failed = lapack.ssterf(diagonal, off_diagonal)  # ascending; inputs copied
    if not failed:
        one_block = np.ones(size, dtype=np.int32)
        block_ends = np.zeros(size, dtype=np.int32)
        block_ends[0] = size
        vectors, failed = lapack.sstein(diagonal, off_diagonal, values[size - count:], one_block, block_ends)
        if not failed and np.isfinite(vectors).all() and _orthonormal(torch.from_numpy(vectors)):
            return vectors
    found, _, vectors, failed = lapack.sstemr(diagonal, np.append(off_diagonal, np.float32(0)), 2, 0.0, 0.0,
                                              size - count + 1, size)
    if failed or found != count:
        raise RuntimeError(f"LAPACK found {found} of {count} tridiagonal eigenvectors (stemr info {failed})")
    return vectors[:, :count]


def _top_eigenvectors(gram: np.ndarray, count: int) -> torch.Tensor:
    """The ``count`` leading eigenvectors (largest first) of the symmetric matrix in ``gram``'s lower triangle.

    Householder reduction to tridiagonal form (sytrd, blocked), only the wanted eigenvectors of the
    tridiagonal matrix (:func:`_tridiagonal_top_eigenvectors`), and the reflectors applied to those alone
    (ormqr): a full eigensolver also computes and back-transforms all the others. When all are wanted,
    divide and conquer (torch's eigh) gives vectors closer to orthonormal, so a full-rank truncation
    reproduces its input to float32 precision. ``gram`` is overwritten.
    """
    import numpy as np
    import torch
    from scipy.linalg import lapack

    size = gram.shape[0]
    count = max(1, min(count, size))
    if count == size:
        return torch.linalg.eigh(torch.from_numpy(gram), UPLO="L").eigenvectors.flip(-1)
    optimal_work = int(lapack.ssytrd_lwork(size, lower=1)[0])
    reflectors, diagonal, off_diagonal, tau, failed = lapack.ssytrd(gram, lower=1, lwork=optimal_work,
                                                                    overwrite_a=1)
    if failed:
        raise RuntimeError(f"LAPACK sytrd failed (info {failed}) on a {size} x {size} Gram matrix")
    vectors = np.array(_tridiagonal_top_eigenvectors(diagonal, off_diagonal, count)[:, ::-1], order="F")
    # Q = H(1)·…·H(n-1), reflector i stored below the subdiagonal of column i: a QR's Q acting on rows 2..n.
    below, tail = reflectors[1:, : size - 1], vectors[1:]
    work = int(lapack.sormqr("L", "N", below, tau, tail, lwork=-1)[1][0])
    vectors[1:], _, failed = lapack.sormqr("L", "N", below, tau, tail, lwork=max(work, 1), overwrite_c=1)
    if failed:
        raise RuntimeError(f"LAPACK ormqr failed (info {failed})")
    return torch.from_numpy(vectors)


def _transposed_triangular_times(lower: np.ndarray, matrix: torch.Tensor) -> torch.Tensor:
    """``lower.T @ matrix`` for a lower-triangular ``lower`` (BLAS trmm: half a product's work)."""
    import torch
    from scipy.linalg import blas

    # trmm from the right on the transposes: (Lᵀ·M)ᵀ = Mᵀ·L, so a row-major M needs no copy.
    return torch.from_numpy(blas.strmm(1.0, lower, matrix.numpy().T, side=1, lower=1)).T


def truncate_product(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation of ΔW = ``up @ down`` as balanced factors, without an SVD of ΔW.

    With up [out, R] and down [R, in], orient so out ≥ in (the factorisation below reads the longer factor
    once and multiplies the shorter: (out + 2·in)·R² rather than (in + 2·out)·R²). If R ≥ out, ΔW has no
    cheaper description than itself: form it and truncate it (:func:`truncate_dense`). Otherwise take an
    upper-triangular T with
    TᵀT = upᵀ·up, so that Q = up·T⁻¹ is orthonormal and ΔW = Q·S with S = T·down [R, in]: the Cholesky
    factor of the R x R Gram (a syrk and an R³/3 factorisation), or where that factor is too coarse in
    float32 (Q·V_k comes out visibly non-orthonormal) or fails (rank-deficient up), the R factor of a
    Householder QR. The top ``rank`` eigenvectors V_k of S·Sᵀ (= Qᵀ·ΔW·ΔWᵀ·Q) mapped by Q are ΔW's
    top left singular vectors, so new_up = Q·V_k, new_down = V_kᵀ·S gives new_up @ new_down = P_k·ΔW,
    the truncated SVD (Eckart–Young). Cost O((out + in)·R² + R³) — the eigensolver only computes the k
    wanted vectors — against the O(out·in·min(out, in)) of a full SVD; nothing larger than ΔW's factors is
    formed. When ``rank`` ≥ R the projection is the identity on ΔW's column space: the result equals ΔW.
    """
    import torch
    from scipy.linalg import lapack

    if up.shape[0] < down.shape[1]:  # orient so out ≥ in: ΔWᵀ = downᵀ·upᵀ
        new_down_t, new_up_t = truncate_product(down.T, up.T, rank)
        return new_up_t.T, new_down_t.T
    if up.shape[1] >= up.shape[0]:
        return truncate_dense(up @ down, rank)
    lower, failed = lapack.spotrf(_row_gram(up.T), lower=1, clean=1, overwrite_a=1)  # T = lowerᵀ
    if not failed:
        core = _transposed_triangular_times(lower, down)
        top = _top_eigenvectors(_row_gram(core), rank)
        new_up = up @ torch.linalg.solve_triangular(torch.from_numpy(lower).T, top, upper=True)  # up·T⁻¹·V_k
        if _orthonormal(new_up):
            return _balanced(new_up, top.T @ core)
    reflectors, tau = torch.geqrf(up)  # Householder QR: Q is applied, never formed
    core = _transposed_triangular_times(reflectors[: up.shape[1]].triu().numpy().T, down)
    top = _top_eigenvectors(_row_gram(core), rank)
    padded = torch.cat([top, top.new_zeros(up.shape[0] - top.shape[0], top.shape[1])])
    return _balanced(torch.ormqr(reflectors, tau, padded), top.T @ core)  # Q·V_k


def truncate_dense(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of a dense [out, in] matrix, balanced.

    The top eigenvectors U_k of the Gram matrix ΔW·ΔWᵀ (of the shorter side) are ΔW's top left
    singular vectors; up = U_k, down = U_kᵀ·ΔW is the truncated SVD. A syrk and a symmetric eigensolver
    that computes only the k wanted vectors cost a fraction of a full SVD, and at full rank the
    projection is exact.
    """
    if delta.shape[0] > delta.shape[1]:
        up_t, down_t = truncate_dense(delta.T, rank)
        return down_t.T, up_t.T
    top = _top_eigenvectors(_row_gram(delta), rank)
    return _balanced(top, top.T @ delta)


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

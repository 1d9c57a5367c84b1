"""Best low-rank approximations (truncated SVDs) of factored and dense matrices, without a full SVD.

The ``svd``, ``ties`` and ``dare`` merges end here: :func:`truncate_product` re-factors ΔW = up·down
from its factors, :func:`truncate_dense` a ΔW that had to be formed. Both reduce to the leading
eigenvectors of a small Gram matrix (:func:`top_eigenvectors`).

All the arithmetic runs in scipy's BLAS and LAPACK on numpy views of the tensors: torch takes no part
between the first and the last call. Two threaded runtimes in one loop (torch's OpenMP, scipy's
OpenBLAS) spin-wait on each other's cores; on the 2-core machine a 1280 x 1280 layer took 57 ms at
2 + 2 threads with torch products in the loop and 47 ms on one thread. Float32 throughout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

# truncate_product's Cholesky route gives new_up = up·T⁻¹·V_k, orthonormal when T is exact. Rounding in the
# float32 Gram upᵀ·up (it grows like cond(up)²) shows as a departure of new_upᵀ·new_up from I, and the merge's
# error then exceeds the optimum by about that departure squared (measured: 1e-2 → 1e-5 relative, 4e-2 → 9e-4).
# Beyond √ε(float32) the Householder QR route is taken instead. Random factors depart by ~1e-6. The same bound
# decides whether inverse iteration's eigenvectors are kept (see _tridiagonal_top_eigenvectors).
_ORTHONORMAL_TOLERANCE = 3.5e-4


def _product(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``left @ right`` by BLAS sgemm; a row-major operand is passed as its transpose, not copied."""
    from scipy.linalg import blas

    left_operand, transpose_left = (left, 0) if left.flags.f_contiguous else (left.T, 1)
    right_operand, transpose_right = (right, 0) if right.flags.f_contiguous else (right.T, 1)
    return blas.sgemm(1.0, left_operand, right_operand, trans_a=transpose_left, trans_b=transpose_right)


def _row_gram(matrix: np.ndarray) -> np.ndarray:
    """``matrix @ matrix.T`` in the lower triangle of a Fortran-ordered array: BLAS syrk, half a product's work."""
    from scipy.linalg import blas

    if matrix.flags.f_contiguous:
        return blas.ssyrk(1.0, matrix, lower=1)
    return blas.ssyrk(1.0, matrix.T, trans=1, lower=1)


def _orthonormal(columns: np.ndarray) -> bool:
    """Whether ``columnsᵀ·columns`` is the identity to :data:`_ORTHONORMAL_TOLERANCE`."""
    import numpy as np

    gram = _row_gram(columns.T)  # lower triangle; the upper one is zero
    np.fill_diagonal(gram, gram.diagonal() - 1)
    return bool(np.abs(np.tril(gram)).max(initial=0.0) <= _ORTHONORMAL_TOLERANCE)


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
    from scipy.linalg import lapack

    size = diagonal.shape[0]
    values, failed = lapack.ssterf(diagonal, off_diagonal)  # ascending; inputs copied
    if not failed:
        one_block = np.ones(size, dtype=np.int32)
        block_ends = np.zeros(size, dtype=np.int32)
        block_ends[0] = size
        vectors, failed = lapack.sstein(diagonal, off_diagonal, values[size - count:], one_block, block_ends)
        if not failed and np.isfinite(vectors).all() and _orthonormal(vectors):
            return vectors
    found, _, vectors, failed = lapack.sstemr(diagonal, np.append(off_diagonal, np.float32(0)), 2, 0.0, 0.0,
                                              size - count + 1, size)
    if failed or found != count:
        raise RuntimeError(f"LAPACK found {found} of {count} tridiagonal eigenvectors (stemr info {failed})")
    return vectors[:, :count]


def top_eigenvectors(gram: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` leading eigenvectors (largest first) of the symmetric matrix in ``gram``'s lower triangle.

    Householder reduction to tridiagonal form (sytrd, blocked), only the wanted eigenvectors of the
    tridiagonal matrix (:func:`_tridiagonal_top_eigenvectors`), and the reflectors applied to those alone
    (ormqr): a full eigensolver also computes and back-transforms all the others. When all are wanted,
    divide and conquer (syevd) gives vectors closer to orthonormal, so a full-rank truncation reproduces
    its input to float32 precision. ``gram`` (Fortran-ordered float32) is overwritten.
    """
    import numpy as np
    import scipy.linalg
    from scipy.linalg import lapack

    size = gram.shape[0]
    count = max(1, min(count, size))
    if count == size:
        _, vectors = scipy.linalg.eigh(gram, lower=True, driver="evd", overwrite_a=True, check_finite=False)
        return np.array(vectors[:, ::-1], order="F")
    optimal_work = int(lapack.ssytrd_lwork(size, lower=1)[0])
    reflectors, diagonal, off_diagonal, tau, failed = lapack.ssytrd(gram, lower=1, lwork=optimal_work,
                                                                    overwrite_a=1)
    if failed:
        raise RuntimeError(f"LAPACK sytrd failed (info {failed}) on a {size} x {size} Gram matrix")
    vectors = np.array(_tridiagonal_top_eigenvectors(diagonal, off_diagonal, count)[:, ::-1], order="F")
    # Q = H(1)·…·H(n-1), reflector i stored below the subdiagonal of column i: a QR's Q acting on rows 2..n.
    vectors[1:] = _apply_householder(reflectors[1:, : size - 1], tau, vectors[1:])
    return vectors


def _apply_householder(reflectors: np.ndarray, tau: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Q·``matrix`` for the Q whose Householder reflectors LAPACK stored in ``reflectors`` (ormqr)."""
    from scipy.linalg import lapack

    work = int(lapack.sormqr("L", "N", reflectors, tau, matrix, lwork=-1)[1][0])
    product, _, failed = lapack.sormqr("L", "N", reflectors, tau, matrix, lwork=max(work, 1))
    if failed:
        raise RuntimeError(f"LAPACK ormqr failed (info {failed})")
    return product


def _transposed_triangular_times(lower: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``lower.T @ matrix`` for a lower-triangular ``lower`` (BLAS trmm: half a product's work)."""
    from scipy.linalg import blas

    # trmm from the right on the transposes: (Lᵀ·M)ᵀ = Mᵀ·L, so a row-major M needs no copy.
    return blas.strmm(1.0, lower, matrix.T, side=1, lower=1).T


def _balanced(up: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rescale each rank-1 term so its up column and down row have equal norms (safe in float16), in place."""
    import numpy as np

    up_norms, down_norms = np.linalg.norm(up, axis=0), np.linalg.norm(down, axis=1)
    ratio = np.sqrt(down_norms / np.maximum(up_norms, 1e-30)).clip(min=1e-30).astype(np.float32)
    ratio[(up_norms == 0) | (down_norms == 0)] = 1.0
    up *= ratio
    down /= ratio[:, None]
    return up, down


def _factored(up: np.ndarray, down: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`truncate_product` on float32 arrays."""
    import numpy as np
    from scipy.linalg import blas, lapack

    if up.shape[0] < down.shape[1]:  # orient so out ≥ in: ΔWᵀ = downᵀ·upᵀ
        new_down_t, new_up_t = _factored(down.T, up.T, rank)
        return new_up_t.T, new_down_t.T
    if up.shape[1] >= up.shape[0]:
        return _dense(_product(up, down), rank)
    lower, failed = lapack.spotrf(_row_gram(up.T), lower=1, clean=1, overwrite_a=1)  # T = lowerᵀ
    if not failed:
        core = _transposed_triangular_times(lower, down)
        top = top_eigenvectors(_row_gram(core), rank)
        new_up = _product(up, blas.strsm(1.0, lower, top, lower=1, trans_a=1))  # up·T⁻¹·V_k
        if _orthonormal(new_up):
            return _balanced(new_up, _product(top.T, core))
    reflectors, tau, _, failed = lapack.sgeqrf(up)  # Householder QR: Q is applied, never formed
    if failed:
        raise RuntimeError(f"LAPACK geqrf failed (info {failed})")
    factor_rank = up.shape[1]
    core = _transposed_triangular_times(np.triu(reflectors[:factor_rank]).T, down)
    top = top_eigenvectors(_row_gram(core), rank)
    padded = np.zeros((up.shape[0], top.shape[1]), dtype=np.float32, order="F")
    padded[:factor_rank] = top
    return _balanced(_apply_householder(reflectors, tau, padded), _product(top.T, core))  # Q·V_k


def _dense(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`truncate_dense` on a float32 array."""
    if delta.shape[0] > delta.shape[1]:
        up_t, down_t = _dense(delta.T, rank)
        return down_t.T, up_t.T
    top = top_eigenvectors(_row_gram(delta), rank)
    return _balanced(top, _product(top.T, delta))


def _as_array(matrix: torch.Tensor) -> np.ndarray:
    """A float32 numpy view (or copy) of ``matrix``, which may live on any device and in any float dtype."""
    import torch

    return matrix.detach().to("cpu", torch.float32).numpy()


def truncate_product(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation of ΔW = ``up @ down`` as balanced factors, without an SVD of ΔW.

    With up [out, R] and down [R, in], orient so out ≥ in (the factorisation below reads the longer factor
    once and multiplies the shorter: (out + 2·in)·R² rather than (in + 2·out)·R²). If R ≥ out, ΔW has no
    cheaper description than itself: form it and truncate it (:func:`truncate_dense`). Otherwise take an
    upper-triangular T with TᵀT = upᵀ·up, so that Q = up·T⁻¹ is orthonormal and ΔW = Q·S with
    S = T·down [R, in]: the Cholesky factor of the R x R Gram (a syrk and an R³/3 factorisation), or where
    that factor is too coarse in float32 (Q·V_k comes out visibly non-orthonormal) or fails (rank-deficient
    up), the R factor of a Householder QR. The top ``rank`` eigenvectors V_k of S·Sᵀ (= Qᵀ·ΔW·ΔWᵀ·Q)
    mapped by Q are ΔW's top left singular vectors, so new_up = Q·V_k, new_down = V_kᵀ·S gives
    new_up @ new_down = P_k·ΔW, the truncated SVD (Eckart–Young). Cost O((out + in)·R² + R³) — the
    eigensolver only computes the k wanted vectors — against the O(out·in·min(out, in)) of a full SVD;
    nothing larger than ΔW's factors is formed. When ``rank`` ≥ R the projection is the identity on ΔW's
    column space: the result equals ΔW. Float32 CPU factors out, whatever the inputs' dtype and device.
    """
    import torch

    new_up, new_down = _factored(_as_array(up), _as_array(down), rank)
    return torch.from_numpy(new_up), torch.from_numpy(new_down)


def truncate_dense(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of a dense [out, in] matrix, balanced.

    The top eigenvectors U_k of the Gram matrix ΔW·ΔWᵀ (of the shorter side) are ΔW's top left
    singular vectors; up = U_k, down = U_kᵀ·ΔW is the truncated SVD. A syrk and a symmetric eigensolver
    that computes only the k wanted vectors cost a fraction of a full SVD, and at full rank the
    projection is exact.
    """
    import torch

    new_up, new_down = _dense(_as_array(delta), rank)
    return torch.from_numpy(new_up), torch.from_numpy(new_down)

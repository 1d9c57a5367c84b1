"""The truncated SVD every re-factoring merge ends in: best low-rank factors, orthonormal eigenvectors."""

from __future__ import annotations

import pytest
import torch
from lora_factories import best_rank_error, one_torch_thread  # noqa: F401 (fixture)
from scipy.linalg import lapack

from comfyui_selma.trainer.merge.low_rank import top_eigenvectors, truncate_dense, truncate_product

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_dense_truncation_is_the_best_approximation(shape):
    delta = torch.randn(*shape)
    for rank in (1, 7, 16):
        up, down = truncate_dense(delta, rank)
        assert float((delta - up @ down).norm()) == pytest.approx(best_rank_error(delta, rank), rel=1e-4,
                                                                 abs=1e-6 * float(delta.norm()))


def _symmetric_with_spectrum(values: torch.Tensor, seed: int) -> torch.Tensor:
    basis, _ = torch.linalg.qr(torch.randn(len(values), len(values), dtype=torch.float64,
                                           generator=torch.Generator().manual_seed(seed)))
    return (basis * values) @ basis.T


SPECTRA = {
    "random": torch.rand(60, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
    "leading cluster": torch.cat([torch.full((12,), 3.0, dtype=torch.float64), torch.linspace(0, 1, 48,
                                                                                            dtype=torch.float64)]),
    "rank deficient": torch.cat([torch.linspace(1, 2, 5, dtype=torch.float64), torch.zeros(55, dtype=torch.float64)]),
}


@pytest.mark.parametrize("spectrum", SPECTRA, ids=list(SPECTRA))
@pytest.mark.parametrize("count", [1, 9, 20])
def test_top_eigenvectors_are_orthonormal_and_span_the_leading_eigenspace(spectrum, count):
    """Clusters that straddle the cut and wanted eigenvalues that are all zero included."""
    values = SPECTRA[spectrum]
    matrix = _symmetric_with_spectrum(values, seed=count)
    vectors = torch.from_numpy(top_eigenvectors(matrix.float().numpy().copy(order="F"), count)).double()
    assert vectors.shape == (60, count)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(count, dtype=torch.float64), rtol=0, atol=1e-4)
    leading = torch.sort(values, descending=True).values[:count]
    torch.testing.assert_close(torch.diag(vectors.T @ matrix @ vectors), leading, rtol=0, atol=1e-5)
    # What the leading space holds, the vectors hold: nothing of it is left in the residual.
    residual = matrix @ vectors - vectors @ (vectors.T @ matrix @ vectors)
    assert float(residual.norm()) <= 1e-4 * float(values.abs().max())


def test_top_eigenvectors_of_a_matrix_that_splits_into_blocks():
    """A block-diagonal matrix tridiagonalises with zero off-diagonals; equal eigenvalues sit in different blocks."""
    block = _symmetric_with_spectrum(torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64), seed=3)
    matrix = torch.block_diag(block, block, torch.diag(torch.tensor([3.0, 0.1], dtype=torch.float64)))
    vectors = torch.from_numpy(top_eigenvectors(matrix.float().numpy().copy(order="F"), 5)).double()
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.diag(vectors.T @ matrix @ vectors),
                               torch.tensor([4.0, 4.0, 3.0, 2.0, 2.0], dtype=torch.float64), rtol=0, atol=1e-5)


def test_top_eigenvectors_of_zero_are_still_orthonormal():
    vectors = torch.from_numpy(top_eigenvectors(torch.zeros(8, 8).numpy().copy(order="F"), 3))
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(3), rtol=0, atol=1e-6)


def test_truncation_survives_rank_deficient_and_zero_factors():
    up = torch.randn(30, 8)
    up[:, 4:] = up[:, :4]  # repeated columns: rank 4 of 8
    down = torch.randn(8, 20)
    down[6:] = 0
    new_up, new_down = truncate_product(up, down, 8)
    torch.testing.assert_close(new_up @ new_down, up @ down, rtol=1e-4, atol=1e-5)
    zero_up, zero_down = truncate_product(torch.zeros(10, 3), torch.zeros(3, 7), 2)
    assert torch.count_nonzero(zero_up @ zero_down) == 0


@pytest.mark.parametrize("decades", [1, 3, 6])
def test_truncation_of_ill_conditioned_factors_is_still_the_best_approximation(decades, monkeypatch):
    """up's singular values spread over ``decades`` decades: mild ones take the Cholesky route, the worst the QR."""
    generator = torch.Generator().manual_seed(decades)
    left, _ = torch.linalg.qr(torch.randn(300, 40, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(40, 40, generator=generator, dtype=torch.float64))
    up = ((left * torch.logspace(0, -decades, 40, dtype=torch.float64)) @ right.T).float()  # the longer factor
    down = torch.randn(40, 200, generator=generator)
    householder_qr, geqrf = [], lapack.sgeqrf
    monkeypatch.setattr(lapack, "sgeqrf", lambda *args: householder_qr.append(args) or geqrf(*args))
    new_up, new_down = truncate_product(up, down, 10)
    assert bool(householder_qr) == (decades == 6)
    target = up.double() @ down.double()
    error = float((target - (new_up @ new_down).double()).norm())
    assert error == pytest.approx(best_rank_error(target, 10), rel=1e-5)


@pytest.mark.parametrize("decades", [2, 3, 3.5])
def test_truncation_is_the_best_approximation_where_down_leans_on_up_weak_directions(decades):
    """ΔW's leading directions lie where up is weakest and down makes up for it: the float32 Gram upᵀ·up is
    still positive definite, but its Cholesky factor is too coarse exactly in the directions that count."""
    generator = torch.Generator().manual_seed(7)
    left, _ = torch.linalg.qr(torch.randn(300, 40, generator=generator, dtype=torch.float64))
    mixing, _ = torch.linalg.qr(torch.randn(40, 40, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(200, 40, generator=generator, dtype=torch.float64))
    strength = torch.logspace(0, -decades, 40, dtype=torch.float64)
    singular = torch.linspace(1.0, 0.5, 40, dtype=torch.float64)[torch.randperm(40, generator=generator)]
    up = ((left * strength) @ mixing.T).float()
    down = ((mixing * (singular / strength)) @ right.T).float()
    new_up, new_down = truncate_product(up, down, 8)
    target = up.double() @ down.double()
    error = float((target - (new_up @ new_down).double()).norm())
    assert error == pytest.approx(best_rank_error(target, 8), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_factors_of_any_float_dtype_come_out_float32_and_best(dtype):
    up, down = torch.randn(40, 12).to(dtype), torch.randn(12, 30).to(dtype)
    new_up, new_down = truncate_product(up, down, 5)
    assert new_up.dtype == new_down.dtype == torch.float32
    delta = up.float() @ down.float()
    assert float((delta - new_up @ new_down).norm()) == pytest.approx(best_rank_error(delta, 5), rel=1e-4)

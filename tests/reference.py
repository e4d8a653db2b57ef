"""THE dense float64 reference, tolerances and random pruned-weight generators for all tests.

Every backend (cpp, cuda, numba, numba_cuda, torch) is checked against :func:`dense_reference`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: The CPU kernels' ISA builds, lowest first (their positions are sparsekit._C's ISA codes).
ISA_ORDER = ("generic", "avx2", "avx512")


def isas_up_to(hardware: str) -> list[str]:
    """The ISA builds a machine runs: every one up to ``hardware`` (what
    ``sparsekit._C.build_info()["isa_hardware"]`` reports)."""
    return list(ISA_ORDER[: ISA_ORDER.index(hardware) + 1])


def kernel_array(t: torch.Tensor) -> np.ndarray:
    """``t`` as the bindings take it: bf16 as its uint16 bits (numpy has no bfloat16), any other
    dtype as it is."""
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


#: unit roundoff of each dtype that can enter a product (values, x or output)
_EPS = {
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}


def dense_reference(x: torch.Tensor, w_dense: torch.Tensor,
                    bias: torch.Tensor | None = None, activation: str | None = None
                    ) -> torch.Tensor:
    """``act(x @ w_dense.T + bias)`` in float64 on CPU (inputs are upcast exactly).

    Parameters
    ----------
    x : (..., K) tensor, any float dtype
    w_dense : (M, K) tensor (use ``mat.to_dense()`` so the reference sees the stored values)
    bias : (M,) tensor or None
    activation : None or "relu" (torch.relu: NaN stays NaN)
    """
    xd = x.detach().cpu().to(torch.float64)
    y = xd @ w_dense.detach().cpu().to(torch.float64).T
    if bias is not None:
        y = y + bias.detach().cpu().to(torch.float64)
    if activation is not None:
        assert activation == "relu", activation
        y = torch.relu(y)
    return y


def tolerance(x: torch.Tensor, w_dense: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype, ref: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output absolute error bound for an fp32-accumulated sparse linear.

    Inputs are exact in the reference (it sees the stored values and the same x), so the only
    errors are fp32 accumulation (bounded by ~sqrt(K) * eps32 * sum|x_k w_k| for random
    rounding, with a safety factor) and the final rounding to ``out_dtype`` (eps_out * |y|).
    Returned per element, shape like the output. ``ref`` (the float64 reference) is
    recomputed when not given.
    """
    xd = x.detach().cpu().to(torch.float64).abs()
    wd = w_dense.detach().cpu().to(torch.float64).abs()
    mag = xd @ wd.T  # sum_k |x_k w_k| per output
    if bias is not None:
        mag = mag + bias.detach().cpu().to(torch.float64).abs()
    K = w_dense.shape[1]
    acc = 8.0 * math.sqrt(K) * _EPS[torch.float32] * mag
    yabs = (dense_reference(x, w_dense, bias) if ref is None else ref).abs()
    rnd = 2.0 * _EPS.get(out_dtype, _EPS[torch.float32]) * (yabs + acc)
    return acc + rnd + 1e-30


def assert_close_to_reference(y: torch.Tensor, x: torch.Tensor, w_dense: torch.Tensor,
                              bias: torch.Tensor | None = None, *, msg: str = "",
                              activation: str | None = None) -> None:
    """Assert ``y`` matches the float64 reference within :func:`tolerance` (and has x's dtype
    and the right shape); with ``activation``, ``act`` of it (the bound of the plain product
    holds: relu is 1-Lipschitz)."""
    ref = dense_reference(x, w_dense, bias, activation)
    assert tuple(y.shape) == tuple(ref.shape), (
        f"{msg}: shape {tuple(y.shape)} != {tuple(ref.shape)}"
    )
    if ref.numel() == 0:
        return
    tol = tolerance(x, w_dense, bias, y.dtype, ref)
    err = (y.detach().cpu().to(torch.float64) - ref).abs()
    bad = err > tol
    if bool(bad.any()):
        i = int(torch.nonzero(bad.reshape(-1))[0])
        raise AssertionError(
            f"{msg}: {int(bad.sum())} of {err.numel()} outputs off; first at flat index {i}: "
            f"got {float(y.reshape(-1)[i])}, expected {float(ref.reshape(-1)[i])}, "
            f"|err| {float(err.reshape(-1)[i]):.3g} > tol {float(tol.reshape(-1)[i]):.3g}"
        )


# --------------------------------------------------------------------------- generators
def random_pruned(m: int, k: int, sparsity: float, *, seed: int, dtype=torch.float32,
                  empty_rows: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Random (m, k) weight with ~``sparsity`` fraction of exact zeros.

    ``sparsity`` 0.0 gives a fully dense weight, 1.0 gives nnz = 0. ``empty_rows`` forces that
    many (randomly chosen) rows to be all zero. Nonzeros are N(0, scale^2), never exactly zero.
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g, dtype=torch.float64) * scale
    w = torch.where(w == 0, torch.full_like(w, 0.5), w)
    if sparsity >= 1.0:
        w.zero_()
    elif sparsity > 0.0:
        keep = torch.rand(m, k, generator=g, dtype=torch.float64) >= sparsity
        w = w * keep
    if empty_rows:
        rows = torch.randperm(m, generator=g)[: min(empty_rows, m)]
        w[rows] = 0
    return w.to(dtype)


def random_block_pruned(m: int, k: int, blocksize: tuple[int, int], block_sparsity: float, *,
                        seed: int, dtype=torch.float32, inner_sparsity: float = 0.0
                        ) -> torch.Tensor:
    """Random weight whose nonzeros cluster in ``blocksize`` blocks (ragged edges allowed):
    ~``block_sparsity`` of blocks are zero, and ``inner_sparsity`` of entries inside kept
    blocks are zero too."""
    r, c = blocksize
    mb, kb = -(-m // r), -(-k // c)
    g = torch.Generator().manual_seed(seed)
    bmask = torch.rand(mb, kb, generator=g, dtype=torch.float64) >= block_sparsity
    mask = bmask.repeat_interleave(r, 0).repeat_interleave(c, 1)[:m, :k]
    w = random_pruned(m, k, inner_sparsity, seed=seed + 1, dtype=torch.float64)
    return (w * mask).to(dtype)


def random_x(shape: tuple[int, ...], *, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Seeded N(0, 1) activations."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def np_rng(seed: int) -> np.random.Generator:
    """Seeded numpy generator (for numpy-input tests)."""
    return np.random.default_rng(seed)

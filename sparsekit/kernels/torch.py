"""The "torch" backend: pure-PyTorch reference kernels, usable on any device torch supports.

It converts the weight once to a torch sparse CSR tensor with fp32 values and int32/int64
indices (cached on the matrix; BSR is expanded to CSR, ragged padding excluded) and runs
``torch.sparse.mm`` in fp32. It is the fallback of last resort (correct everywhere, slower, and
the cached copy costs about 2x the packed weight's memory); tests do not use it as their
reference (tests/reference.py has the float64 dense reference).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..formats import BSRMatrix, CSRMatrix


def _csr_f32(mat: Any) -> torch.Tensor:
    def build() -> torch.Tensor:
        m = mat.decoded()
        if isinstance(m, BSRMatrix):
            m = CSRMatrix.from_dense(m.to_dense())
        it = torch.int32 if m.nnz < 2**31 else torch.int64
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*support is in beta state.*")
            return torch.sparse_csr_tensor(
                m.indptr.to(it), m.indices.to(it), m.values.float(), size=m.shape,
                check_invariants=False,
            )

    return mat.cached(("torch_ref", "csr_f32", str(mat.device)), build)


class TorchReferenceBackend:
    """Reference backend object (see module docstring)."""

    name = "torch"

    def available(self) -> bool:
        """Always True."""
        return True

    def describe(self) -> str:
        """Short description."""
        return f"reference (torch {torch.__version__} sparse CSR, fp32)"

    def supports(self, mat: Any, x: torch.Tensor) -> bool:
        """Any device where weight and x live together; x fp32 or the weight's dtype."""
        return x.device == mat.device and (x.dtype == torch.float32 or x.dtype == mat.dtype)

    def linear(self, mat: Any, x2d: torch.Tensor, bias: torch.Tensor | None,
               out: torch.Tensor) -> None:
        """out = x2d @ W.T + bias; shapes as in the registry contract. O(nnz * N)."""
        if x2d.shape[0] == 0:
            return
        w = _csr_f32(mat)
        xT = x2d.t().to(torch.float32)
        y = torch.sparse.mm(w, xT).t()  # (N, M)
        if bias is not None:
            y = y + bias
        out.copy_(y)


backend = TorchReferenceBackend()

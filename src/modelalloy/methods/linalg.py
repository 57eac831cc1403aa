"""Linear algebra shared by the matrix methods."""

from __future__ import annotations

import torch
from torch import Tensor


def solve_psd(a: Tensor, b: Tensor, fallback: Tensor) -> Tensor:
    """x with a x = b for a symmetric positive semi-definite `a` ([n, n]); b, fallback [n, k].

    Cholesky when `a` is positive definite. Otherwise a is singular: x is determined only on
    a's range (no data came from the other input directions), so there x is the pseudo-inverse
    solution and on the null space x takes `fallback`'s component.
    """
    tolerance = a.shape[0] * torch.finfo(a.dtype).eps
    factor, info = torch.linalg.cholesky_ex(a)
    pivots = torch.diagonal(factor)
    # A singular matrix can slip through Cholesky with a tiny positive pivot made of rounding
    # error; a pivot ratio that small means a is singular to working precision.
    if int(info) == 0 and float((pivots.min() / pivots.max()) ** 2) > tolerance:  # .item(): a sync point on CUDA
        return torch.cholesky_solve(b, factor)
    eigenvalues, vectors = torch.linalg.eigh(a)
    keep = eigenvalues > eigenvalues.max() * tolerance
    v = vectors[:, keep]
    inside = v @ ((v.T @ b) / eigenvalues[keep].unsqueeze(1))
    return inside + fallback - v @ (v.T @ fallback)

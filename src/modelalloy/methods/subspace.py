"""Subspace and data-free merges of task vectors, per weight matrix (as in FusionBench).

Each works on one 2-D weight δ_i = θ_i − θ_0 at a time, through its singular vectors or through
the layer's implicit inputs, and returns θ_0 + (scale) · M. Tensors that are not a layer's weight
matrix (1-D norms and biases, embeddings, the LM head: ``layout: vector``, which `plan/` picks
from the architecture when ``layout`` is ``auto``) fall back to task arithmetic with weights
1/T: θ_0 + α · mean_i δ_i, which is what the papers' code does with them.

- `tsv`: Task Singular Vectors, TSV-M (Gargiulo et al., CVPR 2025, arXiv:2412.00081).
- `iso_c`, `iso_cts`: isotropic merging (Marczak et al., ICML 2025, arXiv:2502.04959).
- `wudi`: "Whoever Started the Interference Should End It" (Cheng et al., ICML 2025, arXiv:2503.08099).

Defaults are the papers' / FusionBench's: α = 1 (TSV-M, Iso-C, Iso-CTS), common space fraction
0.8 (Iso-CTS); WUDI has no scale. Shapes: δ_i is [m, n] (either orientation); r = min(m, n).
"""

from __future__ import annotations

import torch
from torch import Tensor

from modelalloy.methods.linalg import solve_psd
from modelalloy.methods.registry import Param, in_range, merge_method

LAYOUT = Param(
    "layout",
    default="auto",
    kind=str,
    choices=("auto", "out_in", "in_out", "vector"),
    doc="out_in / in_out: a linear layer's weight stored (out, in) as torch Linear or (in, out) as GPT-2's Conv1D; "
    "vector: not treated as a matrix, merged by the method's fallback (the mean of the models or task vectors); "
    "auto: from the architecture (1-D tensors, embeddings and the LM head are vectors)",
)
ALPHA = Param("alpha", default=1.0, doc="scales the merged task matrix (α; 1 as in TSV-M and FusionBench's defaults)")


def _mean_task_vector(tensors: list[Tensor], base: Tensor) -> Tensor:
    """(1/T) Σ δ_i, one task vector alive at a time."""
    out = torch.zeros_like(base)
    for t in tensors:
        out.add_(t).sub_(base)
    return out.div_(len(tensors))


def _is_matrix(base: Tensor, layout: str) -> bool:
    return layout != "vector" and base.dim() == 2 and min(base.shape) > 0


def _orthogonal_factor(x: Tensor) -> Tensor:
    """The nearest matrix with orthonormal columns (or rows, if wide): P Qᵀ from x = P Σ Qᵀ.

    This is the orthogonal Procrustes solution, which TSV-M and Iso-CTS use to decorrelate
    the concatenated singular vectors of different tasks.
    """
    p, _, qt = torch.linalg.svd(x, full_matrices=False)
    return p @ qt


@merge_method(
    "tsv",
    params=[ALPHA, LAYOUT],
    base="required",
    reference="https://arxiv.org/abs/2412.00081",
)
def tsv(tensors: list[Tensor], *, base: Tensor, alpha: float, layout: str) -> Tensor:
    """Task Singular Vectors merge (TSV-M, Gargiulo et al. 2025): per task keep the top r/T singular
    components, orthogonalise the concatenated singular vectors, reassemble; θ_0 + α·M.

    For each task, δ_i = U_i Σ_i V_iᵀ and k = ⌊r/T⌋ components are kept. U = [U_1[:, :k] … U_T[:, :k]]
    ([m, T·k]), Σ = diag(Σ_1[:k] … Σ_T[:k]), V likewise ([n, T·k]). U and V are replaced by their
    orthogonal factors U⊥, V⊥ (Procrustes), and M = U⊥ Σ V⊥ᵀ. When r < T no component fits:
    the tensor falls back to task arithmetic, like 1-D tensors.
    """
    t = len(tensors)
    if not _is_matrix(base, layout) or min(base.shape) // t == 0:
        return _mean_task_vector(tensors, base).mul_(alpha).add_(base)
    k = min(base.shape) // t
    us, ss, vhs = [], [], []
    for x in tensors:
        u, s, vh = torch.linalg.svd(x - base, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k, :])
    u_cat = _orthogonal_factor(torch.cat(us, dim=1))  # [m, T·k]
    vh_cat = _orthogonal_factor(torch.cat(vhs, dim=0))  # [T·k, n]
    merged = (u_cat * torch.cat(ss)) @ vh_cat
    return merged.mul_(alpha).add_(base)


@merge_method(
    "iso_c",
    params=[ALPHA, LAYOUT],
    base="required",
    reference="https://arxiv.org/abs/2502.04959",
)
def iso_c(tensors: list[Tensor], *, base: Tensor, alpha: float, layout: str) -> Tensor:
    """Isotropic merging in the common subspace (Iso-C, Marczak et al. 2025): the singular values of
    Σδ_i are all replaced by their mean; θ_0 + α · U diag(mean σ) Vᵀ.

    The paper picks α on held-out data; 1.0 is FusionBench's default.
    """
    if not _is_matrix(base, layout):
        return _mean_task_vector(tensors, base).mul_(alpha).add_(base)
    total = _mean_task_vector(tensors, base).mul_(len(tensors))  # Σ δ_i
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    merged = (u * s.mean()) @ vh
    return merged.mul_(alpha).add_(base)


def iso_cts_split(r: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(k common directions, s per task) with k + T·s = r.

    k starts at ⌊r·fraction⌋; the task-specific rest r − k is rounded (Python's round, as the
    reference implementation) to a multiple of T, never more than r.
    """
    k = int(r * common_space_fraction)
    per_task = min(round((r - k) / tasks), r // tasks)
    return r - per_task * tasks, per_task


@merge_method(
    "iso_cts",
    params=[
        ALPHA,
        Param("common_space_fraction", default=0.8, doc="share of the r directions taken from the common subspace of Σδ_i", check=in_range(0.0, 1.0, low_open=True)),
        LAYOUT,
    ],
    base="required",
    reference="https://arxiv.org/abs/2502.04959",
)
def iso_cts(tensors: list[Tensor], *, base: Tensor, alpha: float, common_space_fraction: float, layout: str) -> Tensor:
    """Isotropic merging in common and task-specific subspaces (Iso-CTS, Marczak et al. 2025): the top
    common directions of Σδ_i, the rest filled with each task's own directions orthogonal to them,
    orthogonalised, with an isotropic (mean) spectrum; θ_0 + α·M.

    With (k, s) = `iso_cts_split`: U_c, σ_c, V_c = the top k of SVD(Σδ_i). For each task the part
    outside the common left subspace, (I − U_c U_cᵀ) δ_i, gives its top s singular triplets.
    U = [U_1,s … U_T,s, U_c], V likewise, σ = their singular values; U⊥, V⊥ = orthogonal factors
    (Procrustes); M = mean(σ) · U⊥ V⊥ᵀ. With fraction 1 this is Iso-C.
    """
    if not _is_matrix(base, layout):
        return _mean_task_vector(tensors, base).mul_(alpha).add_(base)
    t = len(tensors)
    k, per_task = iso_cts_split(min(base.shape), t, common_space_fraction)
    total = _mean_task_vector(tensors, base).mul_(t)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    u_c, s_c, vh_c = u[:, :k], s[:k], vh[:k, :]
    del total, u, s, vh
    us, ss, vhs = [], [], []
    if per_task > 0:
        for x in tensors:
            delta = x - base
            specific = delta - u_c @ (u_c.T @ delta)  # remove the common left subspace
            u_i, s_i, vh_i = torch.linalg.svd(specific, full_matrices=False)
            us.append(u_i[:, :per_task])
            ss.append(s_i[:per_task])
            vhs.append(vh_i[:per_task, :])
    u_all = _orthogonal_factor(torch.cat([*us, u_c], dim=1))  # [m, r]
    vh_all = _orthogonal_factor(torch.cat([*vhs, vh_c], dim=0))  # [r, n]
    sigma = torch.cat([*ss, s_c]).mean()
    merged = (u_all * sigma) @ vh_all
    return merged.mul_(alpha).add_(base)


def _adam_steps(start: Tensor, deltas: list[Tensor], norms: list[float], iter_num: int, lr: float, out_in: bool) -> Tensor:
    """The paper's optimiser: Adam (β = 0.9, 0.999, eps 1e-8, no weight decay) on the WUDI loss."""
    tau = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([tau], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    with torch.enable_grad():
        for _ in range(iter_num):
            optimizer.zero_grad()
            loss = tau.new_zeros(())
            for d, norm in zip(deltas, norms):
                diff = tau - d
                inter = diff @ d.T if out_in else diff.T @ d  # [out, out]
                loss = loss + inter.square().sum() / norm
            loss.backward()
            optimizer.step()
    return tau.detach()


@merge_method(
    "wudi",
    params=[
        LAYOUT,
        Param("solver", default="closed_form", kind=str, choices=("closed_form", "adam"), doc="closed_form: the exact minimiser; adam: the paper's optimiser"),
        Param("iter_num", default=300, kind=int, doc="Adam steps (solver: adam; 300 in the paper's code)", check=in_range(1, 1e9)),
        Param("lr", default=1e-5, doc="Adam learning rate (solver: adam; 1e-5 in the paper)", check=in_range(0.0, 1e9, low_open=True)),
    ],
    base="required",
    reference="https://arxiv.org/abs/2503.08099",
)
def wudi(tensors: list[Tensor], *, base: Tensor, layout: str, solver: str, iter_num: int, lr: float) -> Tensor:
    """WUDI merging (Cheng et al. 2025), data-free: per linear layer the merged task vector τ minimises
    Σ_i ‖(τ − τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F; θ_0 + τ.

    For a [out, in] weight the loss is quadratic in τ, so its minimiser solves the normal equations
    τ G = B with G = Σ_i τ_iᵀτ_i/‖τ_i‖² ([in, in]) and B = Σ_i τ_i τ_iᵀτ_i/‖τ_i‖²; we take
    τ = B G⁺ (float64; Cholesky, or the pseudo-inverse when G is singular). That is also where
    the paper's gradient descent from Σ τ_i converges: the gradient 2(τG − B) never leaves the row
    space of G, which holds Σ τ_i.
    `solver: adam` runs the paper's optimiser instead (Adam, `lr`, `iter_num` steps from Σ τ_i).
    For a GPT-2 Conv1D weight ([in, out]) everything is transposed.
    """
    if not _is_matrix(base, layout):
        return _mean_task_vector(tensors, base).add_(base)
    out_in = layout != "in_out"
    deltas = [x - base for x in tensors]
    norms = [float(d.square().sum(dtype=torch.float64)) for d in deltas]  # .item(): a sync point on CUDA
    live = [(d, n) for d, n in zip(deltas, norms) if n > 0.0]  # a zero task vector adds no loss term
    if not live:
        return base.clone()
    if solver == "adam":
        start = torch.stack(deltas).sum(dim=0)
        tau = _adam_steps(start, [d for d, _ in live], [n for _, n in live], iter_num, lr, out_in)
        return tau.add_(base)
    # Normal equations in the [out, in] orientation; Conv1D weights are transposed in and out.
    mats = [(d.to(torch.float64) if out_in else d.T.to(torch.float64), n) for d, n in live]
    gram = sum(d.T @ d / n for d, n in mats)  # [in, in]
    rhs = sum(d @ (d.T @ d) / n for d, n in mats)  # [out, in]
    # τᵀ = G⁺ Bᵀ; in G's null space (no task's rows reach there) τ is 0, as gradient descent leaves it.
    tau_t = solve_psd(gram, rhs.T, fallback=torch.zeros_like(rhs.T))  # [in, out]
    tau = tau_t.T if out_in else tau_t
    return tau.to(base.dtype).add_(base)


SUBSPACE_METHODS = (tsv, iso_c, iso_cts, wudi)

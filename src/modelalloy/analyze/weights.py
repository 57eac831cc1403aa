"""Diagnostics from weights alone: how the fine-tunes moved away from their base, and whether
their moves agree. Streams over tensors (one tensor of each model in memory at a time); no model
is loaded and nothing is evaluated.

For each tensor with task vectors δ_i = θ_i − θ_base:
  norm                ‖δ_i‖₂, and relative to ‖θ_base‖₂
  cosine              ⟨δ_i, δ_j⟩ / (‖δ_i‖ ‖δ_j‖) per pair (None when a δ is zero)
  sign conflict       among entries where at least two δ_i are nonzero, the fraction where
                      both signs occur: what TIES's sign election has to resolve
  concentration       the share of ‖δ_i‖² held by its top 1 / 10 / 20 % entries by magnitude:
                      high shares mean magnitude trimming (TIES, DARE) loses little
  subspace overlap    2-D tensors: ‖U_iᵀ U_j‖_F² / k for the top-k singular vectors U of δ_i and δ_j
                      (on the matrix's smaller side), 1 = same subspace, ~k/d for random ones
Per layer and overall, norms and cosines are those of the concatenated tensors (exact, from sums
of squares and dot products); conflict rates pool their counts; concentration and overlap are
means weighted by the number of entries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import combinations

import torch

from modelalloy import arch
from modelalloy.errors import PlanError
from modelalloy.io.opener import open_checkpoint

TOP_SHARES = (0.01, 0.10, 0.20)


def concentration(delta: torch.Tensor, shares: Sequence[float] = TOP_SHARES) -> list[float | None]:
    """Share of sum(δ²) in the top `share` fraction of entries by magnitude (None if δ = 0)."""
    sq = delta.flatten().double().square()
    total = float(sq.sum())
    if total == 0.0:
        return [None] * len(shares)
    ordered = torch.sort(sq, descending=True).values
    cumulative = torch.cumsum(ordered, 0)
    return [float(cumulative[max(1, math.ceil(s * sq.numel())) - 1]) / total for s in shares]


def sign_conflicts(deltas: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(entries where nonzero deltas have both signs, entries where at least two are nonzero)."""
    stacked = torch.stack([d.flatten() for d in deltas])  # (models, entries)
    positive = (stacked > 0).sum(0)
    negative = (stacked < 0).sum(0)
    eligible = (positive + negative) >= 2
    conflict = (positive > 0) & (negative > 0)
    return int(conflict.sum()), int(eligible.sum())


def top_subspace(delta: torch.Tensor, k: int) -> torch.Tensor | None:
    """Orthonormal basis (d × k) of the top-k singular vectors of a 2-D δ on its smaller side.

    Eigenvectors of the small Gram matrix (d × d, d = the smaller dimension) are the singular
    vectors on that side; much cheaper than an SVD of a tall matrix like an embedding.
    """
    if not bool(delta.any()):  # an untouched tensor (a frozen embedding) has no subspace
        return None
    x = delta.double()
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    if not bool(gram.abs().sum() > 0):
        return None
    values, vectors = torch.linalg.eigh(gram)  # ascending
    return vectors[:, -k:]


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    k = a.shape[1]
    return float((a.T @ b).square().sum()) / k


@dataclass
class _Sums:
    """Sufficient statistics for pooling tensors into a layer or the whole model."""

    sq: list[float]
    dots: dict[tuple[int, int], float]
    base_sq: float = 0.0
    conflicts: int = 0
    eligible: int = 0
    numel: int = 0
    conc: list[list[float]] = field(default_factory=list)  # per model, numel-weighted sums per share
    conc_weight: list[float] = field(default_factory=list)
    overlap: dict[tuple[int, int], list[float]] = field(default_factory=dict)  # pair -> [weighted sum, weight]

    @classmethod
    def empty(cls, n: int) -> _Sums:
        return cls([0.0] * n, {p: 0.0 for p in combinations(range(n), 2)}, conc=[[0.0] * len(TOP_SHARES) for _ in range(n)], conc_weight=[0.0] * n,
                   overlap={p: [0.0, 0.0] for p in combinations(range(n), 2)})

    def add(self, t: dict) -> None:
        for i, v in enumerate(t["_sq"]):
            self.sq[i] += v
        for p in self.dots:
            self.dots[p] += t["_dots"][p]
        self.base_sq += t["_base_sq"]
        self.conflicts += t["_conflicts"]
        self.eligible += t["_eligible"]
        self.numel += t["numel"]
        for i, shares in enumerate(t["concentration"]):
            if shares[0] is not None:
                self.conc_weight[i] += t["numel"]
                for s, v in enumerate(shares):
                    self.conc[i][s] += v * t["numel"]
        for p, v in (t.get("_overlap") or {}).items():
            if v is not None:
                self.overlap[p][0] += v * t["numel"]
                self.overlap[p][1] += t["numel"]

    def summary(self, names: Sequence[str]) -> dict:
        norms = [math.sqrt(v) for v in self.sq]
        return {
            "numel": self.numel,
            "norm": dict(zip(names, norms)),
            "relative_norm": dict(zip(names, [n / math.sqrt(self.base_sq) if self.base_sq else None for n in norms])),
            "cosine": {f"{names[i]} · {names[j]}": (d / (norms[i] * norms[j]) if norms[i] and norms[j] else None) for (i, j), d in self.dots.items()},
            "sign_conflict": self.conflicts / self.eligible if self.eligible else None,
            "concentration": {
                names[i]: ({f"top{round(100 * s)}%": self.conc[i][k] / self.conc_weight[i] for k, s in enumerate(TOP_SHARES)} if self.conc_weight[i] else None)
                for i in range(len(names))
            },
            "subspace_overlap": {f"{names[i]} · {names[j]}": (v[0] / v[1] if v[1] else None) for (i, j), v in self.overlap.items()},
        }


def tensor_stats(base: torch.Tensor, models: Sequence[torch.Tensor], *, top_k: int = 8) -> dict:
    """Every per-tensor diagnostic (see the module docstring) for one tensor."""
    base64 = base.double()
    deltas = [m.double() - base64 for m in models]
    sq = [float(d.square().sum()) for d in deltas]
    dots = {(i, j): float((deltas[i] * deltas[j]).sum()) for i, j in combinations(range(len(deltas)), 2)}
    norms = [math.sqrt(v) for v in sq]
    conflicts, eligible = sign_conflicts(deltas) if len(deltas) >= 2 else (0, 0)
    out = {
        "norm": norms,
        "base_norm": float(base64.norm()),
        "cosine": {f"{i},{j}": (d / (norms[i] * norms[j]) if norms[i] and norms[j] else None) for (i, j), d in dots.items()},
        "sign_conflict": conflicts / eligible if eligible else None,
        "concentration": [concentration(d) for d in deltas],
        "_sq": sq,
        "_dots": dots,
        "_base_sq": float(base64.square().sum()),
        "_conflicts": conflicts,
        "_eligible": eligible,
    }
    if base.dim() == 2 and len(deltas) >= 2:
        k = min(top_k, *base.shape)
        bases = [top_subspace(d, k) for d in deltas]
        overlap = {(i, j): (subspace_overlap(bases[i], bases[j]) if bases[i] is not None and bases[j] is not None else None) for i, j in combinations(range(len(deltas)), 2)}
        out["_overlap"] = overlap
        out["subspace_overlap"] = {f"{i},{j}": v for (i, j), v in overlap.items()}
    return out


@dataclass
class AnalyzeResult:
    base: str
    models: list[str]
    tensors: list[dict]
    layers: list[dict]
    overall: dict
    skipped: list[str]

    def to_json(self) -> dict:
        return {"kind": "analyze", "base": self.base, "models": self.models, "overall": self.overall, "layers": self.layers, "tensors": self.tensors, "skipped": self.skipped}


def analyze(
    base: str,
    models: Sequence[str],
    *,
    top_k: int = 8,
    labels: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> AnalyzeResult:
    """Diagnostics of `models` against `base`, streaming tensor by tensor (see module docstring)."""
    if not models:
        raise PlanError("analyze needs at least one model besides the base")
    names = list(labels) if labels else list(models)
    with ExitStack() as stack:
        b = stack.enter_context(open_checkpoint(base))
        ckpts = [stack.enter_context(open_checkpoint(m)) for m in models]
        tensor_names = [n for n in sorted(b.tensors, key=lambda n: (b.tensors[n].file, b.tensors[n].start)) if b.tensors[n].dtype.is_floating_point]
        for ref, c in zip(models, ckpts):
            for n in tensor_names:
                loc = c.tensors.get(n)
                if loc is None:
                    raise PlanError(f"tensor {n!r} is missing from {ref}; analyze compares models of the same layout as the base")
                if loc.shape != b.tensors[n].shape:
                    raise PlanError(f"tensor {n!r}: shape {list(loc.shape)} in {ref} but {list(b.tensors[n].shape)} in {base}")
        overall = _Sums.empty(len(models))
        per_layer: dict[int, _Sums] = {}
        rows = []
        for i, n in enumerate(tensor_names):
            stats = tensor_stats(b.read(n), [c.read(n) for c in ckpts], top_k=top_k)
            role = arch.role(n)
            stats.update(name=n, layer=role.layer, kind=role.kind, numel=math.prod(b.tensors[n].shape))
            overall.add(stats)
            if role.layer is not None:
                per_layer.setdefault(role.layer, _Sums.empty(len(models))).add(stats)
            rows.append({k: v for k, v in stats.items() if not k.startswith("_")})
            if progress:
                progress(i + 1, len(tensor_names))
    layers = [{"layer": layer} | s.summary(names) for layer, s in sorted(per_layer.items())]
    skipped = [n for n in b.tensors if n not in set(tensor_names)]
    return AnalyzeResult(base, names, rows, layers, overall.summary(names), skipped)

"""The task-vector family (task arithmetic, TIES, DARE, Breadcrumbs, DELLA): one pipeline,
configured per method by a row of a table.

Per output tensor (METHODS.md, "Task-vector family"):

    δ_i = θ_i − θ_0  →  sparsify(δ_i; density_i)  →  D_i = w_i δ̃_i  →  combine
        →  optional ÷ weight divisor  →  × lambda  →  θ_0 + result

This module owns the table (`FAMILY`: each method's sparsifier, sign consensus, defaults,
parameters and differences from mergekit) and registers one merge method per row
(`FAMILY_METHODS`). The pipeline is `TaskVectorMerge` (`methods/task_vector_merge.py`), the
sparsifiers are in `methods/sparsifiers.py`, the streamed magnitude thresholds in
`methods/radix_select.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from modelalloy.methods.blockwise import TensorSpec
from modelalloy.methods.registry import MergeMethod, Param, in_range, merge_method
from modelalloy.methods.sparsifiers import DELLA_MAGPRUNE, MAGNITUDE, MAGNITUDE_OUTLIERS, RANDOM, SparsifierKind
from modelalloy.methods.task_vector_merge import TaskVectorMerge

DENSITY = Param("density", default=1.0, per_model=True, doc="fraction of each task vector kept", check=in_range(0.0, 1.0, low_open=True))
WEIGHT = Param("weight", default=1.0, per_model=True, doc="each task vector's weight")
LAMBDA = Param("lambda", default=1.0, doc="scales the merged task vector")
INT8_MASK = Param("int8_mask", default=False, kind=bool, doc="store masks as int8 to save memory (no effect on the numbers)")
CONSENSUS = Param("consensus_method", default="sum", kind=str, choices=("sum", "count"), doc="sign election by mass (sum) or by vote (count)")


GAMMA = Param("gamma", default=0.01, per_model=True, doc="fraction of the largest |δ| dropped as outliers", check=in_range(0.0, 1.0, high_open=True))
EPSILON = Param("epsilon", default=0.15, per_model=True, doc="keep-probabilities span density ± epsilon by magnitude rank", check=in_range(0.0, 1.0, high_open=True))


def _rescale_param(default: bool) -> Param:
    return Param("rescale", default=default, kind=object, choices=(True, False, "l1", "inverse_p"), doc="rescale kept entries: l1 (= true) keeps ‖δ‖₁, inverse_p divides by the keep-probability")


def check_della_range(params: dict[str, Any], models: Sequence[str]) -> str | None:
    """DELLA's keep-probabilities (density − ε .. density + ε) must be probabilities: 0 < density ± ε < 1.

    Density 1 means no pruning, so epsilon does not matter there (as in mergekit).
    """
    for model, density, epsilon in zip(models, params["density"], params["epsilon"]):
        if density < 1.0 and not (density - epsilon > 0.0 and density + epsilon < 1.0):
            return (
                f"density {density:g} ± epsilon {epsilon:g} for {model} leaves (0, 1); "
                f"keep-probabilities must stay inside it: use epsilon < {min(density, 1 - density):g}"
            )
    return None


@dataclass(frozen=True)
class FamilyRow:
    name: str
    consensus: bool
    sparsifier: SparsifierKind | None
    normalize: bool
    rescale: bool | None  # None: the method has no rescale parameter
    reference: str
    doc: str
    extra: tuple[Param, ...] = ()  # the sparsifier's own parameters
    check: Callable[[dict[str, Any], Sequence[str]], str | None] | None = None
    vs_mergekit: str = ""


_BREADCRUMBS_VS_MERGEKIT = (
    "Counts as mergekit 0.1.5: keep int(density·n) entries after dropping the min(int(gamma·n), n − keep) "
    "largest |δ|, so the same entries are kept wherever |δ| are distinct (tested on 7, 64 and 256 entries). "
    "Equal |δ| at a cut are ranked by index (mergekit's unstable sort picks any), and mergekit ranks |δ| "
    "computed in the config's dtype where we compute in float32: on bfloat16 tensors the two differ at "
    "the cuts of small tensors (2 of 256 entries of one norm in the benchmark). Earlier mergekit versions "
    "zeroed the whole task vector when int(gamma·numel) = 0 (tensors under 1/gamma entries, e.g. norms at "
    "gamma 0.01); we keep the density's largest entries there, as mergekit 0.1.5 does. rescale also takes inverse_p."
)
_DELLA_VS_MERGEKIT = (
    "rescale: inverse_p divides each kept entry by its own keep-probability (the paper's rescaling); "
    "a row of one entry gets p = density where mergekit divides by zero; rows are the last dim of any-rank tensors."
)

# METHODS.md's table, row for row.
FAMILY: tuple[FamilyRow, ...] = (
    FamilyRow("task_arithmetic", False, None, False, None, "https://arxiv.org/abs/2212.04089", "Task arithmetic (Ilharco et al. 2023): θ_0 + λ Σ w_i δ_i."),
    FamilyRow("ties", True, MAGNITUDE, True, None, "https://arxiv.org/abs/2306.01708", "TIES (Yadav et al. 2023): trim to the largest |δ|, elect signs, average the agreeing entries."),
    FamilyRow("dare_linear", False, RANDOM, False, True, "https://arxiv.org/abs/2311.03099", "DARE (Yu et al. 2024): drop entries at random, rescale, add."),
    FamilyRow("dare_ties", True, RANDOM, False, True, "https://arxiv.org/abs/2311.03099", "DARE drop-and-rescale followed by TIES sign consensus."),
    FamilyRow(
        "breadcrumbs", False, MAGNITUDE_OUTLIERS, False, False, "https://arxiv.org/abs/2312.06795",
        "Model Breadcrumbs (Davari & Belilovsky 2024): drop the largest (gamma) and smallest |δ|, keep density, add.",
        extra=(GAMMA,), vs_mergekit=_BREADCRUMBS_VS_MERGEKIT,
    ),
    FamilyRow(
        "breadcrumbs_ties", True, MAGNITUDE_OUTLIERS, False, False, "https://arxiv.org/abs/2312.06795",
        "Model Breadcrumbs' outlier-and-small-entry pruning followed by TIES sign consensus.",
        extra=(GAMMA,), vs_mergekit=_BREADCRUMBS_VS_MERGEKIT,
    ),
    FamilyRow(
        "della", True, DELLA_MAGPRUNE, True, True, "https://arxiv.org/abs/2406.11617",
        "DELLA (Deep et al. 2024): drop entries at random, bigger |δ| kept more often (MagPrune), rescale, elect signs, average.",
        extra=(EPSILON,), check=check_della_range, vs_mergekit=_DELLA_VS_MERGEKIT,
    ),
    FamilyRow(
        "della_linear", False, DELLA_MAGPRUNE, False, True, "https://arxiv.org/abs/2406.11617",
        "DELLA's MagPrune drop-and-rescale, then a weighted sum of the task vectors (no sign election).",
        extra=(EPSILON,), check=check_della_range, vs_mergekit=_DELLA_VS_MERGEKIT,
    ),
)


def _family_method(row: FamilyRow) -> MergeMethod:
    params = [WEIGHT, LAMBDA, Param("normalize", default=row.normalize, kind=bool, doc="divide by the (agreeing) weight sum")]
    if row.sparsifier is not None:
        params[1:1] = [DENSITY, *row.extra]
    if row.consensus:
        params += [CONSENSUS, INT8_MASK]
    if row.rescale is not None:
        params.append(_rescale_param(row.rescale))

    def fn(
        spec: TensorSpec,
        *,
        seed=0,
        weight,
        lambda_,
        normalize,
        density=None,
        gamma=None,
        epsilon=None,
        consensus_method="sum",
        int8_mask=False,  # masks are bool here already: 1 byte, what int8 buys mergekit
        rescale=None,
    ) -> TaskVectorMerge:
        return TaskVectorMerge(
            spec,
            weight=weight,
            density=density,
            lambda_=lambda_,
            consensus=consensus_method if row.consensus else None,
            sparsifier=row.sparsifier,
            normalize=normalize,
            rescale={True: "l1", False: None, None: None}.get(rescale, rescale),
            seed=seed,
            gamma=gamma,
            epsilon=epsilon,
        )

    fn.__doc__ = row.doc
    return merge_method(
        row.name,
        params=params,
        base="required",
        randomized=bool(row.sparsifier and row.sparsifier.random),
        reference=row.reference,
        vs_mergekit=row.vs_mergekit,
        check=row.check,
        blockwise=True,
    )(fn)


FAMILY_METHODS: tuple[MergeMethod, ...] = tuple(_family_method(row) for row in FAMILY)

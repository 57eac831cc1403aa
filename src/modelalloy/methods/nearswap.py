"""NearSwap: take the other model's value only where it is already near the base's."""

from __future__ import annotations

from torch import Tensor

from modelalloy.methods.registry import Param, merge_method

# Floor for |θ_0 − θ_1|: where the models agree (difference 0) α is 1 and either value is right.
_MIN_DISTANCE = 1e-6


@merge_method(
    "nearswap",
    params=[Param("t", doc="similarity threshold: entries closer than t are swapped in fully", check=lambda v: None if v > 0 else "must be > 0 (it divides the distances)")],
    base="required",
    min_models=1,
    max_models=1,
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    vs_mergekit="t must be > 0, checked while planning; mergekit does not check it (t ≤ 0 quietly gives the base).",
)
def nearswap(tensors: list[Tensor], *, base: Tensor, t: float) -> Tensor:
    """Take the other model's entries where they are within t of the base, interpolate the rest.

    Elementwise α = clamp(t / max(|θ_0 − θ_1|, 1e-6), 0, 1); result α θ_1 + (1 − α) θ_0
    (alchemonaut, QuartetAnemoi-70B model card, 2024). Entries within t of the base take the
    other model's value; farther ones move toward it by t/|difference|, so far-apart entries
    stay close to the base.
    """
    other = tensors[0]
    alpha = (base - other).abs_().clamp_(min=_MIN_DISTANCE).reciprocal_().mul_(t).clamp_(0.0, 1.0)
    return (other * alpha).add_(base * (1.0 - alpha))

"""Numbers with their intervals, as text: shared by the terminal tables and the HTML report.

A score prints as ``value ± half-width`` of its 95 % interval (the bootstrap's percentile
interval need not be symmetric; the half-width is (high − low) / 2, and the JSON keeps both
ends). A difference whose interval includes zero is inside the noise and is marked ``≈``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

NOISE = "≈"  # a difference whose 95 % interval includes zero
TIED = "≈"  # in a ranking: not distinguishable from the row above


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def half_width(ci: Sequence[float] | None) -> float | None:
    return None if not ci else (ci[1] - ci[0]) / 2


def pm(value, ci: Sequence[float] | None, digits: int = 2, *, percent: bool = False, signed: bool = False) -> str:
    """``12.34 ± 0.21``; ``—`` for no value; the bare value when there is no interval."""
    if not _finite(value):
        return "—"
    scale, unit = (100.0, " %") if percent else (1.0, "")
    sign = "+" if signed or percent else ""
    text = f"{scale * value:{sign}.{digits}f}"
    hw = half_width(ci)
    if hw is not None and _finite(hw):
        text += f" ± {scale * hw:.{digits}f}"
    return text + unit


def within_noise(ci: Sequence[float] | None) -> bool:
    return bool(ci) and ci[0] <= 0.0 <= ci[1]


def delta(comparison: dict | None, digits: int = 2) -> str:
    """A paired difference: ``−3.10 [−3.52, −2.71]``, prefixed ``≈`` when its interval includes 0."""
    if not comparison or not _finite(comparison.get("delta")):
        return "—"
    ci = comparison.get("ci95")
    text = f"{comparison['delta']:+.{digits}f}"
    if ci:
        text += f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"
    return (NOISE + " " if within_noise(ci) else "") + text


def p_better(comparison: dict | None) -> str:
    p = (comparison or {}).get("p_better")
    return "—" if p is None else f"{p:.2f}"


def rank_labels(rates: Sequence[dict]) -> list[str]:
    """``1``, ``≈2``, ``3``...: the position, marked when not distinguishable from the row above.

    `rates` are merge-rate summaries best first; each one's ``vs_next`` compares it with the next.
    """
    labels = []
    for i, r in enumerate(rates):
        above = rates[i - 1] if i else None
        tied = above is not None and within_noise((above.get("vs_next") or {}).get("ci95"))
        labels.append(f"{TIED}{i + 1}" if tied else str(i + 1))
    return labels


RANK_LEGEND = f"{TIED}N: not distinguishable from the method ranked above it (the 95 % interval of their paired difference in mean NAI includes 0)"
NOISE_LEGEND = f"{NOISE}: the 95 % interval of the difference includes 0 (inside the noise)"
PM_LEGEND = "± is half the width of the 95 % bootstrap interval"

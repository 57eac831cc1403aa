"""A merge rate predicted before any evaluation: a new set of models' diagnostics read against a
study's merges (`alloy analyze ... --study OUT/study.json`).

For each diagnostic the study measured, the prediction is the mean NAI of the study's merges whose
value of that diagnostic lies nearest the new one (the `neighbours` closest), with their range; how
far to trust it is the study's ρ and its interval: an interval that includes 0 means this
diagnostic did not rank the study's merges at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def diagnostics_from_analysis(analysis: Mapping) -> dict[str, float | None]:
    """The study's weight diagnostics from `alloy analyze`'s JSON (`AnalyzeResult.to_json()`)."""
    overall = analysis["overall"]
    norms = [v for v in overall["norm"].values() if v]
    cos = [v for v in overall["cosine"].values() if v is not None]
    rel = [v for v in overall["relative_norm"].values() if v is not None]
    return {
        "sign_conflict": overall.get("sign_conflict"),
        "mean_cosine": float(np.mean(cos)) if cos else None,
        "norm_ratio": max(norms) / min(norms) if norms and min(norms) > 0 else None,
        "relative_norm": float(np.mean(rel)) if rel else None,
    }


def predict(study: Mapping, diagnostics: Mapping[str, float | None], *, neighbours: int = 5, method: str | None = None) -> list[dict]:
    """Per diagnostic: the new value, the study's ρ (ci95, n), and the predicted mean NAI.

    `method` restricts the neighbours to the study's merges with that method, and the ρ to the one
    measured within it.
    """
    runs = [r for r in study["runs"] if method is None or r["method"] == method]
    out = []
    for row in study["prediction"]:
        d = row["diagnostic"]
        if method is not None and method in row.get("by_method", {}):
            row = {"diagnostic": d} | row["by_method"][method]
        x = diagnostics.get(d)
        entry = {"diagnostic": d, "value": x, "spearman_rho": row["spearman_rho"], "ci95": row["ci95"], "n": row["n"],
                 "predicted_nai": None, "range": None, "trusted": row["ci95"] is not None and (row["ci95"][0] > 0 or row["ci95"][1] < 0)}
        pts = [(r["interference"].get(d), r["nai"]["value"]) for r in runs]
        pts = [(a, b) for a, b in pts if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
        if x is not None and pts:
            near = sorted(pts, key=lambda p: abs(p[0] - x))[:neighbours]
            ys = [p[1] for p in near]
            entry["predicted_nai"], entry["range"] = float(np.mean(ys)), [float(min(ys)), float(max(ys))]
        out.append(entry)
    return out

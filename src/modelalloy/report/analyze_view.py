"""The weight-diagnostics section of the report: per-layer plots and the overall tables."""

from __future__ import annotations

from modelalloy.report import plots
from modelalloy.report.html import Report


def render_analyze(report: Report, result: dict) -> None:
    report.heading("Weight diagnostics")
    names = result["models"]
    report.paragraph(f"task vectors δ = model − base, base: {result['base']}. Sign conflict: among entries where two or more "
                     "task vectors are nonzero, the share where their signs disagree. Concentration: share of ‖δ‖² in the "
                     "largest 1/10/20 % of entries (high = trimming loses little). Subspace overlap: top singular vectors, 1 = same. "
                     "These are computed from the weights themselves, exactly, with no sampling: they have no error bars.")
    o = result["overall"]
    rows = []
    for n in names:
        conc = o["concentration"].get(n) or {}
        rows.append([n, o["norm"][n], o["relative_norm"][n], conc.get("top1%"), conc.get("top10%"), conc.get("top20%")])
    report.table(["model", "‖δ‖", "‖δ‖ / ‖base‖", "top 1 %", "top 10 %", "top 20 %"], rows, caption="task vectors, whole model")
    if len(names) >= 2:
        pairs = list(o["cosine"])
        report.table(["pair", "cosine", "subspace overlap"], [[p, o["cosine"][p], o["subspace_overlap"].get(p)] for p in pairs] + [["sign conflict (all)", o["sign_conflict"], None]],
                     caption="agreement between task vectors, whole model")
        matrix = [[1.0 if i == j else o["cosine"].get(f"{names[min(i, j)]} · {names[max(i, j)]}") for j in range(len(names))] for i in range(len(names))]
        report.figure(plots.heatmap(matrix, names, names, title="cosine of task vectors (whole model)", vmin=-1, vmax=1), alt="cosine heatmap")
    layers = result["layers"]
    if layers:
        xs = [r["layer"] for r in layers]
        report.figure(plots.lines(xs, {n: [r["norm"][n] for r in layers] for n in names}, title="task-vector norm per layer", xlabel="layer", ylabel="‖δ‖"), alt="norms per layer")
        if len(names) >= 2:
            report.figure(plots.lines(xs, {p: [r["cosine"][p] for r in layers] for p in layers[0]["cosine"]}, title="cosine per layer", xlabel="layer", ylabel="cosine"), alt="cosine per layer")
            report.figure(plots.lines(xs, {"sign conflict": [r["sign_conflict"] for r in layers]}, title="sign-conflict rate per layer", xlabel="layer", ylabel="share of entries"), alt="sign conflicts per layer")
            kinds = sorted({t["kind"] for t in result["tensors"] if t["layer"] is not None})
            grid = []
            for r in layers:
                row = []
                for k in kinds:
                    ts = [t for t in result["tensors"] if t["layer"] == r["layer"] and t["kind"] == k and t["sign_conflict"] is not None]
                    row.append(sum(t["sign_conflict"] * t["numel"] for t in ts) / sum(t["numel"] for t in ts) if ts else None)
                grid.append(row)
            report.figure(plots.heatmap(grid, [str(x) for x in xs], kinds, title="sign-conflict rate: layer × block kind", vmin=0, vmax=1), alt="sign conflicts heatmap")
        report.figure(plots.lines(xs, {n: [(r["concentration"].get(n) or {}).get("top10%") for r in layers] for n in names}, title="share of ‖δ‖² in the top 10 % entries, per layer", xlabel="layer", ylabel="share"), alt="concentration per layer")
    if result.get("skipped"):
        report.paragraph(f"not analysed (not floating point): {', '.join(result['skipped'][:10])}", note=True)

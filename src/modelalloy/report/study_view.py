"""`study.html` and its PNGs, from a study's JSON (`alloy study`): the curves with error bars
(mean NAI vs k per method, vs strength per method), merge vs fusion bars with their cost,
coherence, and the table of diagnostics as predictors."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from modelalloy.report.plots import png  # (importing plots selects the Agg backend before pyplot)
from modelalloy.report.html import Report

import matplotlib.pyplot as plt  # noqa: E402


def _err(points):
    """matplotlib's [below, above] distances from (value, ci95) points; no interval draws none."""
    return [[v - ci[0] if ci else 0.0 for v, ci in points], [ci[1] - v if ci else 0.0 for v, ci in points]]


_MARKERS = "os^Dv<>"
_LINES = ("-", "--", ":", "-.")


def _style(method: str, strength: str | None, methods: list[str], strengths: list[str]) -> dict:
    """One colour per method (a study has up to ten: no colour repeats), one marker and line
    style per strength, so a method's curves at two strengths read as one family."""
    colour = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")(methods.index(method) % 20)
    at = strengths.index(strength) if strength in strengths else 0
    return {"color": colour, "marker": _MARKERS[at % len(_MARKERS)], "linestyle": _LINES[at % len(_LINES)]}


def _curve_plot(rows: list[dict], x_key: str, title: str, xlabel: str, metric: str = "mean_nai") -> bytes:
    series: dict[tuple[str, str | None], list] = {}
    for r in rows:
        name = r["method"] if r["family"] == "merge" else f"{r['method']} (fusion)"
        if r[metric]["value"] is not None:
            key = (name, r["strength"] if x_key == "k" else None)
            series.setdefault(key, []).append((r[x_key], r[metric]["value"], r[metric]["ci95"]))
    methods = list(dict.fromkeys(n for n, _ in series))
    strengths = list(dict.fromkeys(st for _, st in series if st is not None))
    fig, ax = plt.subplots(figsize=(8, 4))
    xs_all = list(dict.fromkeys(r[x_key] for r in rows))
    for (name, strength), pts in series.items():
        pts.sort(key=lambda p: xs_all.index(p[0]))
        xs = [xs_all.index(p[0]) if x_key != "k" else p[0] for p in pts]
        ax.errorbar(xs, [p[1] for p in pts], yerr=_err([(p[1], p[2]) for p in pts]), capsize=3,
                    label=name + (f" @ {strength}" if strength is not None else ""), **_style(name, strength, methods, strengths))
    if x_key != "k":
        ax.set_xticks(range(len(xs_all)), xs_all)
    else:
        ax.set_xticks(sorted(set(xs_all)))
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean NAI (1 = keeps every expert's gain)" if metric == "mean_nai" else "held-in cross-entropy (nats/token)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return png(fig)


def _law_plot(laws: list[dict]) -> bytes:
    """Each fitted law as a curve over its measured per-k means (with their intervals)."""
    import numpy as np

    from modelalloy.study.scaling_law import law

    fig, ax = plt.subplots(figsize=(7, 4))
    methods = list(dict.fromkeys(e["method"] for e in laws))
    strengths = list(dict.fromkeys(e["strength"] for e in laws))
    for e in laws:
        ks = [p["k"] for p in e["points"]]
        ys = [p["measured"] for p in e["points"]]
        err = [[y - p["ci95"][0] for y, p in zip(ys, e["points"])], [p["ci95"][1] - y for y, p in zip(ys, e["points"])]]
        style = _style(e["method"], e["strength"], methods, strengths)
        ax.errorbar(ks, ys, yerr=err, fmt=style["marker"], color=style["color"], capsize=3, label=f"{e['method']} @ {e['strength']}")
        grid = np.linspace(min(ks), max(ks), 100)
        ax.plot(grid, law(grid, *[v["value"] for v in e["params"].values()]), linestyle=style["linestyle"], color=style["color"])
    ax.set_xlabel("experts merged (k)")
    ax.set_ylabel("held-in cross-entropy (nats)")
    ax.legend(fontsize=7)
    return png(fig)


def _bars(groups: Mapping[str, tuple[float | None, list | None]], title: str, ylabel: str, notes: Mapping[str, str]) -> bytes:
    names = [n for n, (v, _) in groups.items() if v is not None]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names) + 2), 3.8))
    vals = [groups[n][0] for n in names]
    ax.bar(range(len(names)), vals, yerr=_err([(groups[n][0], groups[n][1]) for n in names]), capsize=3,
           color=["#4c72b0" if "fusion" not in n else "#dd8452" for n in names])
    ax.set_xticks(range(len(names)), [f"{n}\n{notes.get(n, '')}" for n in names], rotation=30, ha="right", fontsize=7)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    return png(fig)


def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def _with_ci(x: Mapping) -> str:
    if x["value"] is None:
        return "-"
    return f"{x['value']:.3f}" + (f" [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}]" if x.get("ci95") else "")


def comparison(study: Mapping) -> dict[str, dict]:
    """Per method and fusion kind, over all its runs: mean NAI (and the interval of the mean over
    per-run values, read off the curve rows by strength), params and forward passes per token."""
    out: dict[str, dict] = {}
    for r in study["runs"] + study["fusion"]:
        name = r["method"] if "method" in r else f"{r['kind']} (fusion)"
        e = out.setdefault(name, {"nai": [], "params": [], "forward_passes": [], "entropy_ratio": []})
        if r["nai"]["value"] is not None:
            e["nai"].append(r["nai"]["value"])
        e["params"].append(r.get("params") or 0)
        e["forward_passes"].append(r.get("forward_passes") or 0)
        if r["coherence"].get("entropy_ratio") is not None:
            e["entropy_ratio"].append(r["coherence"]["entropy_ratio"])
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {n: {k: mean(v) for k, v in e.items()} | {"runs": len(e["nai"])} for n, e in out.items()}


def write_study_report(study: Mapping, out_dir: str | Path) -> list[Path]:
    """`out_dir/study.html` and the PNGs beside it; returns the paths written."""
    out_dir = Path(out_dir)
    figures: dict[str, bytes] = {}
    vs_k = study["curves"]["vs_k"]
    figures["nai_vs_k.png"] = _curve_plot(vs_k, "k", "merge rate vs number of experts merged (mean over subsets, 95 % CI)", "experts merged (k)")
    figures["cross_entropy_vs_k.png"] = _curve_plot(vs_k, "k", "held-in cross-entropy vs k", "experts merged (k)", metric="held_in_cross_entropy")
    figures["nai_vs_strength.png"] = _curve_plot(study["curves"]["vs_strength"], "strength", "merge rate vs specialist strength (all k)", "specialist strength")
    cmp = comparison(study)
    by_name = {}
    for r in study["curves"]["vs_strength"]:
        by_name.setdefault(r["method"] if r["family"] == "merge" else f"{r['method']} (fusion)", []).append(r)
    notes = {n: f"{c['forward_passes']:.0f}× pass, {c['params'] / 1e6:.2g}M params" if c["params"] else "" for n, c in cmp.items()}
    last = study["axes"]["strengths"][-1]
    bars = {n: next(((r["mean_nai"]["value"], r["mean_nai"]["ci95"]) for r in rows if r["strength"] == last), (None, None)) for n, rows in by_name.items()}
    figures["merge_vs_fusion.png"] = _bars(bars, f"merge vs fusion at strength {last} (mean NAI over subsets; cost below)", "mean NAI", notes)
    coh = {n: (c["entropy_ratio"], None) for n, c in cmp.items()}
    figures["coherence.png"] = _bars(coh, "predictive entropy on held-in sets / the expert's (1 = as confident; >1 flatter)", "entropy ratio", {})
    paths = []
    for name, data in figures.items():
        (out_dir / name).write_bytes(data)
        paths.append(out_dir / name)

    rep = Report("modelalloy study")
    ax = study["axes"]
    rep.paragraph(f"{len(study['runs'])} merges ({', '.join(ax['methods'])}) of subsets of k = {', '.join(map(str, ax['k']))} experts, "
                  f"at strengths {', '.join(ax['strengths'])}; fusion baselines: {', '.join(ax['fusion'])}. Intervals are 95 % bootstrap intervals.")
    rep.heading("Merge rate vs the number of experts")
    rep.figure(figures["nai_vs_k.png"], "mean NAI vs k")
    rep.table(["method", "strength", "k", "subsets", "mean NAI [95 % CI]", "held-in cross-entropy [95 % CI]"],
              [[r["method"] + (" (fusion)" if r["family"] == "fusion" else ""), r["strength"], r["k"], r["mean_nai"]["n_subsets"], _with_ci(r["mean_nai"]),
                _with_ci(r["held_in_cross_entropy"])] for r in vs_k])
    rep.figure(figures["cross_entropy_vs_k.png"], "cross-entropy vs k")
    laws = [e for e in study.get("scaling_law", []) if e.get("fitted")]
    if laws:
        rep.heading("The merging scaling law (arXiv 2509.24244)")
        rep.figure(_law_plot(laws), "fitted law over the measured points")
        rep.table(["method", "strength", "form", "parameters [95 % CI]", "R²", "leave largest k out", "experts for the target"],
                  [[e["method"], e["strength"], e["form"], "; ".join(f"{n} {_with_ci(v)}" for n, v in e["params"].items()), _fmt(e["r2"]),
                    (f"k={e['loo']['k']}: {_fmt(e['loo']['predicted'])} vs {_fmt(e['loo']['measured'])}" + ("" if e["loo"]["agrees"] else " (disagrees)")) if e["loo"].get("done") else e["loo"].get("reason", "-"),
                    (f"{_fmt(e['experts_for_target']['k'])} {e['experts_for_target']['ci95']}" if e["experts_for_target"]["reachable"] else e["experts_for_target"]["reason"]) if "experts_for_target" in e else "-"]
                   for e in laws])
    for e in study.get("scaling_law", []):
        if not e.get("fitted"):
            rep.paragraph(f"{e['method']} @ {e['strength']}: the law was not fitted ({e['reason']}).", note=True)
    rep.heading("Merge rate vs specialist strength")
    rep.figure(figures["nai_vs_strength.png"], "mean NAI vs strength")
    rep.heading("Merging vs fusion, with cost")
    rep.figure(figures["merge_vs_fusion.png"], "merge vs fusion")
    rep.table(["method", "runs", "mean NAI", "params", "forward passes / token", "entropy ratio"],
              [[n, c["runs"], _fmt(c["nai"]), f"{c['params']:.3g}" if c["params"] else "-", _fmt(c["forward_passes"]), _fmt(c["entropy_ratio"])] for n, c in cmp.items()])
    rep.heading("Coherence")
    rep.figure(figures["coherence.png"], "entropy ratio")
    rep.table(["merge", "entropy ratio", "distinct-2", "parents' distinct-2", "repeated 4-grams", "parents' repeated 4-grams"],
              [[r["id"], _fmt(r["coherence"].get("entropy_ratio")), _fmt(r["coherence"].get("distinct_2")), _fmt(r["coherence"].get("parents_distinct_2")),
                _fmt(r["coherence"].get("repeated_4gram")), _fmt(r["coherence"].get("parents_repeated_4gram"))] for r in study["runs"]])
    rep.heading("What predicts a failed merge")
    rep.table(["diagnostic", "Spearman ρ with mean NAI", "95 % CI", "merges"], prediction_rows(study["prediction"]))
    rep.paragraph("An interval that includes 0: the diagnostic did not rank this study's merges. Pooled over methods, ρ also "
                  "ranks the methods against each other (the diagnostics describe the expert subset); within a method, below, it "
                  "says only which subsets merge worse.", note=True)
    rep.table(["diagnostic", "method", "Spearman ρ with mean NAI", "95 % CI", "merges"],
              [[p["diagnostic"], m, *prediction_rows([r])[0][1:]] for p in study["prediction"] for m, r in p.get("by_method", {}).items()])
    rep.heading("Divergence of the parents (linear CKA of hidden states)")
    rep.table(["strength", "pair", "mean CKA", "per layer"], [[d["strength"], " · ".join(d["pair"]), _fmt(d["mean_cka"]),
                                                              " ".join(f"{v:.2f}" for v in d["cka_per_layer"])] for d in study["divergence"]])
    for w in study.get("warnings", []):
        rep.paragraph(w, note=True)
    paths.append(rep.write(out_dir / "study.html"))
    return paths


def prediction_rows(prediction) -> list[list[str]]:
    return [[p.get("diagnostic", ""), _fmt(p["spearman_rho"]), f"[{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]" if p["ci95"] else "-", str(p["n"])] for p in prediction]

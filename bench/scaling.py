"""The scaling curve (`bench/run.py --sizes tiny,1b,7b`): the same methods at several model sizes,
reported per size against the issue's targets, as one table and one chart.

A size's entry is what `run.py` records: the size's shape figures and the `run_method` result of
each method. Seconds per GB read are the wall time over the bytes of the three inputs; the figures
"per GB added" are the slope between two neighbouring sizes, (wall₂ − wall₁) / (GB₂ − GB₁), which
takes out what every run pays once whatever the size (torch's import, the start-up).
"""

from __future__ import annotations

from pathlib import Path

METHODS = ["linear", "ties", "dare_ties"]
# Targets (issue 19): alloy's peak RSS ≤ 1 GB + 3 × the largest tensor at every size; alloy's
# s/GB within 15 % across sizes (max / min − 1); TIES at 7B ≥ 5× mergekit's wall time.
SPREAD_TARGET = 0.15
TIES_TARGET_SIZE, TIES_TARGET = "7b", 5.0


def parse_mergekit_methods(specs: list[str] | None, sizes: list[str], methods: list[str]) -> dict[str, list[str]]:
    """Which methods mergekit runs at each size: all of `methods` unless a spec `SIZE=m1,m2` (or
    `SIZE=` for none) says otherwise."""
    chosen = {s: list(methods) for s in sizes}
    for spec in specs or []:
        name, sep, listed = spec.partition("=")
        if not sep or name not in chosen:
            raise ValueError(f"--mergekit-methods {spec!r}: expected SIZE=METHOD,... with SIZE one of {', '.join(sizes)}")
        picked = [m for m in listed.split(",") if m]
        unknown = [m for m in picked if m not in methods]
        if unknown:
            raise ValueError(f"--mergekit-methods {spec!r}: {', '.join(unknown)} not among the methods run ({', '.join(methods)})")
        chosen[name] = picked
    return chosen


def _ok(run: dict) -> bool:
    return bool(run.get("ok"))


def s_per_gb(result: dict, tool: str) -> float | None:
    run = result[tool]
    return run["wall_s"] / (result["input_bytes"] / 1e9) if _ok(run) else None


def summary(sizes: list[dict]) -> dict:
    """The targets, measured: RSS per size, s/GB per method across sizes, TIES at 7B."""
    rss = {}
    for entry in sizes:
        peaks = [r["alloy"]["peak_rss_bytes"] for r in entry["results"] if _ok(r["alloy"])]
        if peaks:
            rss[entry["name"]] = {"peak_rss_bytes": max(peaks), "bound_bytes": entry["rss_bound_bytes"], "within": max(peaks) <= entry["rss_bound_bytes"]}
    per_method: dict[str, dict] = {}
    methods = list(dict.fromkeys(r["method"] for entry in sizes for r in entry["results"]))
    for method in methods:
        points = [(entry["name"], r) for entry in sizes for r in entry["results"] if r["method"] == method]
        row: dict = {tool: {name: s_per_gb(r, tool) for name, r in points if s_per_gb(r, tool) is not None} for tool in ("alloy", "mergekit")}
        values = list(row["alloy"].values())
        if len(values) >= 2:
            row["spread"] = max(values) / min(values) - 1
            row["within"] = row["spread"] <= SPREAD_TARGET
        measured = [(name, r) for name, r in points if _ok(r["alloy"])]
        row["per_gb_added"] = {
            f"{n1}→{n2}": (r2["alloy"]["wall_s"] - r1["alloy"]["wall_s"]) / ((r2["input_bytes"] - r1["input_bytes"]) / 1e9)
            for (n1, r1), (n2, r2) in zip(measured, measured[1:])
            if r2["input_bytes"] != r1["input_bytes"]
        }
        per_method[method] = row
    ties = next((r for entry in sizes if entry["name"] == TIES_TARGET_SIZE for r in entry["results"] if r["method"] == "ties"), None)
    speedup = ties.get("speedup_vs_mergekit") if ties else None
    return {
        "rss": rss,
        "s_per_gb": per_method,
        "ties_target": {"size": TIES_TARGET_SIZE, "target": TIES_TARGET, "speedup": speedup, "met": None if speedup is None else speedup >= TIES_TARGET},
    }


def cell(run: dict, text: str, why: bool = False) -> str:
    """A tool's figure; where there is none, "failed", or (`why`: in the row's first cell of that
    tool) its note, "not available in this build" or "not run at this size", else a dash."""
    if _ok(run):
        return text
    if run.get("available", True):
        return "failed"
    return run["note"] if why else "–"


def secs(run: dict, key: str) -> str:
    return cell(run, f"{run.get(key, 0):.1f}", why=key == "wall_s")


def gib(run: dict) -> str:
    return cell(run, f"{run.get('peak_rss_bytes', 0) / 2**30:.2f} GiB")


def _mark(ok: bool | None) -> str:
    return "" if ok is None else (" ✓" if ok else " ✗")


def table(sizes: list[dict]) -> str:
    """The scaling table (a row per size and method), then the targets as measured."""
    head = "| size | method | GB read | alloy s | alloy CPU s | alloy peak RSS | RSS bound (1 GB + 3 × largest tensor) | alloy s/GB | mergekit s | mergekit CPU s | mergekit peak RSS | mergekit s/GB | speed-up | alloy / read+write bound |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for entry in sizes:
        for r in entry["results"]:
            a, m = r["alloy"], r["mergekit"]
            bound = entry["rss_bound_bytes"]
            sgb = {tool: cell(r[tool], f"{s_per_gb(r, tool) or 0:.2f}") for tool in ("alloy", "mergekit")}
            rss_bound = f"{bound / 2**30:.2f} GiB" + (_mark(a["peak_rss_bytes"] <= bound) if _ok(a) else "")
            speed = r.get("speedup_vs_mergekit")
            speed_text = "–" if speed is None else f"{speed:.2f}×" + (_mark(speed >= TIES_TARGET) + ("" if speed >= TIES_TARGET else f" (< {TIES_TARGET:g}×)") if (entry["name"], r["method"]) == (TIES_TARGET_SIZE, "ties") else "")
            read_write = f"{r['alloy_vs_read_write']:.0%}" if "alloy_vs_read_write" in r else "–"
            lines.append(
                f"| {entry['name']} ({entry['parameters'] / 1e9:.2f}B) | {r['method']} | {r['input_bytes'] / 1e9:.2f} | "
                f"{secs(a, 'wall_s')} | {secs(a, 'cpu_s')} | {gib(a)} | {rss_bound} | {sgb['alloy']} | "
                f"{secs(m, 'wall_s')} | {secs(m, 'cpu_s')} | {gib(m)} | {sgb['mergekit']} | {speed_text} | {read_write} |"
            )
    s = summary(sizes)
    lines += ["", "Targets (issue 19), as measured:", ""]
    rss = s["rss"]
    if rss:
        within = all(v["within"] for v in rss.values())
        detail = ", ".join(f"{n} {v['peak_rss_bytes'] / 2**30:.2f} of {v['bound_bytes'] / 2**30:.2f} GiB" for n, v in rss.items())
        lines.append(f"- alloy's peak RSS ≤ 1 GB + 3 × the largest tensor at every size:{_mark(within)} ({detail})")
    spreads = []
    for method, row in s["s_per_gb"].items():
        values = row["alloy"]
        if "spread" in row:
            spreads.append(f"{method} {min(values.values()):.2f}–{max(values.values()):.2f} s/GB (spread {row['spread']:.0%}){_mark(row['within'])}")
    if not spreads:
        lines.append(f"- alloy's s/GB within {SPREAD_TARGET:.0%} across sizes: needs two sizes or more")
    else:
        lines.append(f"- alloy's s/GB within {SPREAD_TARGET:.0%} across sizes: " + "; ".join(spreads))
        added = [f"{method} " + ", ".join(f"{k} {v:.2f}" for k, v in row["per_gb_added"].items()) for method, row in s["s_per_gb"].items() if row["per_gb_added"]]
        lines.append("  - seconds per GB added between sizes (what each run pays once taken out): " + "; ".join(added))
    t = s["ties_target"]
    if t["speedup"] is None:
        lines.append(f"- TIES at {t['size']} ≥ {t['target']:g}× mergekit: not measured in this run")
    else:
        lines.append(f"- TIES at {t['size']} ≥ {t['target']:g}× mergekit: {t['speedup']:.2f}×{_mark(t['met'])}")
    return "\n".join(lines)


def chart(sizes: list[dict], path: Path, title: str) -> None:
    """One PNG: seconds per GB read (left) and peak RSS (right) against the size, both tools."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    x = [entry["parameters"] / 1e9 for entry in sizes]
    methods = list(dict.fromkeys(r["method"] for entry in sizes for r in entry["results"]))
    colors = dict(zip(methods, ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]))
    for method in methods:
        for tool, style, marker in (("alloy", "-", "o"), ("mergekit", "--", "s")):
            pts = [(entry["parameters"] / 1e9, r) for entry in sizes for r in entry["results"] if r["method"] == method and _ok(r[tool])]
            if not pts:
                continue
            label = f"{tool if tool == 'alloy' else 'mergekit 0.1.5'} {method}"
            axes[0].plot([p for p, _ in pts], [s_per_gb(r, tool) for _, r in pts], style, marker=marker, color=colors[method], label=label)
            axes[1].plot([p for p, _ in pts], [r[tool]["peak_rss_bytes"] / 2**30 for _, r in pts], style, marker=marker, color=colors[method], label=label)
    axes[1].plot(x, [entry["rss_bound_bytes"] / 2**30 for entry in sizes], ":", marker="_", markersize=14, color="black", label="alloy's target: 1 GB + 3 × largest tensor")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlim(min(x) / 2, max(x) * 2)
        ax.set_xticks(x, [f"{entry['name']}\n{entry['parameters'] / 1e9:.2f}B" for entry in sizes])
        ax.set_yscale("log")  # mergekit's TIES costs ~10× alloy's: both tools on one axis
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("model size (parameters)")
        ax.grid(True, which="both", axis="y", alpha=0.3)
    axes[0].set_ylabel("seconds per GB read (wall)")
    axes[0].set_title(f"cost per GB, lower is better; target: alloy flat within {SPREAD_TARGET:.0%}")
    axes[1].set_ylabel("peak RSS of the process tree (GiB)")
    axes[1].set_title("peak memory, lower is better")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

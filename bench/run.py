"""modelalloy vs mergekit: the same configs, side by side, alternating; see bench/README.md.

    .venv/bin/python bench/run.py --size 1b --rss-size small

Everything generated (models, mergekit's venv, outputs) lives under .cache/bench (gitignored);
results go to bench/results/ as JSON and a PNG bar chart, and the table is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from measure import RunStats, evict, raw_read, raw_read_direct, raw_write, run_measured, wait_until_idle, weight_files  # noqa: E402
from synth import SIZES, ensure_models  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench"
MERGEKIT_VERSION = "0.1.5"
TORCH_VERSION = "2.13.0"
METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "slerp", "breadcrumbs"]
DETERMINISTIC = {"linear", "task_arithmetic", "ties", "slerp", "breadcrumbs"}
# Targets from the issue: wall time vs mergekit, and linear vs the raw-read bound.
SPEEDUP_TARGET = {"linear": 3.0, "ties": 3.0, "dare_ties": 3.0}
LINEAR_READ_TARGET = 0.70
# Agreement with mergekit: mergekit does its arithmetic in bf16 (the config's dtype), alloy in
# float32, so elements may differ by a few bf16 ulps, and TIES/breadcrumbs may keep a different
# entry where two |δ| tie after bf16 rounding. An element agrees when |a−b| ≤ 4 ulps of |b|
# plus a small absolute floor; a tensor agrees when ≤ 0.1 % of its elements do not.
ULP = 2.0**-7
AGREE_REL = 4 * ULP
AGREE_BAD_FRACTION = 1e-3
# Trimming methods keep exactly k entries by |δ|. mergekit takes δ in bf16, where a tensor's
# 10^5 entries have only ~10^3 distinct magnitudes, and picks among the entries tied at the
# threshold in torch.sort's (unstable) order; we take them in index order. Both keep k, but which
# of the tied entries differs: measured 0.1-0.4 % of a tensor's entries (the rounding of δ itself
# moves only 0.004 %). So these methods get 1 %; the rest must match to 0.1 %.
AGREE_BAD_FRACTION_TRIMMING = 1e-2
TRIMMING = {"ties", "breadcrumbs", "breadcrumbs_ties"}


def agrees(method: str, agreement: dict) -> bool:
    if "worst_bad_fraction" not in agreement:
        return False
    limit = AGREE_BAD_FRACTION_TRIMMING if method in TRIMMING else AGREE_BAD_FRACTION
    return agreement["worst_bad_fraction"] <= limit


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- mergekit's own environment


def ensure_mergekit(venv: Path) -> Path:
    """mergekit 0.1.5 in its own venv, after torch 2.13.0, with torch held there by a constraint."""
    exe = venv / "bin" / "mergekit-yaml"
    python = venv / "bin" / "python"
    if not exe.exists():
        log(f"installing mergekit {MERGEKIT_VERSION} into {venv} (once)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run(pip + [f"torch=={TORCH_VERSION}"], check=True)
        constraints = venv / "constraints.txt"
        constraints.write_text(f"torch=={TORCH_VERSION}\n")  # mergekit must not pull another torch
        subprocess.run(pip + ["-c", str(constraints), f"mergekit=={MERGEKIT_VERSION}"], check=True)
    found = subprocess.run([str(python), "-c", "import torch, importlib.metadata as m; print(torch.__version__, m.version('mergekit'))"], check=True, capture_output=True, text=True).stdout.split()
    if not found[0].startswith(TORCH_VERSION) or found[1] != MERGEKIT_VERSION:
        raise SystemExit(f"{venv}: expected torch {TORCH_VERSION} and mergekit {MERGEKIT_VERSION}, found {found}; delete the venv to reinstall")
    return exe


def alloy_has(method: str) -> bool:
    from modelalloy.methods import REGISTRY

    return method in REGISTRY


# ---------------------------------------------------------------- configs


def make_config(method: str, models: dict[str, Path]) -> dict:
    base, ft = str(models["base"]), [str(p) for n, p in models.items() if n != "base"]
    common = {"dtype": "bfloat16"}
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in [base, *ft]], **common}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": ft[0]}], "parameters": {"t": 0.5}, **common}
    per_model = {
        "task_arithmetic": {"weight": 0.5},
        "ties": {"weight": 0.5, "density": 0.5},
        "dare_ties": {"weight": 0.5, "density": 0.5},
        "breadcrumbs": {"weight": 0.5, "density": 0.5, "gamma": 0.01},
    }[method]
    return {"merge_method": method, "base_model": base, "models": [{"model": base}] + [{"model": m, "parameters": dict(per_model)} for m in ft], **common}


def config_inputs(config: dict) -> list[Path]:
    refs = {m["model"] for m in config["models"]} | ({config["base_model"]} if "base_model" in config else set())
    return [f for ref in sorted(refs) for f in weight_files(Path(ref))]


# ---------------------------------------------------------------- runs


def tool_command(tool: str, config_file: Path, out: Path, mergekit_exe: Path, threads: int) -> list[str]:
    if tool == "alloy":
        return [str(Path(sys.executable).parent / "alloy"), "merge", str(config_file), str(out), "--force", "--quiet", "-j", str(threads)]
    # mergekit's defaults, except the tokenizer: the synthetic models have none to copy.
    return [str(mergekit_exe), str(config_file), str(out), "--no-copy-tokenizer", "--allow-crimes"]


CACHE_MODE = {"mode": "cold"}


def prepare_cache(inputs: list[Path]) -> None:
    """cold: evict the inputs from the page cache; warm: read them once, so every run finds them cached."""
    if CACHE_MODE["mode"] == "cold":
        evict(inputs)
    else:
        raw_read(inputs)


def run_one(tool: str, method: str, config_file: Path, inputs: list[Path], out: Path, mergekit_exe: Path, threads: int, logs: Path) -> RunStats:
    shutil.rmtree(out, ignore_errors=True)
    # Every run starts from the same state: the page cache as the mode says, and nothing left to
    # write back (mergekit leaves its 2.2 GB output to the kernel, which would otherwise flush it
    # to the disk during the next tool's run).
    os.sync()
    prepare_cache(inputs)
    waited = wait_until_idle()
    if waited > 5:
        log(f"{tool} {method}: waited {waited:.0f}s for the machine to be idle")
    stats = run_measured(tool_command(tool, config_file, out, mergekit_exe, threads), log_file=logs / f"{tool}-{method}.log")
    if stats.returncode != 0:
        log(f"{tool} {method} failed (exit {stats.returncode}):\n{stats.stderr_tail}")
    return stats


def output_bytes(out: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(out))


def compare_outputs(a: Path, b: Path) -> dict:
    """Element-wise agreement of two checkpoints, tensor by tensor (see AGREE_REL)."""
    def index(d: Path) -> dict[str, Path]:
        names = {}
        for f in weight_files(d):
            with safe_open(str(f), "pt") as s:
                names.update({k: f for k in s.keys()})
        return names

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return {"agree": False, "why": f"tensor names differ: only alloy {sorted(set(ia) - set(ib))[:3]}, only mergekit {sorted(set(ib) - set(ia))[:3]}"}
    worst_fraction, worst_rel_l2, worst_name, total_bad, total = 0.0, 0.0, "", 0, 0
    for name in sorted(ia):
        with safe_open(str(ia[name]), "pt") as s:
            x = s.get_tensor(name).float()
        with safe_open(str(ib[name]), "pt") as s:
            y = s.get_tensor(name).float()
        if x.shape != y.shape:
            return {"agree": False, "why": f"{name}: shape {list(x.shape)} vs {list(y.shape)}"}
        diff = (x - y).abs()
        floor = ULP * float(y.pow(2).mean().sqrt())  # a bf16 ulp of the tensor's typical entry
        bad = int((diff > AGREE_REL * y.abs() + floor).sum())
        rel_l2 = float(diff.norm() / y.norm().clamp_min(1e-30))
        total_bad += bad
        total += y.numel()
        if bad / y.numel() > worst_fraction or (worst_name == "" and rel_l2 >= worst_rel_l2):
            worst_fraction, worst_name = bad / y.numel(), name
        worst_rel_l2 = max(worst_rel_l2, rel_l2)
    return {
        "worst_tensor": worst_name,
        "worst_bad_fraction": worst_fraction,
        "bad_fraction": total_bad / total,
        "worst_relative_l2": worst_rel_l2,
    }


def run_method(method: str, models: dict[str, Path], work: Path, mergekit_exe: Path, threads: int, order: list[str], reps: int, check: bool) -> dict:
    config = make_config(method, models)
    config_file = work / f"{method}.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    inputs = config_inputs(config)
    input_bytes = sum(f.stat().st_size for f in inputs)
    output_estimate = sum(f.stat().st_size for f in weight_files(Path(config["models"][0]["model"])))  # same architecture and dtype
    available = {"alloy": alloy_has(method), "mergekit": True}
    result: dict = {"method": method, "input_bytes": input_bytes, "runs": {t: [] for t in order}}
    for rep in range(reps):
        for tool in order if rep % 2 == 0 else order[::-1]:
            if not available[tool]:
                continue
            raw_s = None
            if tool == "alloy":
                # The raw-read bound in the same conditions, right before the run it bounds: this
                # VM's disk reads the same files in 2.6 s or in 10 s from one minute to the next.
                # Two ways: plain reads (one reader, through the page cache) and direct reads
                # (eight in flight, no page cache); the bound is the faster.
                prepare_cache(inputs)
                wait_until_idle()
                plain_s, raw_bytes = raw_read(inputs)
                prepare_cache(inputs)
                wait_until_idle()
                direct_s = raw_read_direct(inputs)
                raw_s = min(plain_s, direct_s or plain_s)
                log(f"{method}: raw read {raw_bytes / 1e9:.2f} GB in {plain_s:.2f}s plain, " + (f"{direct_s:.2f}s direct" if direct_s else "no direct I/O"))
            out = work / f"out-{tool}-{method}"
            stats = run_one(tool, method, config_file, inputs, out, mergekit_exe, threads, work)
            run = {"wall_s": stats.wall_s, "cpu_s": stats.cpu_s, "peak_rss_bytes": stats.peak_rss_bytes, "ok": stats.returncode == 0}
            if raw_s is not None:
                # Then, after the run (writing before it slowed the run down: the file system
                # discards deleted blocks), the time to write an output's worth of bytes durably:
                # reading the inputs and writing the output share one disk here, and the two
                # together are the floor.
                write_s = raw_write(work, output_estimate)
                log(f"{method}: raw write {output_estimate / 1e9:.2f} GB in {write_s:.2f}s")
                run["raw_read_s"], run["raw_read_plain_s"], run["raw_read_direct_s"], run["raw_write_s"] = raw_s, plain_s, direct_s, write_s
            run["output_bytes"] = output_bytes(out) if stats.returncode == 0 else 0
            result["runs"][tool].append(run)
            log(f"{method}: {tool:8s} {stats.wall_s:7.2f}s wall {stats.cpu_s:7.2f}s cpu {stats.peak_rss_bytes / 2**30:5.2f} GiB peak RSS" + ("" if stats.returncode == 0 else "  FAILED"))
    for tool in order:
        runs = [r for r in result["runs"][tool] if r["ok"]]
        if not available[tool]:
            result[tool] = {"available": False, "note": "not available in this build"}
        elif not runs:
            result[tool] = {"available": True, "ok": False}
        else:
            best = min(runs, key=lambda r: r["wall_s"])  # best of reps: the least disturbed by neighbours
            result[tool] = {
                "available": True,
                "ok": True,
                **best,
                "input_throughput_gbs": input_bytes / best["wall_s"] / 1e9,
                "output_throughput_gbs": best["output_bytes"] / best["wall_s"] / 1e9,
            }
    a, m = result["alloy"], result["mergekit"]
    if a.get("ok"):
        result["raw_read_s"] = a.pop("raw_read_s")  # the read before alloy's best run
        result["raw_read_plain_s"], result["raw_read_direct_s"] = a.pop("raw_read_plain_s"), a.pop("raw_read_direct_s")
        result["raw_write_s"] = a.pop("raw_write_s")
        result["alloy_vs_raw_read"] = result["raw_read_s"] / a["wall_s"]  # fraction of the bound reached
        result["alloy_vs_read_write"] = (result["raw_read_s"] + result["raw_write_s"]) / a["wall_s"]
    if a.get("ok") and m.get("ok"):
        result["speedup_vs_mergekit"] = m["wall_s"] / a["wall_s"]
        result["wall_ratio"] = a["wall_s"] / m["wall_s"]
        result["cpu_ratio"] = a["cpu_s"] / m["cpu_s"]
        result["rss_ratio"] = a["peak_rss_bytes"] / m["peak_rss_bytes"]
        if check and method in DETERMINISTIC:
            result["agreement"] = compare_outputs(work / f"out-alloy-{method}", work / f"out-mergekit-{method}")
            result["agreement"]["agree"] = agrees(method, result["agreement"])
            log(f"{method}: agreement {result['agreement']}")
    for tool in order:
        shutil.rmtree(work / f"out-{tool}-{method}", ignore_errors=True)  # keep disk use down
    return result


def rss_check(size_name: str, models: dict[str, Path], work: Path, threads: int, methods: list[str]) -> dict:
    """alloy alone on another model size: peak RSS against 1 GB + 3 × the largest tensor."""
    size = SIZES[size_name]
    bound = 10**9 + 3 * size.largest_tensor_bytes
    rows = {}
    for method in methods:
        if not alloy_has(method):
            continue
        config = make_config(method, models)
        config_file = work / f"{size_name}-{method}.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        out = work / f"out-rss-{size_name}-{method}"
        stats = run_one("alloy", f"{size_name}-{method}", config_file, config_inputs(config), out, Path(), threads, work)
        shutil.rmtree(out, ignore_errors=True)
        rows[method] = {"peak_rss_bytes": stats.peak_rss_bytes, "wall_s": stats.wall_s, "ok": stats.returncode == 0, "within_bound": stats.peak_rss_bytes <= bound}
        log(f"rss {size_name} {method}: {stats.peak_rss_bytes / 2**30:.2f} GiB (bound {bound / 2**30:.2f} GiB)")
    return {"size": size_name, "parameters": size.parameters, "largest_tensor_bytes": size.largest_tensor_bytes, "bound_bytes": bound, "methods": rows}


# ---------------------------------------------------------------- report


def table(results: list[dict], rss: list[dict]) -> str:
    head = "| method | alloy s | mergekit s | alloy / mergekit (wall) | speed-up | raw read s: plain / direct | alloy / raw-read bound | alloy / read+write bound | alloy CPU s | mergekit CPU s | alloy peak RSS | mergekit peak RSS | alloy out GB/s | agrees with mergekit |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        a, m = r["alloy"], r["mergekit"]
        if not a.get("available", True):
            lines.append(f"| {r['method']} | {a['note']} | {m.get('wall_s', float('nan')):.1f} | – | – | – | – | – | – | {m.get('cpu_s', float('nan')):.1f} | – | {m.get('peak_rss_bytes', 0) / 2**30:.2f} GiB | – | – |")
            continue
        if not (a.get("ok") and m.get("ok")):
            def cell(x: dict) -> str:
                return f"{x['wall_s']:.1f}" if x.get("ok") else "failed"

            lines.append(f"| {r['method']} | {cell(a)} | {cell(m)} | – | – | – | – | – | – | – | – | – | – | – |")
            continue
        agree = r.get("agreement")
        agree_text = "n/a (random)" if agree is None else ("yes" if agrees(r["method"], agree) else "NO") + f" (worst tensor {agree.get('worst_bad_fraction', 1):.1e} off, rel L2 {agree.get('worst_relative_l2', 1):.1e})"
        target = SPEEDUP_TARGET.get(r["method"])
        speed = f"{r['speedup_vs_mergekit']:.2f}×" + ("" if target is None else (" ✓" if r["speedup_vs_mergekit"] >= target else " ✗ (< 3×)"))
        direct = r.get("raw_read_direct_s")
        reads = f"{r['raw_read_plain_s']:.1f} / " + (f"{direct:.1f}" if direct else "–")
        bound = f"{r['alloy_vs_raw_read']:.0%}" + ((" ✓" if r["alloy_vs_raw_read"] >= LINEAR_READ_TARGET else " ✗ (< 70 %)") if r["method"] == "linear" else "")
        lines.append(
            f"| {r['method']} | {a['wall_s']:.1f} | {m['wall_s']:.1f} | {r['wall_ratio']:.2f} | {speed} | {reads} | {bound} | {r['alloy_vs_read_write']:.0%} | {a['cpu_s']:.1f} | {m['cpu_s']:.1f} | "
            f"{a['peak_rss_bytes'] / 2**30:.2f} GiB | {m['peak_rss_bytes'] / 2**30:.2f} GiB | {a['output_throughput_gbs']:.3f} | {agree_text} |"
        )
    for check in rss:
        lines.append("")
        lines.append(f"Peak RSS of alloy at {check['size']} ({check['parameters'] / 1e9:.2f}B parameters, largest tensor {check['largest_tensor_bytes'] / 2**20:.0f} MiB): bound 1 GB + 3 × largest = {check['bound_bytes'] / 2**30:.2f} GiB")
        lines.append("")
        lines.append("| method | peak RSS | within bound |")
        lines.append("|---|---|---|")
        for method, row in check["methods"].items():
            lines.append(f"| {method} | {row['peak_rss_bytes'] / 2**30:.2f} GiB | {'yes' if row['within_bound'] else 'NO'} |")
    return "\n".join(lines)


def chart(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(names))
    alloy = [r["alloy"].get("wall_s", 0) if r["alloy"].get("ok") else 0 for r in results]
    mk = [r["mergekit"].get("wall_s", 0) if r["mergekit"].get("ok") else 0 for r in results]
    raw = [r.get("raw_read_s", 0.0) for r in results]
    w = 0.27
    axes[0].bar([i - w for i in x], mk, w, label="mergekit 0.1.5", color="#999999")
    axes[0].bar(list(x), alloy, w, label="alloy", color="#1f77b4")
    axes[0].bar([i + w for i in x], raw, w, label="raw read of the inputs", color="#2ca02c")
    write = [r.get("raw_write_s", 0.0) for r in results]
    axes[0].bar([i + w for i in x], write, w, bottom=raw, label="+ durable write of the output", color="#98df8a")
    for i, r in enumerate(results):
        if not r["alloy"].get("available", True):
            axes[0].text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
    axes[0].set_xticks(list(x), names, rotation=20)
    axes[0].set_ylabel("wall time (s)")
    axes[0].set_title("wall time, lower is better")
    axes[0].legend()
    speed = [r.get("speedup_vs_mergekit", 0) for r in results]
    axes[1].bar(list(x), speed, color="#1f77b4")
    axes[1].axhline(3.0, color="red", linestyle="--", label="3× target")
    axes[1].set_xticks(list(x), names, rotation=20)
    axes[1].set_ylabel("mergekit wall / alloy wall")
    axes[1].set_title("speed-up over mergekit, higher is better")
    axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1b", choices=sorted(SIZES), help="model size for the comparison")
    ap.add_argument("--rss-size", action="append", default=None, choices=sorted(SIZES), help="also check alloy's peak RSS at this size (repeatable)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--reps", type=int, default=1, help="runs per tool and method (the best is reported)")
    ap.add_argument("--threads", type=int, default=2, help="alloy --threads")
    ap.add_argument("--variants", type=int, default=2, help="fine-tunes besides the base")
    ap.add_argument("--no-check", action="store_true", help="skip comparing alloy's outputs with mergekit's")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--cache", choices=["cold", "warm"], default="cold", help="cold: inputs evicted from the page cache before every run (disk-bound); warm: read once before every run (CPU-bound)")
    ap.add_argument("--report-from", type=Path, help="only re-render the table and chart of a saved JSON")
    args = ap.parse_args(argv)
    CACHE_MODE["mode"] = args.cache
    if args.report_from:
        saved = json.loads(args.report_from.read_text())
        text = table(saved["results"], saved["rss_checks"])
        args.report_from.with_suffix(".md").write_text(text + "\n")
        s = saved["size"]
        chart(saved["results"], args.report_from.with_suffix(".png"), f"{s['name']} Llama ({s['parameters'] / 1e9:.2f}B bf16), {s['models']} models, {saved['machine']['cpus']} cores, page cache {'cold' if 'evicted' in saved['page_cache'] else 'warm'}")
        print(text)
        return 0
    methods = [m for m in args.methods.split(",") if m]
    CACHE.mkdir(parents=True, exist_ok=True)
    mergekit_exe = ensure_mergekit(CACHE / "mergekit-venv")
    size = SIZES[args.size]
    models = ensure_models(CACHE / "models", size, args.variants, log=log)
    work = CACHE / f"work-{size.name}"  # configs, logs and outputs; one folder per size
    work.mkdir(exist_ok=True)
    log(f"{size.name}: {size.parameters / 1e9:.2f}B parameters, {len(models)} models; methods {methods}")
    results: list[dict] = []
    rss: list[dict] = []
    for i, method in enumerate(methods):
        order = ["alloy", "mergekit"] if i % 2 == 0 else ["mergekit", "alloy"]  # alternate who goes first
        results.append(run_method(method, models, work, mergekit_exe, args.threads, order, args.reps, not args.no_check))
        write_report(args, size, models, results, rss)  # after each method: a long run leaves partial results
    for extra in args.rss_size or []:
        extra_models = ensure_models(CACHE / "models", SIZES[extra], args.variants, log=log)
        rss.append(rss_check(extra, extra_models, work, args.threads, methods))
    print(write_report(args, size, models, results, rss))
    return 0


def write_report(args, size, models: dict, results: list[dict], extra_rss: list[dict]) -> str:
    bound = 10**9 + 3 * size.largest_tensor_bytes
    rss = list(extra_rss)
    rss.insert(0, {
        "size": size.name,
        "parameters": size.parameters,
        "largest_tensor_bytes": size.largest_tensor_bytes,
        "bound_bytes": bound,
        "methods": {r["method"]: {"peak_rss_bytes": r["alloy"]["peak_rss_bytes"], "within_bound": r["alloy"]["peak_rss_bytes"] <= bound} for r in results if r["alloy"].get("ok")},
    })
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cpus": os.cpu_count(), "memory_bytes": __import__("psutil").virtual_memory().total, "platform": platform.platform(), "load_avg_at_end": os.getloadavg()},
        "size": {"name": size.name, "parameters": size.parameters, "models": len(models), "largest_tensor_bytes": size.largest_tensor_bytes},
        "versions": {"mergekit": MERGEKIT_VERSION, "torch": torch.__version__},
        "page_cache": "inputs evicted with posix_fadvise(DONTNEED) before every run and before the raw read" if args.cache == "cold" else "inputs read once before every run and before the raw read (page cache warm)",
        "alloy_threads": args.threads,
        "results": results,
        "rss_checks": rss,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{size.name}" + ("-warm" if args.cache == "warm" else "")
    (args.results / f"{stem}.json").write_text(json.dumps(report, indent=2))
    text = table(results, rss)
    (args.results / f"{stem}.md").write_text(text + "\n")
    chart(results, args.results / f"{stem}.png", f"{size.name} Llama ({size.parameters / 1e9:.2f}B bf16), {len(models)} models, {os.cpu_count()} cores, page cache {args.cache}")
    return text


if __name__ == "__main__":
    sys.exit(main())

"""modelalloy vs mergekit: the same configs, side by side, alternating; see bench/README.md.

    .venv/bin/python bench/run.py --size 1b --rss-size small
    .venv/bin/python bench/run.py --sizes tiny,1b,7b --mergekit-methods 7b=linear,ties   # the scaling curve

Everything generated (models, mergekit's venv, outputs) lives under .cache/bench (gitignored);
results go to bench/results/ as JSON and a PNG chart, and the table is printed. Before anything
is written, the free disk space is checked against what the run needs (exit 2 if short).
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
from measure import RunStats, evict, raw_read, raw_read_direct, raw_write, raw_write_direct, run_measured, wait_until_idle, weight_files  # noqa: E402
import scaling  # noqa: E402
from scaling import gib, secs  # noqa: E402
from synth import SIZES, LlamaSize, bytes_to_generate, ensure_models  # noqa: E402

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


def rss_bound(size: LlamaSize) -> int:
    """The peak-RSS target of alloy at a size: 1 GB + 3 × the largest tensor."""
    return 10**9 + 3 * size.largest_tensor_bytes


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


def run_method(method: str, models: dict[str, Path], work: Path, mergekit_exe: Path, threads: int, order: list[str], reps: int, check: bool, with_mergekit: bool = True) -> dict:
    config = make_config(method, models)
    config_file = work / f"{method}.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    inputs = config_inputs(config)
    input_bytes = sum(f.stat().st_size for f in inputs)
    output_estimate = sum(f.stat().st_size for f in weight_files(Path(config["models"][0]["model"])))  # same architecture and dtype
    available = {"alloy": alloy_has(method), "mergekit": with_mergekit}
    compare = check and method in DETERMINISTIC and all(available.values())
    agreement = None
    result: dict = {"method": method, "input_bytes": input_bytes, "runs": {t: [] for t in order}}
    for rep in range(reps):
        ran: set[str] = set()  # the tools that have run in this repetition
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
                # together are the floor. At most two outputs' worth lie on the disk at once (a
                # 7B's are 13.5 GB each): mergekit's output, if there, goes first, compared
                # with this one if both are the last repetition's.
                other = work / f"out-mergekit-{method}"
                if other.exists():
                    if compare and rep == reps - 1 and "mergekit" in ran and stats.returncode == 0:
                        agreement = compare_outputs(out, other)
                    shutil.rmtree(other)
                # Both ways again, the faster counting: through the page cache, and direct.
                write_plain_s = raw_write(work, output_estimate)
                write_direct_s = raw_write_direct(work, output_estimate)
                write_s = min(write_plain_s, write_direct_s or write_plain_s)
                log(f"{method}: raw write {output_estimate / 1e9:.2f} GB in {write_plain_s:.2f}s plain, " + (f"{write_direct_s:.2f}s direct" if write_direct_s else "no direct I/O"))
                run["raw_read_s"], run["raw_read_plain_s"], run["raw_read_direct_s"] = raw_s, plain_s, direct_s
                run["raw_write_s"], run["raw_write_plain_s"], run["raw_write_direct_s"] = write_s, write_plain_s, write_direct_s
            run["output_bytes"] = output_bytes(out) if stats.returncode == 0 else 0
            result["runs"][tool].append(run)
            ran.add(tool)
            log(f"{method}: {tool:8s} {stats.wall_s:7.2f}s wall {stats.cpu_s:7.2f}s cpu {stats.peak_rss_bytes / 2**30:5.2f} GiB peak RSS" + ("" if stats.returncode == 0 else "  FAILED"))
    for tool in order:
        runs = [r for r in result["runs"][tool] if r["ok"]]
        if not available[tool]:
            result[tool] = {"available": False, "note": "not available in this build" if tool == "alloy" else "not run at this size"}
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
        result["raw_write_s"], result["raw_write_plain_s"], result["raw_write_direct_s"] = a.pop("raw_write_s"), a.pop("raw_write_plain_s"), a.pop("raw_write_direct_s")
        result["alloy_vs_raw_read"] = result["raw_read_s"] / a["wall_s"]  # fraction of the bound reached
        result["alloy_vs_read_write"] = (result["raw_read_s"] + result["raw_write_s"]) / a["wall_s"]
    if a.get("ok") and m.get("ok"):
        result["speedup_vs_mergekit"] = m["wall_s"] / a["wall_s"]
        result["wall_ratio"] = a["wall_s"] / m["wall_s"]
        result["cpu_ratio"] = a["cpu_s"] / m["cpu_s"]
        result["rss_ratio"] = a["peak_rss_bytes"] / m["peak_rss_bytes"]
        if compare:
            if agreement is None:  # alloy ran first in the last repetition
                agreement = compare_outputs(work / f"out-alloy-{method}", work / f"out-mergekit-{method}")
            result["agreement"] = agreement
            result["agreement"]["agree"] = agrees(method, result["agreement"])
            log(f"{method}: agreement {result['agreement']}")
    for tool in order:
        shutil.rmtree(work / f"out-{tool}-{method}", ignore_errors=True)  # keep disk use down
    return result


def rss_check(size_name: str, models: dict[str, Path], work: Path, threads: int, methods: list[str]) -> dict:
    """alloy alone on another model size: peak RSS against 1 GB + 3 × the largest tensor."""
    size = SIZES[size_name]
    bound = rss_bound(size)
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
    head = "| method | alloy s | mergekit s | alloy / mergekit (wall) | speed-up | raw read s: plain / direct | raw write s: plain / direct | alloy / raw-read bound | alloy / read+write bound | alloy CPU s | mergekit CPU s | alloy peak RSS | mergekit peak RSS | alloy out GB/s | agrees with mergekit |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        a, m = r["alloy"], r["mergekit"]
        if not a.get("available", True):
            lines.append(f"| {r['method']} | {a['note']} | {m.get('wall_s', float('nan')):.1f} | – | – | – | – | – | – | – | {m.get('cpu_s', float('nan')):.1f} | – | {m.get('peak_rss_bytes', 0) / 2**30:.2f} GiB | – | – |")
            continue
        both = a.get("ok") and m.get("ok")
        agree = r.get("agreement")
        agree_text = "–" if not both else "n/a (random)" if agree is None else ("yes" if agrees(r["method"], agree) else "NO") + f" (worst tensor {agree.get('worst_bad_fraction', 1):.1e} off, rel L2 {agree.get('worst_relative_l2', 1):.1e})"
        target = SPEEDUP_TARGET.get(r["method"])
        speed = "–" if not both else f"{r['speedup_vs_mergekit']:.2f}×" + ("" if target is None else (" ✓" if r["speedup_vs_mergekit"] >= target else " ✗ (< 3×)"))
        ratio = f"{r['wall_ratio']:.2f}" if both else "–"
        if a.get("ok"):
            direct = r.get("raw_read_direct_s")
            reads = f"{r['raw_read_plain_s']:.1f} / " + (f"{direct:.1f}" if direct else "–")
            write_direct = r.get("raw_write_direct_s")
            writes = f"{r.get('raw_write_plain_s', r['raw_write_s']):.1f} / " + (f"{write_direct:.1f}" if write_direct else "–")
            bound = f"{r['alloy_vs_raw_read']:.0%}" + ((" ✓" if r["alloy_vs_raw_read"] >= LINEAR_READ_TARGET else " ✗ (< 70 %)") if r["method"] == "linear" else "")
            read_write, out_gbs = f"{r['alloy_vs_read_write']:.0%}", f"{a['output_throughput_gbs']:.3f}"
        else:
            reads = writes = bound = read_write = out_gbs = "–"
        lines.append(
            f"| {r['method']} | {secs(a, 'wall_s')} | {secs(m, 'wall_s')} | {ratio} | {speed} | {reads} | {writes} | {bound} | {read_write} | "
            f"{secs(a, 'cpu_s')} | {secs(m, 'cpu_s')} | {gib(a)} | {gib(m)} | {out_gbs} | {agree_text} |"
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


# ---------------------------------------------------------------- disk space

# What a run writes besides the models and the outputs: logs, configs, results, the file system's slack.
DISK_MARGIN_BYTES = 10**9
# mergekit's venv, as ensure_mergekit installs it (torch's CPU build and mergekit: 1.6 GB measured).
MERGEKIT_VENV_BYTES = 2 * 10**9


def disk_needs(run_sizes: list[str], rss_sizes: list[str], variants: int) -> dict[str, int]:
    """The free space a run needs under CACHE, by part, in bytes: the models not yet generated,
    and the outputs on the disk at once. run_method keeps at most two outputs' worth there (alloy's
    and mergekit's, or alloy's and the raw write's); the RSS check one (alloy's alone)."""
    needs = {}
    for name in dict.fromkeys(run_sizes + rss_sizes):
        missing = bytes_to_generate(CACHE / "models", SIZES[name], variants)
        if missing:
            needs[f"{name} models to generate"] = missing
    needs["outputs at once"] = max([2 * SIZES[n].model_bytes for n in run_sizes] + [SIZES[n].model_bytes for n in rss_sizes])
    if not (CACHE / "mergekit-venv" / "bin" / "mergekit-yaml").exists():
        needs["mergekit's venv"] = MERGEKIT_VENV_BYTES
    needs["margin"] = DISK_MARGIN_BYTES
    return needs


def _disk_root() -> Path:
    """CACHE, or its nearest existing parent: CACHE itself is only made once the run may start."""
    where = CACHE
    while not where.exists():
        where = where.parent
    return where


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def disk_refusal(needs: dict[str, int]) -> str | None:
    """None when the file system holding CACHE has room for `needs`; else the one line saying why not."""
    free = shutil.disk_usage(_disk_root()).free
    need = sum(needs.values())
    if need <= free:
        return None
    parts = ", ".join(f"{k} {v / 1e9:.1f} GB" for k, v in needs.items())
    return f"bench: not enough disk space for this run under {_shown(CACHE)}: needs {need / 1e9:.1f} GB ({parts}), {free / 1e9:.1f} GB free"


def plan_text(run_sizes: list[str], rss_sizes: list[str], methods: list[str], mergekit_methods: dict[str, list[str]], variants: int, needs: dict[str, int]) -> str:
    """What a run would generate and run, and the disk it needs; nothing is written."""
    lines = []
    for name in dict.fromkeys(run_sizes + rss_sizes):
        size = SIZES[name]
        shards = " + ".join(f"{sum(math.prod(s) * 2 for _, s in shard) / 1e9:.2f}" for shard in size.shards())
        lines.append(
            f"{name}: {size.parameters / 1e9:.2f}B parameters, {len(size.tensor_shapes())} tensors, largest {size.largest_tensor_bytes / 1e6:.0f} MB "
            f"(alloy's RSS target {rss_bound(size) / 2**30:.2f} GiB); a model is {size.model_bytes / 1e9:.2f} GB in {len(size.shards())} shard{'s' if len(size.shards()) > 1 else ''} ({shards} GB); "
            f"{variants + 1} models, {bytes_to_generate(CACHE / 'models', size, variants) / 1e9:.2f} GB still to generate"
        )
        if name in run_sizes:
            lines.append(f"  alloy: {', '.join(methods)}; mergekit: {', '.join(mergekit_methods.get(name, methods)) or 'none'}")
        else:
            lines.append(f"  alloy alone (peak RSS): {', '.join(methods)}")
    parts = ", ".join(f"{k} {v / 1e9:.1f} GB" for k, v in needs.items())
    lines.append(f"disk: needs {sum(needs.values()) / 1e9:.1f} GB ({parts}), {shutil.disk_usage(_disk_root()).free / 1e9:.1f} GB free under {_shown(CACHE)}")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def run_methods(args, methods: list[str], models: dict[str, Path], work: Path, mergekit_exe: Path, mergekit_methods: list[str], after_each) -> list[dict]:
    """Every method at one size, alternating who goes first from method to method; `after_each`
    (the partial results) is called after each method, so a long run leaves its results so far."""
    results: list[dict] = []
    for i, method in enumerate(methods):
        order = ["alloy", "mergekit"] if i % 2 == 0 else ["mergekit", "alloy"]  # alternate who goes first
        results.append(run_method(method, models, work, mergekit_exe, args.threads, order, args.reps, not args.no_check, with_mergekit=method in mergekit_methods))
        after_each(results)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default=None, choices=sorted(SIZES), help="model size for the comparison (default 1b)")
    ap.add_argument("--rss-size", action="append", default=None, choices=sorted(SIZES), help="also check alloy's peak RSS at this size (repeatable)")
    ap.add_argument("--sizes", help="the scaling curve: every method at each of these sizes (comma-separated, e.g. tiny,1b,7b); writes bench-scaling.*")
    ap.add_argument("--mergekit-methods", action="append", metavar="SIZE=METHODS", help="with --sizes: the methods mergekit runs at SIZE (default: all; e.g. 7b=linear,ties; repeatable)")
    ap.add_argument("--methods", default=None, help=f"comma-separated (default: {','.join(METHODS)}; with --sizes {','.join(scaling.METHODS)})")
    ap.add_argument("--reps", type=int, default=1, help="runs per tool and method (the best is reported)")
    ap.add_argument("--threads", type=int, default=2, help="alloy --threads")
    ap.add_argument("--variants", type=int, default=2, help="fine-tunes besides the base")
    ap.add_argument("--no-check", action="store_true", help="skip comparing alloy's outputs with mergekit's")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--cache", choices=["cold", "warm"], default="cold", help="cold: inputs evicted from the page cache before every run (disk-bound); warm: read once before every run (CPU-bound)")
    ap.add_argument("--plan", action="store_true", help="print what the run would generate and run, and the disk it needs; write nothing")
    ap.add_argument("--report-from", type=Path, help="only re-render the table and chart of a saved JSON")
    args = ap.parse_args(argv)
    CACHE_MODE["mode"] = args.cache
    if args.report_from:
        saved = json.loads(args.report_from.read_text())
        if "sizes" in saved:
            text = scaling_report_text(saved["sizes"])
            scaling.chart(saved["sizes"], args.report_from.with_suffix(".png"), scaling_title(saved))
        else:
            text = table(saved["results"], saved["rss_checks"])
            s = saved["size"]
            chart(saved["results"], args.report_from.with_suffix(".png"), f"{s['name']} Llama ({s['parameters'] / 1e9:.2f}B bf16), {s['models']} models, {saved['machine']['cpus']} cores, page cache {'cold' if 'evicted' in saved['page_cache'] else 'warm'}")
        args.report_from.with_suffix(".md").write_text(text + "\n")
        print(text)
        return 0
    methods = [m for m in (args.methods or ",".join(scaling.METHODS if args.sizes else METHODS)).split(",") if m]
    if args.sizes:
        if args.size or args.rss_size:
            ap.error("--sizes measures every size in full (peak RSS included): drop --size and --rss-size")
        run_sizes, rss_sizes = [s for s in args.sizes.split(",") if s], []
        unknown = [s for s in run_sizes if s not in SIZES]
        if unknown or not run_sizes:
            ap.error(f"--sizes: unknown size(s) {', '.join(unknown)}; choose from {', '.join(SIZES)}")
        try:
            mergekit_methods = scaling.parse_mergekit_methods(args.mergekit_methods, run_sizes, methods)
        except ValueError as e:
            ap.error(str(e))
    else:
        if args.mergekit_methods:
            ap.error("--mergekit-methods goes with --sizes")
        run_sizes, rss_sizes = [args.size or "1b"], args.rss_size or []
        mergekit_methods = {run_sizes[0]: methods}
    # Before anything is written (the venv, the models): is there room for all of it?
    needs = disk_needs(run_sizes, rss_sizes, args.variants)
    refusal = disk_refusal(needs)
    if args.plan:
        print(plan_text(run_sizes, rss_sizes, methods, mergekit_methods, args.variants, needs))
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    if args.plan:
        return 0
    if args.cache == "warm":
        memory = __import__("psutil").virtual_memory().total
        for name in run_sizes:
            if (args.variants + 1) * SIZES[name].model_bytes > memory:
                log(f"warning: {name}'s inputs ({(args.variants + 1) * SIZES[name].model_bytes / 1e9:.1f} GB) do not fit in this machine's memory ({memory / 1e9:.1f} GB): they cannot stay cached, so 'warm' runs there read the disk")
    CACHE.mkdir(parents=True, exist_ok=True)
    mergekit_exe = ensure_mergekit(CACHE / "mergekit-venv")
    if args.sizes:
        print(run_scaling(args, run_sizes, methods, mergekit_methods, mergekit_exe))
        return 0
    size = SIZES[run_sizes[0]]
    models = ensure_models(CACHE / "models", size, args.variants, log=log)
    work = CACHE / f"work-{size.name}"  # configs, logs and outputs; one folder per size
    work.mkdir(exist_ok=True)
    log(f"{size.name}: {size.parameters / 1e9:.2f}B parameters, {len(models)} models; methods {methods}")
    rss: list[dict] = []
    results = run_methods(args, methods, models, work, mergekit_exe, methods, lambda partial: write_report(args, size, models, partial, rss))
    for extra in rss_sizes:
        extra_models = ensure_models(CACHE / "models", SIZES[extra], args.variants, log=log)
        rss.append(rss_check(extra, extra_models, work, args.threads, methods))
    print(write_report(args, size, models, results, rss))
    return 0


def run_info(args) -> dict:
    """What every report records about the machine, the versions and the conditions."""
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cpus": os.cpu_count(), "memory_bytes": __import__("psutil").virtual_memory().total, "platform": platform.platform(), "load_avg_at_end": os.getloadavg()},
        "versions": {"mergekit": MERGEKIT_VERSION, "torch": torch.__version__},
        "page_cache": "inputs evicted with posix_fadvise(DONTNEED) before every run and before the raw read" if args.cache == "cold" else "inputs read once before every run and before the raw read (page cache warm)",
        "alloy_threads": args.threads,
    }


def write_report(args, size, models: dict, results: list[dict], extra_rss: list[dict]) -> str:
    bound = rss_bound(size)
    rss = list(extra_rss)
    rss.insert(0, {
        "size": size.name,
        "parameters": size.parameters,
        "largest_tensor_bytes": size.largest_tensor_bytes,
        "bound_bytes": bound,
        "methods": {r["method"]: {"peak_rss_bytes": r["alloy"]["peak_rss_bytes"], "within_bound": r["alloy"]["peak_rss_bytes"] <= bound} for r in results if r["alloy"].get("ok")},
    })
    info = run_info(args)
    report = {
        "when": info.pop("when"),
        "machine": info.pop("machine"),
        "size": {"name": size.name, "parameters": size.parameters, "models": len(models), "largest_tensor_bytes": size.largest_tensor_bytes},
        **info,
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


# ---------------------------------------------------------------- the scaling curve


def run_scaling(args, sizes: list[str], methods: list[str], mergekit_methods: dict[str, list[str]], mergekit_exe: Path) -> str:
    """Every method at each size, in the order given; the report is rewritten after each method."""
    done: list[dict] = []
    text = ""
    for k, name in enumerate(sizes):
        # The disk is shared and the run long: before each size, check again that what the rest
        # of the run needs is still free (the report of the sizes done so far is already written).
        refusal = disk_refusal(disk_needs(sizes[k:], [], args.variants))
        if refusal:
            print(refusal, file=sys.stderr)
            raise SystemExit(2)
        size = SIZES[name]
        models = ensure_models(CACHE / "models", size, args.variants, log=log)
        work = CACHE / f"work-{name}"
        work.mkdir(exist_ok=True)
        log(f"{name}: {size.parameters / 1e9:.2f}B parameters, {len(models)} models; alloy {methods}, mergekit {mergekit_methods[name]}")
        entry = {
            "name": name,
            "parameters": size.parameters,
            "models": len(models),
            "model_bytes": size.model_bytes,
            "largest_tensor_bytes": size.largest_tensor_bytes,
            "rss_bound_bytes": rss_bound(size),
            "mergekit_methods": mergekit_methods[name],
            "results": [],
        }
        done.append(entry)

        def after_each(partial: list[dict]) -> None:
            nonlocal text
            entry["results"] = list(partial)
            text = write_scaling_report(args, done)

        run_methods(args, methods, models, work, mergekit_exe, mergekit_methods[name], after_each)
    return text


def scaling_title(report: dict) -> str:
    cache = "cold" if "evicted" in report["page_cache"] else "warm"
    return f"alloy vs mergekit 0.1.5 across sizes: synthetic Llama, bf16, 3 models, {report['machine']['cpus']} cores, page cache {cache}"


def scaling_report_text(sizes: list[dict]) -> str:
    """The scaling table and its targets, then each size's full table (bounds, agreement)."""
    parts = [scaling.table(sizes)]
    for entry in sizes:
        gb = entry["results"][0]["input_bytes"] / 1e9 if entry["results"] else 0.0
        parts += ["", f"{entry['name']} ({entry['parameters'] / 1e9:.2f}B parameters, {entry['models']} models, {gb:.2f} GB read per merge):", "", table(entry["results"], [])]
    return "\n".join(parts)


def write_scaling_report(args, sizes: list[dict]) -> str:
    report = {**run_info(args), "sizes": sizes, "summary": scaling.summary(sizes)}
    args.results.mkdir(parents=True, exist_ok=True)
    stem = "bench-scaling" + ("-warm" if args.cache == "warm" else "")
    (args.results / f"{stem}.json").write_text(json.dumps(report, indent=2))
    text = scaling_report_text(sizes)
    (args.results / f"{stem}.md").write_text(text + "\n")
    scaling.chart(sizes, args.results / f"{stem}.png", scaling_title(report))
    return text


if __name__ == "__main__":
    sys.exit(main())

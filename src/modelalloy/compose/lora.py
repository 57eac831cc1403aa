"""LoRA adapters as first-class inputs: fold one into a model, combine several, extract one.

- `apply_adapter(base, adapter, out)`: the merge of the single model ``base+adapter`` with
  passthrough, so it streams tensor by tensor like any merge (`io/adapter.py` folds ΔW on read).
- `combine_adapters(adapters, out, method=...)`: works on the products ΔW_i = s_i·B_i·A_i, never on
  the factors alone (PEFT's historical bugs with negative weights and double scaling came from
  mixing factors). `cat` is exact: stacking [A_1; …; A_n] and [w_1 s_1 B_1, …, w_n s_n B_n] gives
  B·A = Σ w_i ΔW_i. `svd` truncates Σ w_i ΔW_i to a rank (Eckart–Young: the best Frobenius
  approximation). `ties`/`dare_ties` run the task-vector methods on the ΔW_i, then truncate.
- `extract_adapter(base, finetune, out, rank=… | energy=…)`: truncated SVD of each 2-D delta
  inside the layers, with the energy kept (Σ_{j≤r} σ_j² / Σ σ_j²) reported per module.

Every written adapter has scale 1 per module (lora_alpha = r, per-module ranks in rank_pattern
with matching alpha_pattern), so B·A is the update itself and any PEFT version reads it the same.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from modelalloy import arch
from modelalloy.config import MergeConfig
from modelalloy.errors import CheckpointError, ConfigError, OutputError, PlanError
from modelalloy.io.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, Adapter, open_adapter
from modelalloy.io.opener import open_checkpoint
from modelalloy.io.writer import write_text_durably

COMBINE_METHODS = ("cat", "linear", "svd", "ties", "dare_ties")
# Architectures whose layers are Conv1D, storing weights as [in, out] (PEFT's fan_in_fan_out).
FAN_IN_FAN_OUT_TYPES = ("gpt2",)


def apply_adapter(base: str, adapter: str, out_dir: str | Path, **options):
    """Write `base` with the LoRA `adapter` folded into its weights (W + s·B·A), streaming.

    Example:
        >>> apply_adapter("./base", "./my-lora", "./merged")  # doctest: +SKIP
    """
    from modelalloy.api import merge

    config = MergeConfig(merge_method="passthrough", models=[{"model": f"{base}+{adapter}"}])
    return merge(config, out_dir, **options)


@dataclass
class ModuleReport:
    """What happened to one module: its rank and, where a truncation happened, the energy kept."""

    module: str
    rank: int
    energy_kept: float = 1.0  # Σ_{j≤r} σ_j² / Σ σ_j²; 1.0 when nothing was cut
    relative_error: float = 0.0  # ‖ΔW − B·A‖_F / ‖ΔW‖_F = sqrt(1 − energy_kept)


@dataclass
class AdapterResult:
    out_dir: Path
    modules: list[ModuleReport]
    saved_modules: list[str] = field(default_factory=list)  # written in full (modules_to_save)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Factors:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r], scale already folded in
    embedding: bool


def _truncate(a_cat: torch.Tensor, b_cat: torch.Tensor, rank: int | None, energy: float | None) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """Best rank-r factors of ΔW = b_cat·a_cat via QR of each side and an SVD of the small core.

    ΔW = Q_b R_b R_aᵀ Q_aᵀ, so ΔW's singular values are those of the R×R core R_b R_aᵀ; this never
    forms the [out, in] matrix. Returns (A, B, energy kept, singular values).
    """
    q_b, r_b = torch.linalg.qr(b_cat.double())  # [out, R], [R, R]
    q_a, r_a = torch.linalg.qr(a_cat.double().T)  # [in, R], [R, R]
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    r = _choose_rank(s, rank, energy)
    root = s[:r].sqrt()
    b = (q_b @ u[:, :r]) * root  # [out, r]
    a = root[:, None] * (vh[:r] @ q_a.T)  # [r, in]
    return a.float(), b.float(), _energy(s, r), s


def _choose_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    nonzero = int((s > s.max() * 1e-10).sum()) if s.numel() and float(s.max()) > 0 else 0
    if energy is not None:
        cumulative = torch.cumsum(s**2, 0) / (s**2).sum()
        return max(1, min(nonzero, int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype) - 1e-12)) + 1))
    assert rank is not None
    return max(1, min(rank, nonzero or 1))


def _energy(s: torch.Tensor, r: int) -> float:
    total = float((s.double() ** 2).sum())
    return float((s[:r].double() ** 2).sum()) / total if total > 0 else 1.0


def _check_rank_args(rank: int | None, energy: float | None) -> None:
    if (rank is None) == (energy is None):
        raise ConfigError("give exactly one of --rank and --energy")
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank {rank}: the rank must be at least 1")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ConfigError(f"--energy {energy}: the energy to keep is a fraction in (0, 1]")


def _prepare(out_dir: Path, force: bool, inputs: Sequence[Path]) -> Path:
    for p in inputs:
        if out_dir.resolve() == p.resolve():
            raise OutputError(f"{out_dir}: the output is one of the inputs; choose another directory")
    if out_dir.exists() and not force:
        raise OutputError(f"{out_dir}: already exists; pass --force to replace it, or choose another directory")
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def _finish(partial: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)


def _write_adapter(
    partial: Path,
    factors: dict[str, _Factors],
    *,
    template: dict,
    fan_in_fan_out: bool,
    saved: dict[str, torch.Tensor] | None = None,
    base_model: str | None = None,
) -> None:
    """adapter_model.safetensors + adapter_config.json, scale 1 for every module."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module, f in factors.items():
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if f.embedding else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PEFT_PREFIX}{module}.{a_key}"] = f.a.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.{b_key}"] = f.b.contiguous()
        ranks[module] = f.a.shape[0]
    for name, t in (saved or {}).items():
        tensors[PEFT_PREFIX + name] = t.contiguous()
    r = max(ranks.values(), default=1)
    # Escaped full names: PEFT reads these keys as regular expressions anchored at a name's end.
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA",
        "task_type": template.get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": base_model if base_model is not None else template.get("base_model_name_or_path"),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(ranks),
        "modules_to_save": sorted({n.rsplit(".", 1)[0] for n in saved}) if saved else None,
        "inference_mode": True,
    }
    save_file(tensors, str(partial / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    write_text_durably(partial / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")


def combine_adapters(
    adapters: Sequence[str],
    out_dir: str | Path,
    *,
    method: str = "cat",
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    density: float = 1.0,
    seed: int = 0,
    force: bool = False,
) -> AdapterResult:
    """Combine LoRA adapters of one base model into one adapter, in adapter space.

    The result's update is Σ w_i ΔW_i exactly for `cat`; for `svd` its best rank-`rank`
    approximation (default: the largest input rank); `linear` mixes the factors as PEFT does
    (B = Σ sign(w_i)√|w_i s_i| B_i, A = Σ √|w_i s_i| A_i; equal ranks needed; not Σ w_i ΔW_i when
    there is more than one adapter); `ties` / `dare_ties` apply those methods to the ΔW_i with
    `density`, then truncate to `rank` like `svd`.
    """
    if method not in COMBINE_METHODS:
        from modelalloy.errors import did_you_mean

        raise ConfigError(f"--method {method!r}: not a combine method{did_you_mean(method, COMBINE_METHODS)}; use one of {', '.join(COMBINE_METHODS)}")
    if len(adapters) < 1:
        raise ConfigError("give at least one adapter to combine")
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise ConfigError(f"--weights: {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank {rank}: the rank must be at least 1")
    if method == "cat" and rank is not None:
        raise ConfigError("--rank does not apply to cat (its rank is the sum of the input ranks); use --method svd to truncate")
    opened = [open_adapter(a) for a in adapters]
    try:
        fan = {a.config.get("fan_in_fan_out", False) for a in opened}
        if len(fan) > 1:
            raise ConfigError("the adapters disagree on fan_in_fan_out: they were trained on different layer types")
        for a in opened:
            if a.replaced:
                raise ConfigError(f"{a.ref}: has modules_to_save ({', '.join(sorted(a.replaced))}), which cannot be combined in adapter space; apply the adapters to the model and merge the models instead")
        out_dir = Path(out_dir)
        partial = _prepare(out_dir, force, [a.path for a in opened])
        targets = list(dict.fromkeys(t for a in opened for t in a.modules))
        factors: dict[str, _Factors] = {}
        reports: list[ModuleReport] = []
        for target in targets:
            present = [(a, w) for a, w in zip(opened, weights) if target in a.modules]
            module = present[0][0].modules[target].module
            embedding = present[0][0].modules[target].embedding
            f, report = _combine_module(target, module, embedding, present, method, rank, density, seed)
            factors[module] = f
            reports.append(report)
        _write_adapter(partial, factors, template=opened[0].config, fan_in_fan_out=fan.pop())
        _finish(partial, out_dir)
        return AdapterResult(out_dir, reports)
    finally:
        for a in opened:
            a.close()


def _combine_module(target, module, embedding, present, method, rank, density, seed) -> tuple[_Factors, ModuleReport]:
    scaled = []  # (A_i, w_i s_i B_i): ΔW_i·w_i = B'_i A_i
    for a, w in present:
        fa, fb = a.factors(target)
        scaled.append((fa, fb * (w * a.modules[target].scale), a, w))
    if method == "cat":
        a_cat = torch.cat([x[0] for x in scaled], 0)
        b_cat = torch.cat([x[1] for x in scaled], 1)
        return _Factors(a_cat, b_cat, embedding), ModuleReport(module, a_cat.shape[0])
    if method == "linear":
        ranks = {a.modules[target].rank for _, _, a, _ in scaled}
        if len(ranks) > 1:
            raise ConfigError(f"linear combine needs equal ranks, but {module} has ranks {sorted(ranks)}; use cat or svd")
        a_sum = sum(math.sqrt(abs(w * a.modules[target].scale)) * fa for fa, _, a, w in scaled)
        b_sum = sum(math.copysign(math.sqrt(abs(w * a.modules[target].scale)), w) * a.factors(target)[1] for _, _, a, w in scaled)
        return _Factors(a_sum, b_sum, embedding), ModuleReport(module, a_sum.shape[0])
    want = rank or max(a.modules[target].rank for _, _, a, _ in scaled)
    if method == "svd":
        a_cat = torch.cat([x[0] for x in scaled], 0)
        b_cat = torch.cat([x[1] for x in scaled], 1)
        a_new, b_new, kept, _ = _truncate(a_cat, b_cat, want, None)
        return _Factors(a_new, b_new, embedding), ModuleReport(module, a_new.shape[0], kept, math.sqrt(max(0.0, 1 - kept)))
    # ties / dare_ties on the full ΔW_i (one module at a time), then the best rank-`want` factors.
    from modelalloy.methods import get_method
    from modelalloy.plan import seed_for

    deltas = []  # the unweighted ΔW_i = s_i B_i A_i: the method applies the weights itself
    for a, _ in present:
        fa, fb = a.factors(target)
        deltas.append((fb @ fa) * a.modules[target].scale)
    ws = [w for _, w in present]
    m = get_method(method)
    params = {"weight": ws, "density": [density] * len(ws)}
    if "lambda" in m.param_names:
        params["lambda"] = 1.0
    if "normalize" in m.param_names:
        params["normalize"] = m.param("normalize").default
    combined = m(deltas, base=torch.zeros_like(deltas[0]), seed=seed_for(seed, module, method), **params)
    u, s, vh = torch.linalg.svd(combined.double(), full_matrices=False)
    r = _choose_rank(s, want, None)
    root = s[:r].sqrt()
    kept = _energy(s, r)
    return _Factors((root[:, None] * vh[:r]).float(), (u[:, :r] * root).float(), embedding), ModuleReport(module, r, kept, math.sqrt(max(0.0, 1 - kept)))


def extract_adapter(
    base: str,
    finetune: str,
    out_dir: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    save_other_modules: bool = True,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> AdapterResult:
    """A PEFT LoRA adapter approximating `finetune − base`, by truncated SVD of each 2-D delta.

    Every 2-D weight inside the layers becomes a LoRA module (B = U_r √Σ_r, A = √Σ_r V_rᵀ) of rank
    `rank`, or of the smallest rank keeping `energy` of Σσ². Other tensors that differ (norms,
    biases, embeddings, head) are saved whole as ``modules_to_save`` (unless `save_other_modules`
    is off, then they are listed in the notes), so at full rank the adapter reproduces the fine-tune.
    """
    _check_rank_args(rank, energy)
    with open_checkpoint(base) as b, open_checkpoint(finetune) as f:
        for name, loc in b.tensors.items():
            other = f.tensors.get(name)
            if other is None:
                raise PlanError(f"tensor {name!r} is in {base} but missing from {finetune}; they are not the same architecture")
            if other.shape != loc.shape:
                raise PlanError(f"tensor {name!r}: shape {list(loc.shape)} in {base} but {list(other.shape)} in {finetune}")
        extra = sorted(set(f.tensors) - set(b.tensors))
        if extra:
            raise PlanError(f"{finetune} has tensors that {base} lacks (e.g. {extra[0]!r}); they are not the same architecture")
        fan_in_fan_out = b.config.get("model_type") in FAN_IN_FAN_OUT_TYPES
        out_dir = Path(out_dir)
        partial = _prepare(out_dir, force, [b.path, f.path])
        factors: dict[str, _Factors] = {}
        reports: list[ModuleReport] = []
        saved: dict[str, torch.Tensor] = {}
        notes: list[str] = []
        lora_modules = {n.removesuffix(".weight") for n, loc in b.tensors.items() if _is_lora_target(n, loc)}
        for name in sorted(b.tensors, key=lambda n: (b.tensors[n].file, b.tensors[n].start)):
            loc = b.tensors[name]
            if not loc.dtype.is_floating_point:
                continue
            w0, w1 = b.read(name), f.read(name)
            if torch.equal(w0, w1):
                continue
            if progress is not None:
                progress(name)
            if _is_lora_target(name, loc):
                # float32 unless the weights are float64 (mergekit's precision; float64 SVD costs 2x)
                compute = torch.float64 if w0.dtype == torch.float64 else torch.float32
                delta = w1.to(compute) - w0.to(compute)
                delta = delta.T if fan_in_fan_out else delta  # Conv1D stores [in, out]; LoRA is [out, in]
                u, s, vh = torch.linalg.svd(delta, full_matrices=False)
                r = _choose_rank(s, rank, energy)
                root = s[:r].sqrt()
                module = name.removesuffix(".weight")
                factors[module] = _Factors((root[:, None] * vh[:r]).float(), (u[:, :r] * root).float(), False)
                kept = _energy(s, r)
                reports.append(ModuleReport(module, r, kept, math.sqrt(max(0.0, 1 - kept))))
            else:
                module = name.rsplit(".", 1)[0]
                if module in lora_modules:
                    notes.append(f"{name}: differs, but its module is a LoRA target and a LoRA cannot carry it (not saved)")
                elif save_other_modules:
                    saved[name] = w1
                else:
                    notes.append(f"{name}: differs from the base and is not saved (--no-save-modules)")
        # A module saved whole must carry all its tensors, changed or not.
        for module in {n.rsplit(".", 1)[0] for n in saved}:
            for name in b.tensors:
                if name.rsplit(".", 1)[0] == module and name not in saved:
                    saved[name] = f.read(name)
        if not factors and not saved:
            shutil.rmtree(partial)
            raise PlanError(f"{finetune} is identical to {base}: there is nothing to extract")
        _write_adapter(partial, factors, template={}, fan_in_fan_out=fan_in_fan_out, saved=saved, base_model=str(base))
        _finish(partial, out_dir)
    return AdapterResult(out_dir, reports, sorted({n.rsplit(".", 1)[0] for n in saved}), notes)


def _is_lora_target(name: str, loc) -> bool:
    """2-D weights inside the layers (linear / Conv1D layers); embeddings and heads stay whole."""
    return len(loc.shape) == 2 and name.endswith(".weight") and arch.layer_index(name) is not None and loc.dtype.is_floating_point


__all__ = ["apply_adapter", "combine_adapters", "extract_adapter", "AdapterResult", "ModuleReport", "Adapter", "CheckpointError"]

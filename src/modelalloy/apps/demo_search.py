"""`alloy demo-search`: search TIES / DARE-TIES parameters on the demo's SmolLM2 specialists,
then compare the best candidate with every fixed method of the merge-rate table on held-out text.

The demo's held-out text of each domain is split in two: the search optimises on one half and
never sees the other, on which the search's best candidate, each fixed method (with the demo's
parameters), the base and the specialists are all scored. BBC news, which nobody trained on, is
scored on the held-out side as the forgetting control. The base and the specialists come from
`alloy demo`'s cache (built there if missing), so nothing is fine-tuned twice.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from modelalloy.apps.demo import CORPORA, METHODS, DemoSettings, Laps, StepProgress, base_checkpoint, fine_tune, specialist_dir

SEARCH_PREFIX = "search_"
HELDOUT_PREFIX = "heldout_"
CONTROL = "news"
TEXT_CHARS = 6000  # per document in the evals file: far more than the token budgets read


@dataclass(frozen=True)
class DemoSearchSettings:
    method: str = "dare_ties"  # ties or dare_ties
    trials: int = 40
    sampler: str = "tpe"
    layer_groups: int = 4
    # Unnormalised weights, so the search sets how much of each task vector goes in per depth, not
    # only the ratio between the two (with normalize the scale cancels out).
    weight: tuple[float, float] = (0.0, 1.2)
    density: tuple[float, float] = (0.1, 1.0)
    normalize: bool = False
    search_tokens: int = 256  # per domain, per trial
    heldout_tokens: int = 256  # per domain, for the final comparison
    window: int = 128
    seed: int = 0


@dataclass
class Comparison:
    """Held-out scores of every candidate, and the verdict."""

    table: dict[str, dict[str, float]]  # model -> held-out set -> perplexity
    rows: list[dict]  # one per merged model: mean log-perplexity over domains, mean NAI
    best_fixed: str
    searched: str
    trials: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def searched_beats_fixed(self) -> bool:
        by = {r["model"]: r for r in self.rows}
        return by[self.searched]["mean_log_ppl"] < by[self.best_fixed]["mean_log_ppl"]

    def to_json(self) -> dict:
        return {"kind": "demo-search", "table": self.table, "rows": self.rows, "best_fixed": self.best_fixed, "searched": self.searched,
                "searched_beats_fixed": self.searched_beats_fixed, "trials": self.trials, "timings": self.timings}


def split_halves(domain: str, held_out: list[str]) -> tuple[list[str], list[str]]:
    """(search texts, held-out texts) from one domain's held-out documents; no text in both.

    Few long documents (plays) are cut at their middle, the first halves searched on; many short
    ones (fortunes) alternate between the two sides."""
    if len(held_out) >= 8:
        return held_out[::2], held_out[1::2]
    search, held = [], []
    for doc in held_out:
        mid = len(doc) // 2
        cut = doc.find("\n", mid)
        cut = mid if cut < 0 else cut + 1
        search.append(doc[:cut])
        held.append(doc[cut:])
    return search, held


def _clip(texts: list[str], chars: int = TEXT_CHARS) -> list[str]:
    """Just enough text for the token budget, so the evals file stays small."""
    out, total = [], 0
    for t in texts:
        out.append(t[: chars - total])
        total += len(out[-1])
        if total >= chars:
            break
    return out


def write_evals(path: Path, search: dict[str, list[str]], heldout: dict[str, list[str]], control: list[str], settings: DemoSearchSettings) -> None:
    sets = []
    for domain, texts in search.items():
        sets.append({"name": SEARCH_PREFIX + domain, "texts": _clip(texts), "max_tokens": settings.search_tokens, "window": settings.window})
    for domain, texts in heldout.items():
        sets.append({"name": HELDOUT_PREFIX + domain, "texts": _clip(texts), "max_tokens": settings.heldout_tokens, "window": settings.window})
    sets.append({"name": HELDOUT_PREFIX + CONTROL, "texts": _clip(control), "max_tokens": settings.heldout_tokens, "window": settings.window})
    path.write_text(yaml.safe_dump({"sets": sets}, sort_keys=False, allow_unicode=True))


def write_search_spec(path: Path, base: Path, specialists: dict[str, Path], settings: DemoSearchSettings) -> None:
    spec = {
        "base_model": str(base),
        "models": [str(p) for p in specialists.values()],
        "methods": [settings.method],
        "layer_groups": settings.layer_groups,
        "parameters": {
            "weight": {"low": settings.weight[0], "high": settings.weight[1]},
            "density": {"low": settings.density[0], "high": settings.density[1]},
        },
        "fixed": {"normalize": settings.normalize},
        "random_seed": settings.seed,
        "objective": {"evals": "evals.yaml", "search": [SEARCH_PREFIX + d for d in specialists],
                      "holdout": [HELDOUT_PREFIX + d for d in specialists] + [HELDOUT_PREFIX + CONTROL]},
        "sampler": settings.sampler,
        "trials": settings.trials,
        "seed": settings.seed,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


def fixed_config(base: Path, specialists: dict[str, Path], method: str, seed: int):
    """The demo's merge-rate config (TIES, weight 1, density 0.5) moved to `method`, as `alloy demo` does."""
    from modelalloy.config import parse_config
    from modelalloy.evaluate.runner import method_variant

    config = parse_config(yaml.safe_dump({
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in specialists.values()],
        "parameters": {},
        "random_seed": seed,
    }))
    return method_variant(config, method)


def _score_checkpoint(path: Path, sets) -> dict[str, float]:
    import torch
    import transformers

    from modelalloy.evaluate.runner import score

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return {s.name: float(score(model, tokenizer, s)["score"]) for s in sets}


def compare_heldout(out_dir: Path, base: Path, specialists: dict[str, Path], best_config, trials: int, *,
                    methods: tuple[str, ...] = METHODS, seed: int = 0, progress: StepProgress | None = None) -> Comparison:
    """Score the searched best, each fixed method, the base and the specialists on the held-out sets."""
    from modelalloy.evaluate import SetInfo, merge_rate
    from modelalloy.evaluate.sets import load_evals
    from modelalloy.search.trial import TrialEvaluator

    sets = [s for s in load_evals(out_dir / "evals.yaml") if s.name.startswith(HELDOUT_PREFIX)]
    names = [s.name for s in sets]
    table: dict[str, dict[str, float]] = {}
    todo = 2 + len(specialists) + len(methods)
    step = 0

    def tick(what: str) -> None:
        nonlocal step
        step += 1
        if progress:
            progress(f"held-out: {what}", step, todo)

    # Scores are kept by what was scored (checkpoint or config, and the sets), so a rerun, or a
    # second process started while the search runs, does not score the fixed methods again.
    cache_file = out_dir / "heldout-scores.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    sets_key = hashlib.sha256(json.dumps([s.model_dump() for s in sets], sort_keys=True).encode()).hexdigest()[:16]
    evaluator = None

    def cached(label: str, what: str, compute: Callable[[], dict[str, float]]) -> None:
        key = hashlib.sha256(f"{what}|{sets_key}".encode()).hexdigest()[:16]
        if key not in cache:
            cache[key] = compute()
            merged = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
            cache_file.write_text(json.dumps(merged | cache, indent=1))
        table[label] = cache[key]
        tick(label)

    def merged(config) -> dict[str, float]:
        nonlocal evaluator
        if evaluator is None:
            evaluator = TrialEvaluator([str(base), *map(str, specialists.values())], sets)
        return {k: float(v["score"]) for k, v in evaluator.scores(config, names).items()}

    cached("base", str(base), lambda: _score_checkpoint(base, sets))
    for name, path in specialists.items():
        cached(f"ft-{name}", str(path), lambda path=path: _score_checkpoint(path, sets))
    cached("searched", best_config.model_dump_json(), lambda: merged(best_config))
    for method in methods:
        config = fixed_config(base, specialists, method, seed)
        cached(method, config.model_dump_json(), lambda config=config: merged(config))

    infos = [SetInfo(HELDOUT_PREFIX + d, False, f"ft-{d}") for d in specialists] + [SetInfo(HELDOUT_PREFIX + CONTROL, False, None)]
    parents = [f"ft-{d}" for d in specialists]
    rows = []
    for model in ["searched", *methods]:
        rate = merge_rate(table, merged=model, base="base", parents=parents, sets=infos)
        domain_ppl = [table[model][HELDOUT_PREFIX + d] for d in specialists]
        rows.append({
            "model": model,
            "mean_log_ppl": sum(math.log(p) for p in domain_ppl) / len(domain_ppl),
            "mean_nai": rate.mean_nai,
            "forgetting": rate.mean_forgetting,
        })
    best_fixed = min((r for r in rows if r["model"] != "searched"), key=lambda r: r["mean_log_ppl"])["model"]
    return Comparison(table, rows, best_fixed, "searched", trials)


def run_demo_search(cache: str | Path = ".cache/demo", out_dir: str | Path | None = None, *, settings: DemoSearchSettings = DemoSearchSettings(),
                    demo: DemoSettings = DemoSettings(), resume: bool = False, force: bool = False,
                    progress: StepProgress | None = None, trial_progress: Callable | None = None) -> Comparison:
    """The demo's specialists (cached), a search on the search halves, the held-out comparison."""
    from modelalloy.search import load_spec, run_search
    from modelalloy.search.space import SearchSpec

    if settings.method not in ("ties", "dare_ties"):
        from modelalloy.errors import ConfigError

        raise ConfigError(f"demo-search searches ties or dare_ties, not {settings.method!r}")
    cache = Path(cache)
    out_dir = Path(out_dir) if out_dir is not None else cache / "search"
    lap = Laps()
    timings = lap.timings

    corpora = {name: CORPORA[name]() for name in (*demo.domains, CONTROL)}
    base = base_checkpoint(cache, progress)
    specialists = {name: fine_tune(base, corpora[name], specialist_dir(cache, name, demo), demo, progress) for name in demo.domains}
    lap("models (cached by alloy demo)")

    halves = {d: split_halves(d, corpora[d].held_out) for d in demo.domains}
    # The search's own files live beside OUT (run_search owns OUT and may delete it with --force).
    inputs = out_dir.with_name(out_dir.name + "-inputs")
    inputs.mkdir(parents=True, exist_ok=True)
    write_evals(inputs / "evals.yaml", {d: h[0] for d, h in halves.items()}, {d: h[1] for d, h in halves.items()}, corpora[CONTROL].held_out, settings)
    write_search_spec(inputs / "search.yaml", base, specialists, settings)
    spec: SearchSpec = load_spec(inputs / "search.yaml")
    result = run_search(spec, out_dir, resume=resume, force=force, progress=trial_progress)
    lap("search")
    comparison = compare_heldout(inputs, base, specialists, result.best_config, result.trials, seed=demo.seed, progress=progress)
    lap("held-out comparison")
    comparison.timings = timings
    (out_dir / "comparison.json").write_text(json.dumps(comparison.to_json(), indent=2) + "\n")
    return comparison

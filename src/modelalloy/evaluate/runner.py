"""Scoring models on eval sets, and the merge-rate table for a config (`alloy eval`, `alloy rate`).

A model is a Hugging Face directory, or a merge config (a YAML path or a `MergeConfig`), which is
merged in memory (`modelalloy.inmemory`) and never written to disk. Scores can be kept in a JSON
cache keyed by what the model and the set are made of, so a rerun scores only what changed.

Every score comes with its per-unit record, and so with a bootstrap interval (`evaluate.bootstrap`):
each result holds ``value``, ``ci95`` ([low, high] or None), ``n_units`` and ``n_tokens``. A set
with fewer than `bootstrap.MIN_UNITS` units gets no interval and a warning naming it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import numpy as np

from modelalloy.config import MergeConfig, load_config
from modelalloy.errors import ConfigError
from modelalloy.evaluate import bootstrap as bs
from modelalloy.evaluate.bootstrap import Bootstrap
from modelalloy.evaluate.cache import ScoreCache, is_config, model_fingerprint, set_fingerprint
from modelalloy.evaluate.rate import MergeRate, SetInfo, merge_rate, rank
from modelalloy.evaluate.scoring import classification, model_logits, multiple_choice, perplexities
from modelalloy.evaluate.sets import EvalError, EvalSet, read_choices, read_labeled, read_texts
from modelalloy.evaluate.shared import BottomSharing
from modelalloy.methods import REQUIRED, get_method

# label (model or "model / set"), done, total
Progress = Callable[[str, int, int], None]


class ProgressLabel(str):
    """A progress label that also says what done and total count (`unit`: "tokens", "items"),
    so a progress bar can show a rate; to any other callback it is the plain label."""

    unit: str = ""

    def __new__(cls, text: str, unit: str = "") -> ProgressLabel:
        label = super().__new__(cls, text)
        label.unit = unit
        return label

# Part of every cache key: scores kept by an older layout (without per-unit records) are not reused.
_CACHE_LAYOUT = "units-v1"

# Required parameters that a plain "merge these models" request leaves open, for --methods.
_PLAIN_DEFAULTS = {"weight": 1.0, "t": 0.5}


def load_model(ref: str | Path | MergeConfig, *, tokenizer: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a model directory or a merge config (merged in memory).

    The model is a causal LM, or a sequence classifier when config.json's architecture is one.
    """
    import transformers

    if is_config(ref):
        from modelalloy.inmemory import load_merged_model

        cfg = ref if isinstance(ref, MergeConfig) else load_config(ref)
        model, donor_dir = load_merged_model(cfg)
        model = model.to(dtype)
        tok_dir = tokenizer or donor_dir
    else:
        path = Path(ref)
        if not (path / "config.json").is_file():
            raise EvalError(f"{ref}: not a model directory (no config.json); give a Hugging Face model directory or a merge config (.yaml)")
        from modelalloy.inmemory import model_class_for

        try:
            cls = model_class_for(json.loads((path / "config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise EvalError(f"{path / 'config.json'}: cannot read ({str(e).splitlines()[0]})") from None
        what = "a sequence classifier" if cls is transformers.AutoModelForSequenceClassification else "a causal LM"
        try:
            model = cls.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as e:
            raise EvalError(f"{ref}: cannot load as {what} ({str(e).splitlines()[0]})") from None
        model.eval()
        tok_dir = tokenizer or path
    try:
        tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, ValueError, TypeError) as e:
        raise EvalError(f"{tok_dir}: no usable tokenizer there ({str(e).splitlines()[0]}); pass --tokenizer DIR") from None
    return model, tok


def score(model, tokenizer, eval_set: EvalSet, *, progress: Callable[[int, int], None] | None = None, bottom=None,
          entropy: bool = False) -> dict:
    """One model on one set: perplexity fields, or accuracy fields; always "score", "metric" and
    "units" (the per-unit record a bootstrap resamples; None where the scorer gives none). With
    `entropy`, a perplexity set's result also holds its mean predictive entropy (None for other kinds)."""
    if eval_set.kind == "classification":
        if not hasattr(model.config, "id2label") or "ForSequenceClassification" not in type(model).__name__:
            raise EvalError(f"eval set {eval_set.name!r}: classification needs a model with a classification head (*ForSequenceClassification), not {type(model).__name__}")
        items = read_labeled(eval_set, {int(k): v for k, v in model.config.id2label.items()})
        result = classification(model, tokenizer, items, batch_size=eval_set.batch_size, progress=progress)
        result["score"] = result["accuracy"]
    elif eval_set.kind == "lm_eval":
        from modelalloy.evaluate.lmeval import lm_eval_task

        result = lm_eval_task(model, tokenizer, eval_set.task, task_dir=eval_set.task_dir, limit=eval_set.max_items, batch_size=eval_set.batch_size)
    elif eval_set.kind == "choice":
        result = multiple_choice(model, tokenizer, read_choices(eval_set), progress=progress)
        result["score"] = result["accuracy"]
    else:
        device = next(model.parameters()).device
        result = perplexity_set(model_logits(model, bottom), tokenizer, eval_set, progress=progress, entropy=entropy, device=device)[None]
    result["metric"] = eval_set.metric
    result.setdefault("units", None)
    if entropy:
        result.setdefault("entropy", None)
    return result


def perplexity_set(logits_of, tokenizer, eval_set: EvalSet, *, progress: Callable[[int, int], None] | None = None, entropy: bool = False,
                   device="cpu") -> dict:
    """`score`'s result on a perplexity set for each model that `logits_of` yields (keyed as it
    keys them; see `scoring.perplexities`), all scored on the same batches."""
    results = perplexities(logits_of, tokenizer, read_texts(eval_set), max_tokens=eval_set.max_tokens, window=eval_set.window,
                           stride=eval_set.stride, batch_size=eval_set.batch_size, unit=eval_set.unit, progress=progress,
                           entropy=entropy, device=device)
    for result in results.values():
        result |= {"score": result["perplexity"], "metric": eval_set.metric}
    return results


def progress_unit(eval_set: EvalSet) -> str:
    """What a set's progress counts: tokens for perplexity, items otherwise."""
    return "tokens" if eval_set.kind == "perplexity" else "items"


# --- evaluating many models -------------------------------------------------------------------


@dataclass
class EvalResult:
    """{model label: {set name: result dict}}, plus what each set is.

    Each result dict holds the scorer's fields, ``value``, ``ci95``, ``n_units``, ``n_tokens`` and
    ``units`` (the per-unit record; left out of `to_json`). `warnings` names sets too small for an
    interval and models whose units cannot be paired with the others'.
    """

    sets: list[EvalSet]
    scores: dict[str, dict[str, dict]] = field(default_factory=dict)
    bootstrap: Bootstrap = field(default_factory=Bootstrap)
    warnings: list[str] = field(default_factory=list)
    _draws: dict[str, dict[str, np.ndarray | None]] = field(default_factory=dict, repr=False)

    def table(self) -> dict[str, dict[str, float]]:
        """{model: {set: score}} (perplexity or accuracy)."""
        return {m: {s: r["score"] for s, r in per_set.items()} for m, per_set in self.scores.items()}

    def finish(self) -> None:
        """Intervals for every score, from the same resamples of each set for every model."""
        self._draws = {m: {} for m in self.scores}
        self.warnings = []
        for s in self.sets:
            results = {m: per_set[s.name] for m, per_set in self.scores.items() if s.name in per_set}
            layouts = {m: _unit_layout(r.get("units")) for m, r in results.items()}
            reference = next((v for v in layouts.values() if v is not None), None)
            small = False
            for model, result in results.items():
                units = result.get("units")
                n = bs.n_units(units) if units else 0
                result.update(value=result["score"], ci95=None, n_units=n or None, n_tokens=bs.n_tokens(units) if units else result.get("tokens"))
                self._draws[model][s.name] = None
                if not units:
                    self.warnings.append(f"eval set {s.name!r}: {model} has no per-item scores, so no interval")
                    continue
                if n < bs.MIN_UNITS:
                    small = True
                    continue
                draws = bs.statistic(units, self.bootstrap.counts(s.name, n))
                result["ci95"] = bs.percentile_interval(draws)
                for extra in _EXTRA_METRICS.get(units["kind"], ()):
                    if extra in result:
                        result[f"{extra}_ci95"] = bs.percentile_interval(bs.statistic(units, self.bootstrap.counts(s.name, n), extra))
                if layouts[model] != reference:
                    self.warnings.append(f"eval set {s.name!r}: {model} cut it into other units than the other models "
                                         "(another tokenizer?), so its comparisons there have no interval")
                    continue
                self._draws[model][s.name] = draws
            if small:
                n = min(r["n_units"] or 0 for r in results.values())
                what = next((r["units"].get("unit", "item") for r in results.values() if r.get("units")), "unit")
                self.warnings.append(f"eval set {s.name!r} has {n} {what}{'s' if n != 1 else ''}, too few for an interval "
                                     f"(fewer than {bs.MIN_UNITS}): its scores carry no ci95 and its comparisons no p_better")

    def draws(self) -> dict[str, dict[str, np.ndarray | None]]:
        """{model: {set: score per bootstrap resample}}; None where there is no paired interval."""
        return self._draws

    def to_json(self) -> dict:
        return {
            "kind": "eval",
            "bootstrap": {"resamples": self.bootstrap.resamples, "seed": self.bootstrap.seed, "interval": "95 % percentile"},
            "sets": [{"name": s.name, "metric": s.metric, "higher_is_better": s.higher_is_better, "expert": s.expert} for s in self.sets],
            "scores": {m: {s: {k: v for k, v in r.items() if k != "units"} for s, r in per_set.items()} for m, per_set in self.scores.items()},
            "warnings": self.warnings,
        }


# Metrics besides the main one that get an interval of their own ("accuracy_norm_ci95", ...).
_EXTRA_METRICS = {"items": ("accuracy_norm",), "classification": ("macro_f1",)}


def _unit_layout(units: dict | None):
    """What must match for two models' units to be paired: their number, and for windows their sizes."""
    if not units:
        return None
    if units["kind"] == "perplexity":
        return ("perplexity", units["unit"], tuple(units["tokens"]) if units["unit"] == "window" else len(units["tokens"]))
    return (units["kind"], bs.n_units(units))


def label_of(ref: str | Path | MergeConfig) -> str:
    if isinstance(ref, MergeConfig):
        return ref.name or f"{ref.merge_method} merge"
    return str(ref)


def evaluate(
    models: Sequence[str | Path | MergeConfig] | Mapping[str, str | Path | MergeConfig],
    sets: Sequence[EvalSet],
    *,
    tokenizer: str | Path | None = None,
    cache: str | Path | ScoreCache | None = None,
    progress: Progress | None = None,
    bootstrap: Bootstrap | None = None,
    share_bottom: bool = True,
) -> EvalResult:
    """Score every model on every set. `models` may map labels to refs (else labels are the refs).

    `bootstrap` sets the resamples and seed of the intervals (default: 1,000, seed 0).
    `share_bottom`: models whose embedding and lower layers are bitwise the same compute those
    layers once per perplexity set (`evaluate.shared`); the scores are the same either way.
    """
    if not sets:
        raise EvalError("no eval sets given")
    named = dict(models) if isinstance(models, Mapping) else {label_of(m): m for m in models}
    store = cache if isinstance(cache, ScoreCache) else ScoreCache(cache)
    set_keys = {s.name: set_fingerprint(s) for s in sets}
    result = EvalResult(list(sets), bootstrap=bootstrap or Bootstrap())
    sharing = BottomSharing({label: ref for label, ref in named.items() if not is_config(ref)}) if share_bottom and any(s.kind == "perplexity" for s in sets) else None
    for label, ref in named.items():
        mkey = model_fingerprint(ref)
        keys = {s.name: hashlib.sha256(f"{mkey}\0{set_keys[s.name]}\0{tokenizer}\0{_CACHE_LAYOUT}".encode()).hexdigest() for s in sets}
        cached = {name: store.get(k) for name, k in keys.items()}
        if all(v is not None for v in cached.values()):
            result.scores[label] = {name: dict(v) for name, v in cached.items()}
            if progress:
                progress(f"{label} (cached)", 1, 1)
            continue
        what = f"{label}: merging in memory" if is_config(ref) else f"{label}: loading"
        if progress:
            progress(what, 0, 1)
        model, tok = load_model(ref, tokenizer=tokenizer)
        if progress:
            progress(what, 1, 1)
        per_set = {}
        depth_key = sharing.enter(label, model) if sharing else None
        for s in sets:
            if cached[s.name] is not None:
                per_set[s.name] = dict(cached[s.name])
                continue
            cb = (lambda d, t, _l=ProgressLabel(f"{label} / {s.name}", progress_unit(s)): progress(_l, d, t)) if progress else None
            bottom = sharing.bottom(s, depth_key, tokenizer) if sharing and s.kind == "perplexity" else None
            per_set[s.name] = score(model, tok, s, progress=cb, bottom=bottom)
            store.put(keys[s.name], dict(per_set[s.name]))  # a copy: `finish` adds intervals to ours
        result.scores[label] = per_set
        del model  # one model in memory at a time
    result.finish()
    if sharing:
        result.warnings.extend(sharing.run.notes)
    return result


# --- the merge-rate table ---------------------------------------------------------------------


def method_variant(config: MergeConfig, method: str) -> MergeConfig:
    """The same parents and base merged with `method`: parameters it does not take are dropped,
    required ones it lacks get plain defaults (weight 1, t 0.5)."""
    m = get_method(method)
    if config.models is None:
        raise ConfigError("--methods needs a config with models: (not slices:), so each method merges the same models")

    def fit(params: dict, per_model: bool) -> dict:
        kept = {k: v for k, v in params.items() if m.param(k) is not None and m.param(k).per_model == per_model}
        for p in m.params:
            if p.per_model == per_model and p.default is REQUIRED and p.name not in kept and p.name in _PLAIN_DEFAULTS:
                kept[p.name] = _PLAIN_DEFAULTS[p.name]
        return kept

    top = {k: v for k, v in config.parameters.items() if m.param(k) is not None}
    models = [mm.model_copy(update={"parameters": fit(mm.parameters, True)}) for mm in config.models]
    return config.model_copy(update={"merge_method": method, "parameters": top | fit({}, False), "models": models, "name": method})


@dataclass
class RateResult:
    config: MergeConfig
    evaluation: EvalResult
    base: str
    parents: list[str]
    rates: list[MergeRate]  # best first
    configs: dict[str, MergeConfig] = field(default_factory=dict)  # each merge's own config, by label

    def to_json(self) -> dict:
        return {
            "kind": "rate",
            "config": self.config.model_dump(mode="json", exclude_none=True),
            "base": self.base,
            "parents": self.parents,
            "evaluation": self.evaluation.to_json(),
            "rates": [r.summary() | ({"config": self.configs[r.model].model_dump(mode="json", exclude_none=True)} if r.model in self.configs else {})
                      for r in self.rates],
            "warnings": self.evaluation.warnings,
        }


def rate(
    config: str | Path | MergeConfig,
    sets: Sequence[EvalSet],
    *,
    methods: Sequence[str] | None = None,
    tokenizer: str | Path | None = None,
    cache: str | Path | ScoreCache | None = None,
    progress: Progress | None = None,
    labels: Mapping[str, str] | None = None,
    bootstrap: Bootstrap | None = None,
) -> RateResult:
    """Evaluate the base, each parent and the merge (or one merge per method), and rate each merge.

    `labels` may give short names for model references (used in tables and in `expert:`);
    `bootstrap` sets the resamples and seed of every interval and paired comparison.
    """
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    if not cfg.base_model:
        raise ConfigError("alloy rate needs a config with base_model: the merge rate is measured against the base")
    refs = cfg.all_model_refs()
    parents = [r for r in refs if r != cfg.base_model]
    names = {r: (labels or {}).get(r, r) for r in refs}
    for s in sets:
        if s.expert is not None and s.expert not in parents and s.expert not in names.values():
            raise EvalError(f"eval set {s.name!r}: expert {s.expert!r} is not one of the merged models ({', '.join(names[p] for p in parents)})")
    variants = {m: method_variant(cfg, m) for m in methods} if methods else {cfg.name or cfg.merge_method: cfg}
    clash = set(variants) & set(names.values())
    if clash:
        raise EvalError(f"a merge label {sorted(clash)[0]!r} is also a model's name; rename the model label")
    models = {names[r]: r for r in refs} | variants
    evaluation = evaluate(models, sets, tokenizer=tokenizer, cache=cache, progress=progress, bootstrap=bootstrap)
    # `expert:` may name a model by its reference or by its label.
    infos = [SetInfo(s.name, s.higher_is_better, names.get(s.expert, s.expert)) for s in sets]
    table = evaluation.table()
    draws = evaluation.draws()
    rates = [merge_rate(table, merged=v, base=names[cfg.base_model], parents=[names[p] for p in parents], sets=infos, draws=draws) for v in variants]
    return RateResult(cfg, evaluation, names[cfg.base_model], [names[p] for p in parents], rank(rates), configs=dict(variants))

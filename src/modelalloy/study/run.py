"""`run_study`: every merge and fusion of a study scored, measured and rated; `OUT/study.json`.

Stages, each reported as progress(stage, done, total): the base and specialists (scores, entropy,
continuations), the weight diagnostics per strength, divergence per strength, the merges
(methods × expert subsets × strengths, merged in memory), the fusion baselines, and the rating.

Merges can be measured on Ray (`ray=True`, or a cluster's address): the search's way, one actor
per CPU, each merging in memory and scoring; the driver keeps what they return.

Resumable: every model's scores, entropy and continuations are kept in `OUT/scores.json`, keyed
by what the model is made of (its files, or its merge config and its inputs' files) and what the
set is made of; the diagnostics in `OUT/diagnostics.json` likewise. A killed study rerun scores
only what is missing. MoE checkpoints are built in a `work` folder inside OUT and deleted once scored.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelalloy.config import MergeConfig
from modelalloy.errors import ModelAlloyError
from modelalloy.evaluate import score
from modelalloy.evaluate.runner import ScoreCache, method_variant, model_fingerprint, perplexity_set, set_fingerprint
from modelalloy.evaluate.shared import BottomSharing
from modelalloy.evaluate.sets import read_texts
from modelalloy.methods import get_method
from modelalloy.study import diagnostics as diag
from modelalloy.study.assemble import assemble
from modelalloy.study.probes import Ensemble, EnsembleFamily, greedy_continuations, parameter_count, prompts_from, repetition
from modelalloy.study.spec import StudySpec

Progress = Callable[[str, int, int], None]
_LAYOUT = "study-v1"  # part of every cache key: a new record layout never reuses old entries


def _sha(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


@dataclass
class Scored:
    """One model's record: per set the scorer's result (with "units" and "entropy"), and its
    continuations' repetition (None for models that cannot generate, such as the ensemble)."""

    label: str
    sets: dict[str, dict]
    repetition: dict | None = None
    params: int | None = None
    extra: dict = field(default_factory=dict)


class _Measurer:
    """What running one model gives: per set the scorer's result (with the predictive entropy),
    the repetition of its greedy continuations, its parameter count. Holds no cache, so a Ray
    worker runs one too (`_StudyWorker`)."""

    def __init__(self, spec: StudySpec, tokenizer, progress: Progress | None = None):
        self.spec, self.tok, self.progress = spec, tokenizer, progress
        per_set = -(-spec.coherence.prompts // len(spec.sets))  # an equal share of prompts from each set
        self.prompts = [p for s in spec.sets for p in prompts_from(tokenizer, read_texts(s), n=per_set, tokens=spec.coherence.prompt_tokens)][: spec.coherence.prompts]

    @functools.cached_property
    def sharing(self) -> BottomSharing:
        """Merges of top-layer fine-tunes keep the base's bottom layers: those run once per set and
        batch. Built on first use (it hashes every checkpoint: 10 s on the demo), so a rerun that
        measures nothing pays nothing."""
        spec = self.spec
        return BottomSharing({"base": spec.base} | {f"{sp.name}@{i}": p for sp in spec.specialists for i, p in enumerate(sp.paths)})

    def _set_progress(self, label: str, set_name: str):
        """The scorer's progress(done, total) for one model (or family) on one set, or None."""
        return (lambda d, t, _w=f"{label} / {set_name}": self.progress(_w, d, t)) if self.progress else None

    def measure(self, label: str, model: torch.nn.Module, sets: list[str], generate: bool) -> dict:
        """{"sets": {name: result} for the named sets, "repetition" (if `generate`), "meta"}."""
        depth_key = self.sharing.enter(label, model)
        results = {}
        for s in self.spec.sets:
            if s.name in sets:
                cb = self._set_progress(label, s.name)
                bottom = self.sharing.bottom(s, depth_key, self.tok) if s.kind == "perplexity" else None
                results[s.name] = score(model, self.tok, s, progress=cb, bottom=bottom, entropy=True)
        rep = repetition(greedy_continuations(model, self.prompts, self.spec.coherence.new_tokens)) if generate else None
        return {"sets": results, "repetition": rep, "meta": {"params": parameter_count(model), "extra": getattr(model, "study_extra", {})}}

    def measure_ensembles(self, label: str, experts: dict[str, torch.nn.Module], subsets: list[tuple[str, ...]], sets: list[str]) -> dict:
        """{subset: what `measure` gives its ensemble} on the named perplexity sets, every subset's
        ensemble from one pass of each expert per batch (`EnsembleFamily`); other kinds of set are
        left to `measure` (they are not in the records)."""
        family = EnsembleFamily(experts, subsets)
        depth_key = self.sharing.enter(label, next(iter(experts.values())))
        results: dict[tuple[str, ...], dict] = {tuple(s): {} for s in subsets}
        for s in self.spec.sets:
            if s.name in sets and s.kind == "perplexity":
                cb = self._set_progress(label, s.name)
                bottom = self.sharing.bottom(s, depth_key, self.tok)
                for subset, result in perplexity_set(family.logits_of(bottom), self.tok, s, progress=cb, entropy=True).items():
                    results[subset][s.name] = result
        return {subset: {"sets": r, "repetition": None, "meta": {"params": sum(parameter_count(experts[n]) for n in subset), "extra": {}}}
                for subset, r in results.items()}


class _Scorer:
    """Models' records, from `OUT/scores.json` where kept there, else measured (and then kept)."""

    def __init__(self, spec: StudySpec, out: Path, tokenizer, progress: Progress | None):
        self.spec = spec
        self.cache = ScoreCache(out / "scores.json")
        self.set_keys = {s.name: set_fingerprint(s) for s in spec.sets}
        self.measurer = _Measurer(spec, tokenizer, progress)
        self.prompt_key = _sha(json.dumps(self.measurer.prompts), str(spec.coherence.new_tokens))

    def _keys(self, key: str) -> tuple[dict[str, str], str, str]:
        sets = {s.name: _sha(key, self.set_keys[s.name], _LAYOUT) for s in self.spec.sets}
        return sets, _sha(key, self.prompt_key, _LAYOUT, "repetition"), _sha(key, _LAYOUT, "params")

    def missing(self, key: str, *, generate: bool = True) -> tuple[list[str], bool]:
        """(sets not yet scored, whether the continuations are still to run) for the model `key` names."""
        sets, rep_key, _ = self._keys(key)
        return [n for n, k in sets.items() if self.cache.get(k) is None], generate and self.cache.get(rep_key) is None

    def keep(self, key: str, measured: dict) -> None:
        sets, rep_key, meta_key = self._keys(key)
        for name, result in measured["sets"].items():
            self.cache.put(sets[name], result)
        if measured["repetition"] is not None:
            self.cache.put(rep_key, measured["repetition"])
        self.cache.put(meta_key, measured["meta"])

    def run_ensembles(self, label: str, experts: dict[str, str], subsets: list[tuple[str, ...]], key_of: Callable[[dict[str, str]], str]) -> None:
        """Keeps the ensembles of `subsets` of `experts` (name: checkpoint) not kept yet, measured
        together (`_Measurer.measure_ensembles`); `key_of({name: path})` is an ensemble's key."""
        todo = {}
        for subset in subsets:
            sets, _ = self.missing(key_of({n: experts[n] for n in subset}), generate=False)
            if sets:
                todo[subset] = sets
        if not todo:
            return
        needed = {n: experts[n] for n in experts if any(n in s for s in todo)}
        models = {n: _load_dir(p) for n, p in needed.items()}
        sets = sorted({n for s in todo.values() for n in s})
        for subset, measured in self.measurer.measure_ensembles(label, models, list(todo), sets).items():
            if measured["sets"]:
                self.keep(key_of({n: experts[n] for n in subset}), measured)
        del models

    def run(self, label: str, key: str, load: Callable[[], torch.nn.Module], *, generate: bool = True) -> Scored:
        """The model's record; `load()` is called only if something is not kept yet."""
        sets, rep_key, meta_key = self._keys(key)
        todo, rep = self.missing(key, generate=generate)
        if todo or rep or self.cache.get(meta_key) is None:
            model = load()
            self.keep(key, self.measurer.measure(label, model, todo, rep))
            del model  # one model (or one ensemble) in memory at a time
        meta = self.cache.get(meta_key)
        return Scored(label, {n: dict(self.cache.get(k)) for n, k in sets.items()}, self.cache.get(rep_key) if generate else None,
                      meta["params"], meta.get("extra", {}))


class _Merges:
    """The study's merges in memory, the search's way (`search.trial.TrialEvaluator`): every input
    tensor read once and kept (when the inputs fit in half the memory), and a tensor no specialist changed (the frozen lower layers, the
    embeddings) taken from the base without running the method on zero task vectors; one model
    instance, its weights replaced for each merge. Built on first use."""

    def __init__(self, spec: StudySpec):
        self.refs = [spec.base, *(p for s in spec.specialists for p in s.paths)]
        self._evaluator = None

    def load(self, config: MergeConfig) -> torch.nn.Module:
        from modelalloy.search.trial import TrialEvaluator

        if self._evaluator is None:
            # Keeping every input costs their size in memory: only when they take at most half of it
            # (the demo's nine 135M checkpoints, 4.9 GB); otherwise each merge reads them again.
            size = sum(f.stat().st_size for r in self.refs for f in Path(r).glob("*.safetensors"))
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
            self._evaluator = TrialEvaluator(self.refs, [], cache_inputs=bool(memory) and size <= memory // 2)
        return self._evaluator.load(config)


class _StudyWorker:
    """A Ray actor: merges in memory and measures them, as the driver's `_Measurer` would."""

    def __init__(self, spec_json: str, threads: int):
        import transformers

        torch.set_num_threads(max(1, threads))  # this actor's own process: its declared CPUs
        self.spec = StudySpec.model_validate_json(spec_json)
        self.measurer = _Measurer(self.spec, transformers.AutoTokenizer.from_pretrained(self.spec.base))
        self.merges = _Merges(self.spec)

    def measure(self, label: str, config_json: str, sets: list[str], generate: bool) -> tuple[str, dict]:
        model = self.merges.load(MergeConfig.model_validate_json(config_json))
        return label, self.measurer.measure(label, model, sets, generate)


def _measure_on_ray(spec: StudySpec, jobs: list[tuple[str, str, MergeConfig, list[str], bool]], *, workers: int, address: str | None,
                    done: Callable[[str, str, dict], None]) -> None:
    """Each (label, key, config, sets, generate) measured by a pool of Ray actors, one CPU each;
    `done(label, key, measured)` as each comes back (in the order they finish)."""
    import ray
    from ray.util import ActorPool

    from modelalloy.search.run import start_ray

    start_ray(address, num_cpus=workers)
    actor = ray.remote(num_cpus=1)(_StudyWorker)
    actors = [actor.remote(spec.model_dump_json(), 1) for _ in range(workers)]
    keys = {label: key for label, key, *_ in jobs}
    try:
        pool = ActorPool(actors)
        for label, measured in pool.map_unordered(lambda a, j: a.measure.remote(j[0], j[2].model_dump_json(), j[3], j[4]), jobs):
            done(label, keys[label], measured)
    except ray.exceptions.RayTaskError as e:
        cause = e.as_instanceof_cause()
        if isinstance(cause, ModelAlloyError):
            raise cause from None
        raise
    finally:
        for a in actors:
            ray.kill(a)


def _load_dir(path: str) -> torch.nn.Module:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def merge_config(spec: StudySpec, method, experts: list[str]) -> MergeConfig:
    """The merge of `experts` (checkpoint dirs) onto the base with `method` (a `MethodSpec`)."""
    m = get_method(method.method)
    per_model = {k: v for k, v in method.parameters.items() if m.param(k) is not None and m.param(k).per_model}
    top = {k: v for k, v in method.parameters.items() if k not in per_model}
    template = MergeConfig.model_validate({
        "merge_method": method.method,
        "base_model": spec.base,
        # weight 1 and density 0.5 are the demo's defaults; a method drops what it does not take.
        "models": [{"model": e, "parameters": {"weight": 1.0, "density": 0.5} | per_model} for e in experts],
        "parameters": top,
        "random_seed": 0,
    })
    return method_variant(template, method.method).model_copy(update={"name": method.label})


def _moe(spec: StudySpec, experts: dict[str, str], prompts: dict[str, list[str]], work: Path):
    """A mixture of the experts' MLPs over the base (hidden gates from each expert's prompts)."""
    from modelalloy.compose.moe_config import MoEConfig

    cfg = MoEConfig.model_validate({
        "base_model": spec.base,
        "gate_mode": "hidden",
        "experts_per_token": min(2, len(experts)),
        "experts": [{"source_model": path, "positive_prompts": prompts[name]} for name, path in experts.items()],
    })
    return cfg, lambda: _build_and_load(cfg, work)


def _build_and_load(cfg, work: Path) -> torch.nn.Module:
    from modelalloy.compose.moe import build_moe

    out = work / _sha(cfg.model_dump_json())[:16]
    build_moe(cfg, out, force=True)
    model = _load_dir(str(out))
    shutil.rmtree(out, ignore_errors=True)  # scored from memory; the scores are what is kept
    model.study_extra = {"experts_per_token": cfg.experts_per_token}
    return model


def _mlp_params(base_dir: str) -> int:
    from modelalloy.io.opener import open_checkpoint

    with open_checkpoint(base_dir) as c:
        return sum(int(torch.Size(t.shape).numel()) for n, t in c.tensors.items() if ".mlp." in n)


def run_study(spec: StudySpec, out: str | Path, *, progress: Progress | None = None, ray: bool = False, ray_address: str | None = None,
              workers: int = 2) -> dict:
    """Run (or resume) the study into `out`; returns what `OUT/study.json` holds (see `assemble`).

    With `ray` (a local Ray instance of `workers` CPUs) or `ray_address` (a cluster), the merges are
    measured by Ray actors, one CPU each; every result is kept in `OUT/scores.json` by the driver,
    so a killed run resumes either way, and the numbers are the same as in one process."""
    import transformers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = transformers.AutoTokenizer.from_pretrained(spec.base)
    scorer = _Scorer(spec, out, tok, progress)
    names = [s.name for s in spec.specialists]
    strengths = spec.strength_labels
    subsets = spec.subsets()
    prompts = {s.name: list(s.prompts) or _default_prompts(spec, s.name) for s in spec.specialists}
    models: dict[str, Scored] = {}

    def stage(name: str, done: int, total: int) -> None:
        if progress:
            progress(name, done, total)

    laps: dict[str, float] = {}  # wall seconds per step of this run (a resumed run's cached steps take about none)
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        laps[name] = round(laps.get(name, 0.0) + now - clock[0], 1)
        clock[0] = now

    refs = {"base": spec.base} | {f"{n}@{st}": s.paths[i] for i, st in enumerate(strengths) for n, s in zip(names, spec.specialists)}
    for i, (label, path) in enumerate(refs.items()):
        stage("stage 1/5: base and specialists", i, len(refs))
        models[label] = scorer.run(label, model_fingerprint(path), lambda p=path: _load_dir(p))
    stage("stage 1/5: base and specialists", len(refs), len(refs))
    lap("base and specialists")

    dstore = ScoreCache(out / "diagnostics.json")
    interference, divergence = {}, {}
    shared = _shared_ids(spec, tok)
    for i, st in enumerate(strengths):
        experts = {n: refs[f"{n}@{st}"] for n in names}
        key = _sha(model_fingerprint(spec.base), *(model_fingerprint(p) for p in experts.values()), json.dumps(subsets), _LAYOUT)
        if (found := dstore.get("interference/" + key)) is None:
            cb = (lambda d, t, _s=st: stage(f"stage 2/5: weight diagnostics ({_s})", d, t))
            found = {"|".join(s): v for s, v in diag.interference(spec.base, experts, subsets, progress=cb).items()}
            dstore.put("interference/" + key, found)
        interference[st] = {tuple(k.split("|")): v for k, v in found.items()}
        dkey = _sha(key, json.dumps(shared))
        if (pairs := dstore.get("divergence/" + dkey)) is None:
            stage(f"stage 3/5: divergence ({st})", 0, 1)
            pairs = diag.divergence(diag.parent_states(experts, shared, _load_dir))
            dstore.put("divergence/" + dkey, pairs)
        divergence[st] = pairs
        stage(f"stage 3/5: divergence ({st})", 1, 1)
    lap("weight diagnostics and divergence")

    jobs = []
    for st in strengths:
        for method in spec.methods:
            for subset in subsets:
                cfg = merge_config(spec, method, [refs[f"{n}@{st}"] for n in subset])
                jobs.append((f"{method.label}|{st}|{'+'.join(subset)}", model_fingerprint(cfg), cfg, method, st, subset))
    total = len(jobs)
    if ray or ray_address:
        todo = [(label, key, cfg, *scorer.missing(key)) for label, key, cfg, *_ in jobs]
        todo = [j for j in todo if j[3] or j[4]]
        finished = [total - len(todo)]

        def kept(label: str, key: str, measured: dict) -> None:
            scorer.keep(key, measured)
            finished[0] += 1
            stage("stage 4/5: merges (in memory, on Ray)", finished[0], total)

        if todo:
            _measure_on_ray(spec, todo, workers=workers, address=ray_address, done=kept)
    runs = []
    merges = _Merges(spec)
    for label, key, cfg, method, st, subset in jobs:
        stage("stage 4/5: merges (in memory)", len(runs), total)
        scored = scorer.run(label, key, lambda c=cfg: merges.load(c))  # kept already when Ray measured it
        runs.append({"label": label, "method": method.label, "experts": list(subset), "strength": st, "scored": scored,
                     "interference": interference[st][subset] | {"mean_cka": diag.subset_cka(divergence[st], subset)}})
    stage("stage 4/5: merges (in memory)", total, total)
    lap("merges")

    fusion = []
    base_params = models["base"].params
    mlp = _mlp_params(spec.base) if "moe" in spec.fusion else 0
    total = len(strengths) * len(subsets) * len(spec.fusion)
    del merges  # the merges' inputs, kept in memory for them
    ensemble_key = lambda experts: _sha("ensemble", *(model_fingerprint(p) for p in experts.values()))  # noqa: E731
    for st in strengths:
        if "ensemble" in spec.fusion:
            scorer.run_ensembles(f"ensembles|{st}", {n: refs[f"{n}@{st}"] for n in names}, subsets, ensemble_key)
            lap("ensembles")
        for subset in subsets:
            experts = {n: refs[f"{n}@{st}"] for n in subset}
            for kind in spec.fusion:
                stage("stage 5/5: fusion", len(fusion), total)
                label = f"{kind}|{st}|{'+'.join(subset)}"
                record = {"label": label, "kind": kind, "experts": list(subset), "strength": st}
                if kind == "ensemble":
                    key = ensemble_key(experts)
                    record["scored"] = scorer.run(label, key, lambda e=experts: Ensemble([_load_dir(p) for p in e.values()]), generate=False)
                    record |= {"params": len(subset) * base_params, "forward_passes": len(subset)}
                    lap("ensembles")
                elif kind == "moe":
                    cfg, load = _moe(spec, experts, prompts, out / "work")
                    key = _sha("moe", cfg.model_dump_json(), *(model_fingerprint(p) for p in experts.values()))
                    # Scores and entropy only: its greedy continuations cost more than its scoring
                    # (16 s against 20 s for four experts on the demo), and coherence is asked of merges.
                    record["scored"] = scored = scorer.run(label, key, load, generate=False)
                    top = scored.extra.get("experts_per_token", 2)
                    # A token runs attention once and `top` of the k expert MLPs: one pass, its
                    # active parameters those of the dense model plus (top − 1) more MLPs.
                    record |= {"params": scored.params, "active_params": base_params + (top - 1) * mlp, "forward_passes": 1}
                    lap("mixtures of experts")
                else:  # oracle_routing: each set scored by its own expert, others by the best of the subset
                    record |= {"scored": None, "params": len(subset) * base_params, "forward_passes": 1}
                fusion.append(record)
    stage("stage 5/5: fusion", total, total)

    stage("rating", 0, 1)
    result = assemble(spec, models, runs, fusion, divergence, out=out)
    stage("rating", 1, 1)
    lap("rating")
    result["timings"] = laps
    (out / "study.json").write_text(json.dumps(result, indent=1))
    return result


def _default_prompts(spec: StudySpec, name: str) -> list[str]:
    """The router's prompts for a specialist without any: four pieces of its own set's text."""
    texts = [t for s in spec.sets if s.expert == name for t in read_texts(s)]
    text = "\n".join(texts)
    step = max(1, len(text) // 4)
    return [text[i : i + 200] for i in range(0, 4 * step, step)][:4] or [name]


def _shared_ids(spec: StudySpec, tok) -> list[int]:
    """The shared text for CKA: an equal share of `divergence.tokens` tokens from every set."""
    share = max(2, spec.divergence.tokens // len(spec.sets))
    ids: list[int] = []
    for s in spec.sets:
        ids += tok("\n".join(read_texts(s)), add_special_tokens=False)["input_ids"][:share]
    return ids

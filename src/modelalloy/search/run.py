"""`alloy search`: an optuna study over merge parameters, resumable, optionally spread on Ray.

The optuna storage (SQLite at OUT/study.db, or an RDB URL on a cluster) is the single source of
truth: the driver alone asks for trials and tells their results, so a killed search resumes
from the storage, and trials that were running when it died are run again with the same
parameters. Workers only merge and score: in this process (`parallel: 1` without Ray) or as Ray
actors that each keep their inputs and model loaded across trials — the same loop either way.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modelalloy.config import MergeConfig
from modelalloy.errors import ConfigError, ModelAlloyError, OutputError
from modelalloy.search.space import SearchSpec, search_space, suggest_config
from modelalloy.search.trial import TrialEvaluator, objective_values

STUDY_NAME = "alloy-search"


@dataclass
class TrialReport:
    """What the progress callback sees after each finished trial."""

    number: int
    values: list[float] | None
    best: list[float] | None
    done: int
    total: int
    elapsed: float
    done_this_run: int
    error: str | None = None

    @property
    def eta(self) -> float | None:
        """Seconds left, from this run's pace (a resumed run did earlier trials elsewhere)."""
        return self.elapsed / self.done_this_run * (self.total - self.done) if self.done_this_run else None


@dataclass
class SearchResult:
    out_dir: Path
    trials: int
    best_config: MergeConfig
    best_values: list[float]
    best_scores: dict[str, dict]
    holdout: dict[int, dict[str, dict]] = field(default_factory=dict)  # trial number -> set -> score
    pareto: list[int] = field(default_factory=list)


def _spec_digest(spec: SearchSpec) -> str:
    return hashlib.sha256(spec.model_dump_json(exclude={"trials", "parallel"}).encode()).hexdigest()


def _sampler(spec: SearchSpec):
    import optuna

    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=spec.seed, multivariate=True)
    if spec.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=spec.seed, warn_independent_sampling=False)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=spec.seed)
    return optuna.samplers.GridSampler(search_space(spec), seed=spec.seed)


def open_study(spec: SearchSpec, out_dir: Path, directions: list[str], *, resume: bool, storage: str | None = None):
    """Create the study (or load it to resume, checking it is the same search)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = out_dir / "study.db"
    url = storage or f"sqlite:///{db}"
    if resume:
        if storage is None and not db.exists():
            raise OutputError(f"{out_dir}: nothing to resume (no study.db); run without --resume")
        study = optuna.load_study(study_name=STUDY_NAME, storage=url, sampler=_sampler(spec))
        if study.user_attrs.get("spec_digest") != _spec_digest(spec):
            raise ConfigError(f"{out_dir}: the study was made from a different search file; resume with the same one, or start a new OUT")
        _requeue_interrupted(study)
        return study
    study = optuna.create_study(study_name=STUDY_NAME, storage=url, directions=directions, sampler=_sampler(spec))
    study.set_user_attr("spec_digest", _spec_digest(spec))
    return study


def _requeue_interrupted(study) -> None:
    """Trials left RUNNING by a killed search are failed and queued again with their parameters."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, skip_if_exists=False)


class _LocalPool:
    """Runs each trial in this process as it is submitted."""

    def __init__(self, evaluator: TrialEvaluator):
        self.evaluator = evaluator
        self.capacity = 1

    def submit(self, config: dict, sets: list[str]) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(self.evaluator.scores(MergeConfig.model_validate(config), sets))
        except ModelAlloyError as e:
            fut.set_exception(e)
        return fut

    def wait_one(self, handles: list) -> Any:
        return handles[0]

    def result(self, handle: Future) -> dict:
        return handle.result()

    def close(self) -> None:
        pass


class _Worker:
    """A Ray actor's state: one TrialEvaluator, kept across the trials it runs."""

    def __init__(self, refs: list[str], sets: list[dict], device: str, threads: int):
        import torch

        from modelalloy.evaluate.sets import EvalSet

        torch.set_num_threads(max(1, threads))  # this actor's own process: its declared CPUs
        self.evaluator = TrialEvaluator(refs, [EvalSet.model_validate(s) for s in sets], device=device)

    def run(self, config: dict, sets: list[str]) -> dict:
        return self.evaluator.scores(MergeConfig.model_validate(config), sets)


def start_ray(address: str | None, *, num_cpus: int, num_gpus: int = 0) -> None:
    """Join the cluster at `address`, or start a local instance of that size (the same code path,
    sized for this machine); nothing if Ray is already running in this process."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)


class _RayPool:
    """Trials as calls on a pool of Ray actors, each declaring its CPUs and GPUs."""

    def __init__(self, spec: SearchSpec, refs: list[str], sets, address: str | None, device: str):
        import ray

        start_ray(address, num_cpus=max(1, int(spec.parallel * spec.num_cpus)), num_gpus=int(spec.num_gpus * spec.parallel))
        self.ray = ray
        actor = ray.remote(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus)(_Worker)
        payload = [s.model_dump() for s in sets]
        self.actors = [actor.remote(refs, payload, device, int(spec.num_cpus)) for _ in range(spec.parallel)]
        self.idle = list(self.actors)
        self.busy: dict[Any, Any] = {}
        self.capacity = spec.parallel

    def submit(self, config: dict, sets: list[str]):
        actor = self.idle.pop()
        ref = actor.run.remote(config, sets)
        self.busy[ref] = actor
        return ref

    def wait_one(self, handles: list) -> Any:
        ready, _ = self.ray.wait(handles, num_returns=1)
        return ready[0]

    def result(self, handle) -> dict:
        self.idle.append(self.busy.pop(handle))
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(cause, ModelAlloyError):
                raise cause from None
            raise

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


def run_search(
    spec: SearchSpec,
    out_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    ray: bool = False,
    ray_address: str | None = None,
    storage: str | None = None,
    device: str = "cpu",
    progress: Callable[[TrialReport], None] | None = None,
) -> SearchResult:
    """Run (or resume) the search until `spec.trials` trials are complete; write OUT's files."""
    from optuna.trial import TrialState

    from modelalloy.evaluate.sets import load_evals

    out_dir = Path(out_dir)
    if out_dir.exists() and not resume:
        if not force:
            raise OutputError(f"{out_dir}: already exists; pass --resume to continue that search or --force to start over")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = load_evals(spec.objective.evals)
    by_name = {s.name: s for s in sets}
    for name in [*spec.objective.search, *spec.objective.holdout]:
        if name not in by_name:
            from modelalloy.errors import did_you_mean

            raise ConfigError(f"objective: no eval set named {name!r} in {spec.objective.evals}{did_you_mean(name, by_name)}")
    higher = {s.name: s.higher_is_better for s in sets}
    study = open_study(spec, out_dir, spec.directions(higher), resume=resume, storage=storage)
    (out_dir / "search.yaml").write_text(yaml.safe_dump(spec.model_dump(), sort_keys=False))

    refs = ([spec.base_model] if spec.base_model else []) + list(spec.models)
    used = [by_name[n] for n in dict.fromkeys([*spec.objective.search, *spec.objective.holdout])]
    pool = _RayPool(spec, refs, used, ray_address, device) if (ray or ray_address) else _LocalPool(TrialEvaluator(refs, used, device=device))
    search_sets = list(spec.objective.search)

    def complete() -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    start = time.perf_counter()
    done_at_start = complete()
    in_flight: dict[Any, Any] = {}
    try:
        while complete() + len(in_flight) < spec.trials or in_flight:
            while len(in_flight) < pool.capacity and complete() + len(in_flight) < spec.trials:
                trial = study.ask()
                config = suggest_config(spec, trial)
                trial.set_user_attr("config", config.model_dump(exclude_defaults=True))
                in_flight[pool.submit(config.model_dump(exclude_defaults=True), search_sets)] = trial
            handle = pool.wait_one(list(in_flight))
            trial = in_flight.pop(handle)
            error = values = None
            try:
                scores = pool.result(handle)
                values = objective_values(scores, search_sets, higher, spec.objective.pareto)
                trial.set_user_attr("scores", scores)
                study.tell(trial, values)
            except ModelAlloyError as e:
                error = str(e)
                trial.set_user_attr("error", error)
                study.tell(trial, state=TrialState.FAIL)
            if progress is not None:
                done = complete()
                progress(TrialReport(trial.number, values, _best_values(study), done, spec.trials, time.perf_counter() - start, done - done_at_start, error))
        return _finish(study, spec, out_dir, pool, higher)
    finally:
        pool.close()


def _best_values(study) -> list[float] | None:
    from optuna.trial import TrialState

    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        return None
    if len(study.directions) == 1:
        return list(study.best_trial.values)
    return None


def _single_loss(trial, spec: SearchSpec, higher: dict[str, bool]) -> float:
    return objective_values(trial.user_attrs["scores"], spec.objective.search, higher, pareto=False)[0]


def _finish(study, spec: SearchSpec, out_dir: Path, pool, higher: dict[str, bool]) -> SearchResult:
    """Best config, Pareto set, held-out scores of the final candidates, trial table, plots."""
    from optuna.trial import TrialState

    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        raise ConfigError("no trial completed; see the errors in trials.json")
    pareto = sorted(t.number for t in study.best_trials) if spec.objective.pareto else []
    candidates = [t for t in completed if t.number in pareto] if pareto else [study.best_trial]
    best = min(candidates, key=lambda t: _single_loss(t, spec, higher))
    holdout: dict[int, dict[str, dict]] = {}
    if spec.objective.holdout:
        for t in candidates:
            handle = pool.submit(t.user_attrs["config"], list(spec.objective.holdout))
            holdout[t.number] = pool.result(pool.wait_one([handle]))
    best_config = MergeConfig.model_validate(best.user_attrs["config"])
    (out_dir / "best.yaml").write_text(_config_yaml(best_config, f"best of {len(completed)} trials (trial {best.number})"))
    if pareto:
        front = out_dir / "pareto"
        front.mkdir(exist_ok=True)
        for t in candidates:
            (front / f"trial-{t.number:04d}.yaml").write_text(_config_yaml(MergeConfig.model_validate(t.user_attrs["config"]), f"Pareto trial {t.number}"))
    _write_trials(study, out_dir)
    summary = {
        "trials_complete": len(completed),
        "best_trial": best.number,
        "best_values": list(best.values),
        "best_scores": best.user_attrs["scores"],
        "pareto_trials": pareto,
        "holdout": {str(k): v for k, v in holdout.items()},
        "directions": [d.name.lower() for d in study.directions],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    from modelalloy.search.plots import write_plots

    write_plots(study, out_dir)
    return SearchResult(out_dir, len(completed), best_config, list(best.values), best.user_attrs["scores"], holdout, pareto)


def _config_yaml(config: MergeConfig, note: str) -> str:
    return f"# {note}, found by `alloy search`; run it with `alloy merge`\n" + yaml.safe_dump(config.model_dump(exclude_defaults=True), sort_keys=False)


def _write_trials(study, out_dir: Path) -> None:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "values": t.values,
                "params": t.params,
                "scores": {k: v.get("score") for k, v in t.user_attrs.get("scores", {}).items()},
                "error": t.user_attrs.get("error"),
                "seconds": t.duration.total_seconds() if t.duration else None,
            }
        )
    (out_dir / "trials.json").write_text(json.dumps(rows, indent=2) + "\n")
    params = sorted({p for r in rows for p in r["params"]})
    sets = sorted({s for r in rows for s in r["scores"]})
    with open(out_dir / "trials.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "state", "values", *sets, *params])
        for r in rows:
            w.writerow([r["number"], r["state"], json.dumps(r["values"]), *[r["scores"].get(s) for s in sets], *[r["params"].get(p) for p in params]])

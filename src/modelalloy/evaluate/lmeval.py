"""lm-evaluation-harness tasks as eval sets (the optional extra `lmeval`).

The model we already loaded (a directory, or a merge made in memory) is handed to lm-eval's
Hugging Face wrapper, so nothing is loaded twice and a merge never touches the disk. Only tasks
whose data is on this machine are meant: a folder of YAML task definitions over local JSON/JSONL
files (`dataset_path: json`, `data_files: ...`). Hugging Face downloads are switched off for the
run (offline mode), so a task that would fetch its data fails instead of downloading.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from modelalloy.evaluate.sets import EvalError

_OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@contextmanager
def _offline():
    saved = {k: os.environ.get(k) for k in _OFFLINE}
    os.environ.update(_OFFLINE)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def lm_eval_task(model, tokenizer, task: str, *, task_dir: str | None = None, limit: int | None = None, batch_size: int = 4) -> dict:
    """Run one lm-eval task on a loaded model; its main metric (the task's first) is the score.

    Returns {"score", "lm_eval_metric" (e.g. "acc"), "metrics" (every numeric value lm-eval reported)}.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError("an lm_eval set needs lm-evaluation-harness: pip install 'modelalloy[lmeval]'") from None
    if task_dir is not None and not Path(task_dir).is_dir():
        raise EvalError(f"lm_eval task_dir {task_dir} is not a folder; give the folder holding the task's YAML")
    # Without a task folder the name must be one of lm-eval's own tasks (their data must be cached).
    manager = TaskManager(include_path=task_dir, include_defaults=task_dir is None)
    if task not in manager.all_tasks:
        where = f"in {task_dir}" if task_dir else "among lm-eval's tasks"
        raise EvalError(f"lm_eval task {task!r} not found {where}; check the task: name in its YAML")
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with _offline():
        try:
            # Samples are logged for their per-item metric values: our bootstrap resamples them.
            out = lm_eval.simple_evaluate(model=wrapped, tasks=[task], task_manager=manager, limit=limit, bootstrap_iters=0, log_samples=True)
        except (OSError, ValueError, FileNotFoundError) as e:
            raise EvalError(f"lm_eval task {task!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__} (its data must be local: nothing is downloaded)") from None
    results = out["results"][task]
    better = out.get("higher_is_better", {}).get(task, {})
    metrics = {k.split(",")[0]: float(v) for k, v in results.items() if isinstance(v, (int, float)) and "_stderr" not in k and k != "sample_len"}
    main = next((m for m in better if m in metrics), next(iter(metrics), None))
    if main is None:
        raise EvalError(f"lm_eval task {task!r} reported no metric")
    if better.get(main) is False:
        raise EvalError(f"lm_eval task {task!r}: its main metric {main!r} is lower-is-better; list a higher-is-better metric first in its metric_list")
    return {"score": metrics[main], "lm_eval_metric": main, "metrics": metrics, "units": _sample_units(out.get("samples", {}).get(task), main, metrics[main])}


def _sample_units(samples: list[dict] | None, metric: str, reported: float) -> dict | None:
    """Per-item values of `metric` (in document order) when their mean is what lm-eval reported.

    A metric aggregated otherwise than by the mean (corpus BLEU, perplexity) has no per-item
    record a bootstrap can resample here: then None, and the set gets no interval.
    """
    values = []
    for sample in sorted(samples or [], key=lambda x: x.get("doc_id", 0)):
        v = sample.get(metric)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        values.append(float(v))
    if not values or abs(sum(values) / len(values) - reported) > 1e-9 * max(1.0, abs(reported)):
        return None
    return {"kind": "items", "main": metric, metric: values}

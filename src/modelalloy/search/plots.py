"""The search's plots (PNG): objective over trials, parameter importance, the Pareto front."""

from __future__ import annotations

import json
import warnings
from pathlib import Path


def write_plots(study, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    written = []
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]

    fig, axes = plt.subplots(len(study.directions), 1, figsize=(7, 2.8 * len(study.directions)), squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        xs = [t.number for t in trials]
        ys = [t.values[i] for t in trials]
        ax.scatter(xs, ys, s=14, label="trial")
        maximize = study.directions[i].name == "MAXIMIZE"
        best, running = [], None
        for y in ys:
            running = y if running is None else (max(running, y) if maximize else min(running, y))
            best.append(running)
        ax.step(xs, best, where="post", color="C3", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(names[i])
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = out_dir / "objective.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    importances = _importances(study)
    if importances:
        (out_dir / "importance.json").write_text(json.dumps(importances, indent=2) + "\n")
        top = sorted(importances.items(), key=lambda kv: kv[1])[-20:]
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(top) + 1.2))
        ax.barh([k for k, _ in top], [v for _, v in top])
        ax.set_xlabel("importance (share of objective variance)")
        fig.tight_layout()
        path = out_dir / "importance.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if len(study.directions) >= 2 and trials:
        front = {t.number for t in study.best_trials}
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        ax.scatter([t.values[0] for t in trials], [t.values[1] for t in trials], s=14, color="C0", label="trial")
        pts = sorted((t.values[0], t.values[1]) for t in trials if t.number in front)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="C3", label="Pareto front")
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "pareto.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _importances(study) -> dict[str, float]:
    """optuna's parameter importances for the first objective; {} when too few trials to tell."""
    import optuna

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study, target=lambda t: t.values[0]))
    except (RuntimeError, ValueError, ImportError, ZeroDivisionError):
        return {}

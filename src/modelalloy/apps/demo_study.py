"""`alloy demo-study`: `alloy study` on the demo's specialists (SmolLM2-135M fine-tuned on CPU).

The specialists are `alloy demo`'s (same corpora, same fine-tuning code, reused from its cache),
and each one's checkpoint after a share of its own training steps (half of them by default): the
two strengths of the study. Cutting the same run short (same seed, same batches, a warm-up that
does not depend on the length) makes that checkpoint the one the full run passed through; a
half-strength specialist trained to half the target gain instead would be the full one for the
three language domains, which reach the whole target at their first check. Held-out text of each domain (in the demo's pieces, the bootstrap's units) plus the
BBC news control are the sets. Sizes for a first run under half an hour on two CPU cores (27 min 30 s measured):
`eval_tokens` per set in windows of 128 (so ≥ 10 units, an interval per score),
every subset of k = 2..N, the six methods, the three fusion kinds, 32 prompts × 64 tokens of
greedy continuation per merge. Everything is cached under the demo's cache, so a rerun only
re-reads scores.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from modelalloy.apps.demo import CORPORA, DOMAINS, METHODS, DemoError, DemoSettings, StepProgress, base_checkpoint, fine_tune, pieces, specialist_dir


@dataclasses.dataclass(frozen=True)
class DemoStudySettings:
    domains: tuple[str, ...] = DOMAINS
    strengths: tuple[float, ...] = (0.5, 1.0)  # shares of each full specialist's training steps
    eval_tokens: int = 1536  # per set, in windows of 128: 12 units
    window: int = 128
    sample_per_k: int | None = 2  # subsets drawn per k (seeded); None: every one (11 for four domains)
    prompts: int = 32
    new_tokens: int = 64
    resamples: int = 1000
    quick: bool = False


def study_spec(cache: Path, settings: DemoStudySettings, progress: StepProgress | None = None) -> dict:
    """The study's YAML data, building the base and each specialist at each strength if missing."""
    unknown = [d for d in settings.domains if d not in CORPORA or d == "news"]
    if unknown:
        raise DemoError(f"unknown demo domain {unknown[0]!r}; choose from {', '.join(DOMAINS)}")
    demo = DemoSettings.quick(domains=settings.domains) if settings.quick else DemoSettings(domains=settings.domains)
    corpora = {name: CORPORA[name]() for name in (*settings.domains, "news")}
    base = base_checkpoint(cache, progress)
    specialists = []
    for name in settings.domains:
        full = fine_tune(base, corpora[name], specialist_dir(cache, name, demo), demo, progress)  # the demo's own
        steps = json.loads((full / "demo_training.json").read_text())["steps"]
        paths = []
        for share in settings.strengths:
            s = dataclasses.replace(demo, stop_after=max(1, round(share * steps)))  # the full run's first steps
            paths.append(str(full if share == 1.0 else fine_tune(base, corpora[name], specialist_dir(cache, name, s), s, progress)))
        specialists.append({"name": name, "checkpoints": paths})
    sets = [{"name": n, "texts": pieces(c.held_out), "max_tokens": settings.eval_tokens, "window": settings.window, "batch_size": 4}
            | ({"expert": n} if n in settings.domains else {}) for n, c in corpora.items()]
    return {
        "base": str(base),
        "specialists": specialists,
        "strengths": [f"{round(100 * s)}% of training" for s in settings.strengths],
        "sets": sets,
        "methods": list(METHODS),
        "experts": {"sample_per_k": settings.sample_per_k},
        "coherence": {"prompts": settings.prompts, "prompt_tokens": 16, "new_tokens": settings.new_tokens},
        "divergence": {"tokens": 512},
        "bootstrap": {"resamples": settings.resamples},
    }


def run_demo_study(cache: str | Path = ".cache/demo", out: str | Path | None = None, *, settings: DemoStudySettings = DemoStudySettings(),
                   progress: StepProgress | None = None, **ray) -> tuple[dict, dict[str, float]]:
    """(study.json's data, wall time per step) of the demo's study, written to `out` (default CACHE/study);
    `ray` (ray=, ray_address=, workers=) as `run_study` takes them."""
    from modelalloy.study import parse_study, run_study

    cache = Path(cache).resolve()  # the study's paths are taken as given, not from its folder
    cache.mkdir(parents=True, exist_ok=True)
    out = Path(out) if out else cache / ("study-quick" if settings.quick else "study")
    start = time.perf_counter()
    data = study_spec(cache, settings, progress)
    spec = parse_study(data, folder=cache, source="demo-study")
    if settings.quick:
        spec = spec.quick()
    built = time.perf_counter()
    result = run_study(spec, out, progress=progress, **ray)
    timings = {"training the specialists": round(built - start, 1)} | result.get("timings", {}) | {"total": round(time.perf_counter() - start, 1)}
    # Every run's laps, oldest first: a cached rerun does not hide what the first run took.
    history = out / "timings.json"
    try:
        runs = json.loads(history.read_text()).get("runs", [])
    except (OSError, ValueError, AttributeError):
        runs = []
    history.write_text(json.dumps({"runs": [*runs, {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": timings}]}, indent=1))
    return result, timings

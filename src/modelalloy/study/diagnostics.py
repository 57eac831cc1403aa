"""The diagnostics a merge can be judged by before it is evaluated.

- interference, per expert subset (as `alloy analyze` defines it, over every floating-point tensor):
  `sign_conflict` (among entries where two or more task vectors are nonzero, the share where both
  signs occur), `mean_cosine` (mean over pairs of the whole-model task-vector cosine), `norm_ratio`
  (largest ‖δ_i‖ / smallest: how much one parent dominates) and `relative_norm` (mean ‖δ_i‖ /
  ‖θ_base‖: how far the specialists moved);
- divergence, per pair of parents: linear CKA of their hidden states on shared text, per layer,
  and its mean; a subset's `mean_cka` is the mean over its pairs.

One streaming pass over the tensors serves every subset of a strength: one tensor of each model in
memory at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from itertools import combinations

import numpy as np
import torch

from modelalloy.analyze import sign_conflicts
from modelalloy.errors import PlanError
from modelalloy.io.opener import open_checkpoint
from modelalloy.study.measures import linear_cka
from modelalloy.study.probes import hidden_states

DIAGNOSTICS = ("sign_conflict", "mean_cosine", "norm_ratio", "relative_norm", "mean_cka")


def interference(
    base: str,
    experts: Mapping[str, str],
    subsets: Sequence[Sequence[str]],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[tuple[str, ...], dict]:
    """{subset: {sign_conflict, mean_cosine, norm_ratio, relative_norm}} for experts {name: dir}."""
    names = list(experts)
    index = {n: i for i, n in enumerate(names)}
    subsets = [tuple(s) for s in subsets]
    sq = np.zeros(len(names))
    dots = np.zeros((len(names), len(names)))
    base_sq = 0.0
    conflicts = {s: [0, 0] for s in subsets}
    with ExitStack() as stack:
        b = stack.enter_context(open_checkpoint(base))
        ckpts = [stack.enter_context(open_checkpoint(experts[n])) for n in names]
        tensors = [n for n in sorted(b.tensors, key=lambda n: (b.tensors[n].file, b.tensors[n].start)) if b.tensors[n].dtype.is_floating_point]
        for name, c in zip(names, ckpts):
            missing = next((t for t in tensors if t not in c.tensors), None)
            if missing is not None:
                raise PlanError(f"tensor {missing!r} is missing from specialist {name} ({experts[name]}); a study compares models of the base's layout")
        for t_i, t in enumerate(tensors):
            raw = b.read(t)
            base_t = raw.double()
            base_sq += float(base_t.square().sum())
            theirs = [c.read(t) for c in ckpts]
            if all(torch.equal(x, raw) for x in theirs):
                # No specialist changed it (top-layer fine-tunes leave most of the model as it was):
                # zero task vectors add nothing to the dot products and hold no nonzero entry.
                if progress:
                    progress(t_i + 1, len(tensors))
                continue
            deltas = torch.stack([x.double().flatten() - base_t.flatten() for x in theirs])  # [models, entries]
            del theirs
            dots += (deltas @ deltas.T).numpy()
            for s in subsets:
                c_, e_ = sign_conflicts([deltas[index[n]] for n in s])
                conflicts[s][0] += c_
                conflicts[s][1] += e_
            del deltas  # [models, entries] float64: the largest buffer, dropped before the next tensor
            if progress:
                progress(t_i + 1, len(tensors))
    sq = np.diag(dots)
    norms = np.sqrt(sq)
    out = {}
    for s in subsets:
        idx = [index[n] for n in s]
        cos = [dots[i, j] / (norms[i] * norms[j]) for i, j in combinations(idx, 2) if norms[i] and norms[j]]
        sub = norms[idx]
        out[s] = {
            "sign_conflict": conflicts[s][0] / conflicts[s][1] if conflicts[s][1] else None,
            "mean_cosine": float(np.mean(cos)) if cos else None,
            "norm_ratio": float(sub.max() / sub.min()) if sub.min() > 0 else None,
            "relative_norm": float(sub.mean() / math.sqrt(base_sq)) if base_sq else None,
        }
    return out


def divergence(states: Mapping[str, list[np.ndarray]]) -> list[dict]:
    """Per pair of parents: {"pair": [a, b], "cka_per_layer": [...], "mean_cka"} from their
    hidden states on the same tokens (`probes.hidden_states`)."""
    out = []
    for a, b in combinations(states, 2):
        per_layer = [linear_cka(x, y) for x, y in zip(states[a], states[b])]
        finite = [v for v in per_layer if math.isfinite(v)]
        out.append({"pair": [a, b], "cka_per_layer": per_layer, "mean_cka": float(np.mean(finite)) if finite else None})
    return out


def parent_states(models: Mapping[str, str], ids: Sequence[int], load) -> dict[str, list[np.ndarray]]:
    """Hidden states of each model {name: dir} on `ids`, loading one model at a time with `load`."""
    states = {}
    for name, ref in models.items():
        model = load(ref)
        states[name] = hidden_states(model, ids)
        del model  # one model at a time
    return states


def subset_cka(pairs: Sequence[dict], subset: Sequence[str]) -> float | None:
    """The mean over the subset's pairs of their mean CKA."""
    want = {frozenset(p) for p in combinations(subset, 2)}
    values = [d["mean_cka"] for d in pairs if frozenset(d["pair"]) in want and d["mean_cka"] is not None]
    return float(np.mean(values)) if values else None

"""Independent NumPy implementations of METHODS.md's formulas, written from the text, not the code.

float64 throughout; the library computes in float32, so comparisons use float32 tolerances.
"""

from __future__ import annotations

import numpy as np


def linear(thetas, weights, normalize=True):
    out = sum(w * t for w, t in zip(weights, thetas))
    return out / sum(weights) if normalize else out


def slerp(t, v0, v1):
    a, b = v0.ravel(), v1.ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    d = float(np.dot(a / max(na, 1e-8), b / max(nb, 1e-8)))
    if abs(d) > 0.9995:
        return (1 - t) * v0 + t * v1
    omega = np.arccos(d)
    return np.sin((1 - t) * omega) / np.sin(omega) * v0 + np.sin(t * omega) / np.sin(omega) * v1


def _slerp_rows(t, a, b):
    out = np.empty_like(a)
    for i in range(a.shape[0]):
        na, nb = np.linalg.norm(a[i]), np.linalg.norm(b[i])
        d = np.clip(np.dot(a[i] / na, b[i] / nb), -1, 1) if na > 1e-8 and nb > 1e-8 else 1.0
        omega = np.arccos(d)
        if abs(np.sin(omega)) < 1e-8:
            out[i] = (1 - t) * a[i] + t * b[i]
        else:
            out[i] = np.sin((1 - t) * omega) / np.sin(omega) * a[i] + np.sin(t * omega) / np.sin(omega) * b[i]
    return out


def nuslerp(thetas, weights, base=None, flatten=True, row_wise=False):
    total = weights[0] + weights[1]
    t = weights[1] / total if abs(total) >= 1e-6 else 0.5
    a, b = thetas
    if base is not None:
        a, b = a - base, b - base
    if flatten or a.ndim < 2:
        res = _slerp_rows(t, a.reshape(1, -1), b.reshape(1, -1)).reshape(a.shape)
    elif row_wise:
        res = _slerp_rows(t, a.T, b.T).T
    else:
        res = _slerp_rows(t, a, b)
    return res + base if base is not None else res


def topk_mask(delta, density):
    """Keep the k = int(density·n) largest |δ| (inputs in tests have no ties)."""
    if density >= 1:
        return np.ones(delta.shape, bool)
    flat = np.abs(delta).ravel()
    k = int(density * flat.size)
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    return keep.reshape(delta.shape)


def task_family(base, thetas, weights, masks=None, *, consensus=None, normalize=False, lam=1.0, rescale_l1=False):
    """METHODS.md's pipeline with the sparsification masks given (random masks come from the test)."""
    deltas = []
    for i, theta in enumerate(thetas):
        d = theta - base
        if masks is not None and masks[i] is not None:
            kept = d * masks[i]
            if rescale_l1 and np.abs(d).sum() > 1e-7 and np.abs(kept).sum() > 1e-7:
                kept = kept * (np.abs(d).sum() / np.abs(kept).sum())
            d = kept
        deltas.append(weights[i] * d)
    if consensus is None:
        mixed = sum(deltas)
        divisor = sum(weights)
        if abs(divisor) < 1e-8:
            divisor = 1.0
    else:
        if consensus == "sum":
            s = sum(deltas)
        else:
            s = sum(np.sign(d) for d in deltas)
        s = np.where(s >= 0, 1.0, -1.0)
        masks_agree = [np.sign(d) == s for d in deltas]
        mixed = sum(np.where(m, d, 0.0) for m, d in zip(masks_agree, deltas))
        divisor = sum(m * w for m, w in zip(masks_agree, weights))
        divisor = np.where(np.abs(divisor) < 1e-8, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed

"""Compare modelalloy's merge methods with mergekit's, tensor for tensor (a manual check, not a test).

Last run against mergekit 0.1.5 (PyPI): every case agrees to float32 rounding (≤ 3e-8).
mergekit is not a dependency. Put an installed copy on the path without touching the project's
environment, e.g.:

    pip install --no-deps --target /some/dir mergekit
    PYTHONPATH=/some/dir .venv/bin/python scripts/compare_with_mergekit.py

For random methods (DARE, DELLA) mergekit's `torch.bernoulli` is fed the uniform draws our
per-tensor generator makes, so both sides use the same masks and only the formulas are compared.
Prints one line per case: the largest absolute difference, or where we differ on purpose.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from mergekit.merge_methods.api import merge_tensors

from modelalloy.methods import get_method

SEED = 1234


def _inputs(shape=(64, 48), n=3, seed=0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.05
    models = []
    for i in range(n):
        delta = torch.randn(shape, generator=g) * 0.002
        if i == 1:  # a sparse fine-tune: most entries untouched
            delta = delta * (torch.rand(shape, generator=g) < 0.2)
        models.append(base + delta)
    return base, models


@contextlib.contextmanager
def _our_draws(seed: int) -> Iterator[None]:
    """mergekit's torch.bernoulli(p) answered with `rand < p` from our seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    original = torch.bernoulli

    def bernoulli(p, *args, **kwargs):
        return (torch.rand(p.shape, generator=generator, dtype=torch.float32) < p).to(p.dtype)

    torch.bernoulli = bernoulli
    try:
        yield
    finally:
        torch.bernoulli = original


def ours(name: str, base, models, **params) -> torch.Tensor:
    method = get_method(name)
    full = {}
    for p in method.params:
        value = params.get(p.name, p.default)
        full[p.name] = [value] * len(models) if p.per_model and not isinstance(value, list) else value
    return method(models, base=base if method.base != "unused" else None, generator=torch.Generator().manual_seed(SEED), **full)


def theirs(name: str, base, models, with_base=True, **params) -> torch.Tensor:
    tensors = ([base] if with_base else []) + models
    offset = 1 if with_base else 0
    per_input = {}
    for key, value in params.items():
        per_input[key] = {i + offset: v for i, v in enumerate(value)} if isinstance(value, list) else value
    with _our_draws(SEED):
        return merge_tensors(tensors, name, parameters=per_input, base_index=0 if with_base else None)


CASES = [
    ("multislerp", dict(weight=[0.5, 0.3, 0.2]), True),
    ("multislerp", dict(weight=[0.5, 0.3, 0.2]), False),
    ("karcher", dict(), False),
    ("nearswap", dict(t=0.001), True),
    ("breadcrumbs", dict(weight=[0.5, 0.3, 0.2], density=[0.7, 0.5, 0.9], gamma=[0.05, 0.01, 0.02]), True),
    ("breadcrumbs_ties", dict(weight=[1.0, 1.0, 1.0], density=[0.6, 0.6, 0.6], gamma=[0.02, 0.02, 0.02]), True),
    ("della", dict(weight=[0.5, 0.3, 0.2], density=[0.6, 0.5, 0.7], epsilon=[0.1, 0.2, 0.1], **{"lambda": 0.9}), True),
    ("della_linear", dict(weight=[0.5, 0.5, 0.5], density=[0.5, 0.5, 0.5], epsilon=[0.2, 0.2, 0.2]), True),
    ("dare_ties", dict(weight=[0.5, 0.3, 0.2], density=[0.6, 0.5, 0.7]), True),
    ("ties", dict(weight=[0.5, 0.3, 0.2], density=[0.6, 0.5, 0.7], consensus_method="count"), True),
    ("model_stock", dict(), True),
    ("model_stock", dict(filter_wise=True), True),
    ("sce", dict(select_topk=1.0), True),
    ("sce", dict(select_topk=0.3), True),
    ("arcee_fusion", dict(), True),
    ("ram", dict(), True),
    ("ramplus_tl", dict(r=0.2, alpha=0.5), True),
]


def main() -> None:
    base, models = _inputs()
    for name, params, with_base in CASES:
        n = 1 if name in ("nearswap", "arcee_fusion") else 3
        mk_params = dict(params)
        if name == "ties" and "consensus_method" in mk_params:
            # mergekit 0.1.5 has no consensus_method parameter: ties is always "sum".
            mk_params.pop("consensus_method")
            params = {**params, "consensus_method": "sum"}
        try:
            expected = theirs(name, base, models[:n], with_base=with_base, **mk_params)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{name:18s} {str(params):90.90s} mergekit failed: {type(e).__name__}: {e}")
            continue
        got = ours(name, base if with_base else None, models[:n], **params)
        diff = float((got - expected).abs().max())
        scale = float((expected - base).abs().max())
        print(f"{name:18s} {'base ' if with_base else 'no base'} {str(params):90.90s} max|ours − mergekit| = {diff:.3g} (task vector scale {scale:.3g})")

    # Small task vectors (|δ| ~ 1e-4): SCE's energies sum below 1e-6 and both use equal weights.
    tiny_base, tiny = base, [base + (m - base) * 0.05 for m in models]
    diff = float((ours("sce", tiny_base, tiny, select_topk=1.0) - theirs("sce", tiny_base, tiny, select_topk=1.0)).abs().max())
    print(f"sce with |δ| ~ 1e-4 (energy sum < 1e-6): max|ours − mergekit| = {diff:.3g}")

    # Where we differ on purpose.
    small_base = torch.zeros(50)
    small = [small_base + torch.linspace(-1, 1, 50)]
    got = ours("breadcrumbs", small_base, small, density=[0.5], gamma=[0.01])
    expected = theirs("breadcrumbs", small_base, small, weight=[1.0], density=[0.5], gamma=[0.01])
    print(f"breadcrumbs on 50 entries, gamma 0.01: nonzero ours {int((got != 0).sum())}, mergekit {int((expected != 0).sum())}")
    got = ours("karcher", None, models, weight=[3.0, 1.0, 1.0])
    expected = theirs("karcher", base, models, with_base=False)
    print(f"karcher with weight [3, 1, 1]: max|ours − mergekit (which ignores weights)| = {float((got - expected).abs().max()):.3g}")
    bf16 = [m.to(torch.bfloat16) for m in models[:1]]
    print(
        "arcee_fusion on bfloat16 inputs: ours",
        ours("arcee_fusion", base.to(torch.bfloat16), bf16).dtype,
        "mergekit",
        theirs("arcee_fusion", base.to(torch.bfloat16), bf16).dtype,
    )


if __name__ == "__main__":
    main()

"""Weight diagnostics against NumPy computed from the saved tensors directly."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from modelalloy.analyze import analyze, concentration, sign_conflicts, tensor_stats
from modelalloy.errors import PlanError


def _np_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Top-k singular subspaces by a full SVD, on the matrix's smaller side."""
    side = 0 if a.shape[0] <= a.shape[1] else 1

    def basis(x):
        u, _, vt = np.linalg.svd(x, full_matrices=False)
        return u[:, :k] if side == 0 else vt[:k].T

    ua, ub = basis(a), basis(b)
    return float(np.sum((ua.T @ ub) ** 2) / k)


def test_small_worked_examples():
    d = torch.tensor([3.0, -4.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    # sum of squares 26: the top 10 % (1 entry) holds 16, the top 20 % (2 entries) 25.
    assert concentration(d, (0.1, 0.2, 1.0)) == pytest.approx([16 / 26, 25 / 26, 1.0])
    assert concentration(torch.zeros(4)) == [None, None, None]
    a = torch.tensor([1.0, -1.0, 0.0, 2.0, 0.0])
    b = torch.tensor([1.0, 1.0, 3.0, -1.0, 0.0])
    c = torch.tensor([0.0, 1.0, -1.0, 0.0, 0.0])
    # entry 0: +,+ agree; 1: -,+,+ conflict; 2: +,- conflict; 3: +,- conflict; 4: none nonzero
    assert sign_conflicts([a, b, c]) == (3, 4)
    assert sign_conflicts([a, a]) == (0, 3)


def test_tensor_stats_match_numpy_on_random_matrices():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, 20, generator=g)
    models = [base + torch.randn(12, 20, generator=g) * s for s in (0.1, 0.2, 0.05)]
    stats = tensor_stats(base, models, top_k=3)
    deltas = [m.double().numpy() - base.double().numpy() for m in models]
    for i, j in itertools.combinations(range(3), 2):
        cos = np.dot(deltas[i].ravel(), deltas[j].ravel()) / (np.linalg.norm(deltas[i]) * np.linalg.norm(deltas[j]))
        assert stats["cosine"][f"{i},{j}"] == pytest.approx(cos, rel=1e-9)
        assert stats["subspace_overlap"][f"{i},{j}"] == pytest.approx(_np_overlap(deltas[i], deltas[j], 3), rel=1e-6)
    assert stats["norm"] == pytest.approx([np.linalg.norm(d) for d in deltas])
    # The same matrix twice spans the same subspace: overlap 1. Tall matrices use the other side.
    tall = torch.randn(30, 6, generator=g)
    same = tensor_stats(torch.zeros(30, 6), [tall, 2 * tall], top_k=4)
    assert same["subspace_overlap"]["0,1"] == pytest.approx(1.0)
    assert same["cosine"]["0,1"] == pytest.approx(1.0)
    assert tensor_stats(torch.zeros(30, 6), [tall, 0 * tall])["cosine"]["0,1"] is None


def test_analyze_streams_a_real_family_and_matches_numpy(families):
    fam = families("llama")
    refs = [str(fam[k]) for k in ("ft_dense", "ft_sparse", "ft_flip")]
    result = analyze(str(fam["base"]), refs, top_k=4, labels=["dense", "sparse", "flip"])
    base = load_file(fam["base"] / "model.safetensors")
    models = [load_file(fam[k] / "model.safetensors") for k in ("ft_dense", "ft_sparse", "ft_flip")]
    names = sorted(base)
    deltas = {n: [m[n].astype(np.float64) - base[n].astype(np.float64) for m in models] for n in names}
    by_name = {t["name"]: t for t in result.tensors}
    assert set(by_name) == set(names)
    n = "model.layers.1.mlp.up_proj.weight"
    d = deltas[n]
    stacked = np.stack([x.ravel() for x in d])
    nonzero = (stacked != 0).sum(0)
    conflict = ((stacked > 0).any(0) & (stacked < 0).any(0)).sum()
    assert by_name[n]["sign_conflict"] == pytest.approx(conflict / (nonzero >= 2).sum())
    top10 = np.sort(d[1].ravel() ** 2)[::-1][: math.ceil(0.1 * d[1].size)].sum() / (d[1] ** 2).sum()
    assert by_name[n]["concentration"][1][1] == pytest.approx(top10)
    assert by_name[n]["subspace_overlap"]["0,2"] == pytest.approx(_np_overlap(d[0], d[2], 4), rel=1e-6)
    # Per layer and overall: norms and cosines of the concatenated task vectors.
    layer1 = [x for x in names if ".layers.1." in x]
    cat = [np.concatenate([deltas[x][i].ravel() for x in layer1]) for i in range(3)]
    row = next(r for r in result.layers if r["layer"] == 1)
    assert row["norm"]["sparse"] == pytest.approx(np.linalg.norm(cat[1]))
    assert row["cosine"]["dense · flip"] == pytest.approx(np.dot(cat[0], cat[2]) / (np.linalg.norm(cat[0]) * np.linalg.norm(cat[2])))
    everything = [np.concatenate([deltas[x][i].ravel() for x in names]) for i in range(3)]
    assert result.overall["cosine"]["dense · sparse"] == pytest.approx(
        np.dot(everything[0], everything[1]) / (np.linalg.norm(everything[0]) * np.linalg.norm(everything[1])))
    # The flipped fine-tune negates the dense delta on half its entries (scaled), so they disagree often.
    assert result.overall["sign_conflict"] > 0.3
    assert [r["layer"] for r in result.layers] == [0, 1, 2, 3]


def test_analyze_errors_name_the_tensor(tmp_path):
    from safetensors.torch import save_file

    for name, tensors in (("base", {"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 3)}), ("other", {"model.embed_tokens.weight": torch.zeros(4, 3)}),
                          ("wide", {"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 5)})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        save_file(tensors, tmp_path / name / "model.safetensors")
    base = str(tmp_path / "base")
    with pytest.raises(PlanError, match="needs at least one model"):
        analyze(base, [])
    with pytest.raises(PlanError, match=r"tensor 'model.layers.0.mlp.up_proj.weight' is missing from .*other; analyze compares models of the same layout"):
        analyze(base, [str(tmp_path / "other")])
    with pytest.raises(PlanError, match=r"shape \[4, 5\] in .*wide but \[4, 3\] in"):
        analyze(base, [str(tmp_path / "wide")])

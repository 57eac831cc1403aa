"""tsv, iso_c, iso_cts and wudi against independent NumPy implementations of the papers' formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from modelalloy import merge, parse_config
from modelalloy.methods import get_method
from modelalloy.methods.subspace import iso_cts_split


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: a torch thread pool only spins (10x slower on a shared, loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

RNG = np.random.default_rng(1234)


def _setup(shape=(12, 9), tasks=3, scale=0.1):
    base = RNG.standard_normal(shape)
    fts = [base + scale * RNG.standard_normal(shape) for _ in range(tasks)]
    return base, fts


def _run(name, base, fts, **params):
    method = get_method(name)
    full = {p.name: p.default for p in method.params}
    full.update(params)
    out = method([torch.from_numpy(x) for x in fts], base=torch.from_numpy(base), **full)
    return out.numpy()


def _polar(x):
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return p @ qt


# ---- NumPy references, written from the papers -------------------------------------------------


def np_tsv(base, fts, alpha=1.0):
    deltas = [f - base for f in fts]
    k = min(base.shape) // len(fts)
    svds = [np.linalg.svd(d, full_matrices=False) for d in deltas]
    u = np.hstack([u[:, :k] for u, _, _ in svds])
    s = np.concatenate([s[:k] for _, s, _ in svds])
    vt = np.vstack([vt[:k] for _, _, vt in svds])
    return base + alpha * _polar(u) @ np.diag(s) @ _polar(vt)


def np_iso_c(base, fts, alpha=1.0):
    u, s, vt = np.linalg.svd(sum(f - base for f in fts), full_matrices=False)
    return base + alpha * s.mean() * u @ vt


def np_iso_cts(base, fts, alpha=1.0, fraction=0.8):
    r, t = min(base.shape), len(fts)
    k, s_per = iso_cts_split(r, t, fraction)
    u, s, vt = np.linalg.svd(sum(f - base for f in fts), full_matrices=False)
    uc, sc, vtc = u[:, :k], s[:k], vt[:k]
    blocks_u, blocks_s, blocks_v = [uc], [sc], [vtc]
    for f in fts:
        d = f - base
        ui, si, vti = np.linalg.svd((np.eye(base.shape[0]) - uc @ uc.T) @ d, full_matrices=False)
        blocks_u.append(ui[:, :s_per])
        blocks_s.append(si[:s_per])
        blocks_v.append(vti[:s_per])
    sigma = np.concatenate(blocks_s).mean()
    return base + alpha * sigma * _polar(np.hstack(blocks_u)) @ _polar(np.vstack(blocks_v))


def np_wudi(base, fts):
    """Least squares by stacking: Σ_i ‖(τ − τ_i) τ_iᵀ‖²/n_i = ‖τ C − D‖² with C = [τ_iᵀ/√n_i]_i,
    D = [τ_i τ_iᵀ/√n_i]_i; min-norm solution by numpy's SVD-based lstsq."""
    taus = [f - base for f in fts]
    c = np.hstack([t.T / np.linalg.norm(t) for t in taus])
    d = np.hstack([t @ t.T / np.linalg.norm(t) for t in taus])
    sol, *_ = np.linalg.lstsq(c.T, d.T, rcond=None)
    return base + sol.T


def wudi_loss(tau, taus):
    return sum(np.sum(((tau - t) @ t.T) ** 2) / np.sum(t**2) for t in taus)


# ---- the checks -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 9), (7, 16)])
@pytest.mark.parametrize("tasks", [2, 3])
def test_tsv_matches_numpy(shape, tasks):
    base, fts = _setup(shape, tasks)
    np.testing.assert_allclose(_run("tsv", base, fts, alpha=0.7), np_tsv(base, fts, 0.7), atol=1e-10)


def test_tsv_one_task_is_that_task():
    base, fts = _setup((10, 6), 1)
    np.testing.assert_allclose(_run("tsv", base, fts), fts[0], atol=1e-10)


def test_tsv_of_tasks_in_orthogonal_subspaces_is_their_sum():
    # Ranks ≤ r/T in mutually orthogonal subspaces: nothing to decorrelate, nothing truncated.
    q_left, _ = np.linalg.qr(RNG.standard_normal((12, 12)))
    q_right, _ = np.linalg.qr(RNG.standard_normal((8, 8)))
    base = RNG.standard_normal((12, 8))
    fts = []
    for i in range(2):
        cols = slice(4 * i, 4 * i + 4)
        fts.append(base + q_left[:, cols] @ np.diag(RNG.uniform(0.5, 2, 4)) @ q_right[:, cols].T)
    expected = base + sum(f - base for f in fts)
    np.testing.assert_allclose(_run("tsv", base, fts), expected, atol=1e-10)


def test_tsv_with_more_tasks_than_rank_falls_back_to_the_mean():
    base, fts = _setup((2, 5), 3)
    expected = base + 0.5 * np.mean([f - base for f in fts], axis=0)
    np.testing.assert_allclose(_run("tsv", base, fts, alpha=0.5), expected, atol=1e-12)


@pytest.mark.parametrize("shape", [(12, 9), (6, 15)])
def test_iso_c_matches_numpy(shape):
    base, fts = _setup(shape, 3)
    np.testing.assert_allclose(_run("iso_c", base, fts, alpha=1.3), np_iso_c(base, fts, 1.3), atol=1e-10)


def test_iso_c_spectrum_is_flat():
    base, fts = _setup((10, 7), 3)
    s = np.linalg.svd(_run("iso_c", base, fts) - base, compute_uv=False)
    np.testing.assert_allclose(s, np.full_like(s, s.mean()), rtol=1e-10)


@pytest.mark.parametrize("shape,tasks,fraction", [((12, 9), 3, 0.8), ((16, 10), 2, 0.5), ((9, 20), 4, 0.3)])
def test_iso_cts_matches_numpy(shape, tasks, fraction):
    base, fts = _setup(shape, tasks)
    got = _run("iso_cts", base, fts, alpha=0.9, common_space_fraction=fraction)
    np.testing.assert_allclose(got, np_iso_cts(base, fts, 0.9, fraction), atol=1e-10)


def test_iso_cts_split_fills_the_rank():
    for r in range(1, 40):
        for t in range(1, 9):
            for fraction in (0.05, 0.3, 0.8, 1.0):
                k, s = iso_cts_split(r, t, fraction)
                assert k + t * s == r and k >= 0 and s >= 0
    assert iso_cts_split(768, 8, 0.8) == (616, 19)  # ⌊614.4⌋ common, the rest 154 → 19 per task, so 616 common


def test_iso_cts_with_fraction_one_is_iso_c():
    base, fts = _setup((10, 8), 3)
    np.testing.assert_allclose(_run("iso_cts", base, fts, common_space_fraction=1.0), np_iso_c(base, fts), atol=1e-10)


@pytest.mark.parametrize("shape,tasks", [((8, 12), 2), ((12, 5), 3), ((10, 10), 1), ((4, 12), 2)])  # last: G singular
def test_wudi_matches_least_squares(shape, tasks):
    base, fts = _setup(shape, tasks)
    got = _run("wudi", base, fts)
    np.testing.assert_allclose(got, np_wudi(base, fts), atol=1e-9)
    # and it is a minimum: any perturbation raises the paper's loss
    taus = [f - base for f in fts]
    best = wudi_loss(got - base, taus)
    for _ in range(5):
        assert wudi_loss(got - base + 1e-3 * RNG.standard_normal(shape), taus) >= best


def test_wudi_limits():
    base, fts = _setup((9, 7), 1)
    np.testing.assert_allclose(_run("wudi", base, fts), fts[0], atol=1e-10)  # one task: itself
    same = [fts[0]] * 3
    np.testing.assert_allclose(_run("wudi", base, same), fts[0], atol=1e-10)  # identical: that task


def test_wudi_conv1d_layout_is_the_transpose():
    base, fts = _setup((9, 14), 3)
    got = _run("wudi", base, fts, layout="in_out")
    expected = np_wudi(base.T, [f.T for f in fts]).T
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_wudi_adam_matches_numpy_adam():
    base, fts = _setup((6, 5), 2)
    taus = [f - base for f in fts]
    lr, steps = 1e-2, 25
    tau = sum(taus).copy()
    m = np.zeros_like(tau)
    v = np.zeros_like(tau)
    for step in range(1, steps + 1):
        grad = sum(2 * (tau - t) @ t.T @ t / np.sum(t**2) for t in taus)
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad**2
        tau = tau - lr * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
    got = _run("wudi", base, fts, solver="adam", iter_num=steps, lr=lr)
    np.testing.assert_allclose(got, base + tau, atol=1e-10)


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts", "wudi"])
def test_vectors_fall_back_to_the_mean_task_vector(name):
    base, fts = _setup((11,), 3)
    alpha = {} if name == "wudi" else {"alpha": 0.6}
    expected = base + alpha.get("alpha", 1.0) * np.mean([f - base for f in fts], axis=0)
    np.testing.assert_allclose(_run(name, base, fts, **alpha), expected, atol=1e-12)
    base2, fts2 = _setup((6, 4), 3)  # a matrix marked as a vector (an embedding) too
    expected2 = base2 + alpha.get("alpha", 1.0) * np.mean([f - base2 for f in fts2], axis=0)
    np.testing.assert_allclose(_run(name, base2, fts2, layout="vector", **alpha), expected2, atol=1e-12)


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts", "wudi"])
def test_inputs_are_not_modified(name):
    base, fts = _setup((8, 6), 3)
    tb, tf = torch.from_numpy(base.copy()), [torch.from_numpy(f.copy()) for f in fts]
    method = get_method(name)
    method(tf, base=tb, **{p.name: p.default for p in method.params} | {"layout": "out_in"})
    np.testing.assert_array_equal(tb.numpy(), base)
    for t, f in zip(tf, fts):
        np.testing.assert_array_equal(t.numpy(), f)


# ---- end to end through `alloy merge` on tiny real models --------------------------------------


def _load(path):
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts", "wudi"])
def test_merge_llama_end_to_end(families, tmp_path, name):
    fam = families("llama")
    config = parse_config(
        f"""
merge_method: {name}
base_model: {fam['base']}
models:
  - model: {fam['ft_dense']}
  - model: {fam['ft_sparse']}
  - model: {fam['ft_flip']}
dtype: float32
"""
    )
    out = merge(config, tmp_path / "out", threads=2)
    assert out.tensors > 0
    merged = _load(tmp_path / "out")
    base = {k: v.astype(np.float64) for k, v in _load(fam["base"]).items()}
    fts = [{k: v.astype(np.float64) for k, v in _load(fam[n]).items()} for n in ("ft_dense", "ft_sparse", "ft_flip")]
    reference = {"tsv": np_tsv, "iso_c": np_iso_c, "iso_cts": np_iso_cts, "wudi": np_wudi}[name]
    layer_weight = "model.layers.1.mlp.down_proj.weight"  # [32, 64]: a linear layer, merged as a matrix
    np.testing.assert_allclose(merged[layer_weight], reference(base[layer_weight], [f[layer_weight] for f in fts]), atol=2e-5)
    for vector in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"):
        expected = base[vector] + np.mean([f[vector] - base[vector] for f in fts], axis=0)
        np.testing.assert_allclose(merged[vector], expected, atol=1e-6)


def test_wudi_on_gpt2_treats_conv1d_weights_as_in_out(families, tmp_path):
    fam = families("gpt2")
    config = parse_config(
        f"""
merge_method: wudi
base_model: {fam['base']}
models:
  - model: {fam['ft_dense']}
  - model: {fam['ft_flip']}
"""
    )
    merge(config, tmp_path / "out", threads=1)
    merged = _load(tmp_path / "out")
    name = "transformer.h.2.attn.c_attn.weight"  # Conv1D [in 32, out 96]
    base = _load(fam["base"])[name].astype(np.float64)
    fts = [_load(fam[n])[name].astype(np.float64) for n in ("ft_dense", "ft_flip")]
    np.testing.assert_allclose(merged[name], np_wudi(base.T, [f.T for f in fts]).T, atol=2e-5)
    assert not np.allclose(merged[name], np_wudi(base, fts), atol=1e-4)  # the orientation matters

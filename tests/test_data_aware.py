"""fisher, regmean and `alloy stats`, against independent computations."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from safetensors.torch import save_file
from typer.testing import CliRunner

from modelalloy import merge, parse_config, plan_merge
from modelalloy.cli import app
from modelalloy.errors import CheckpointError, ConfigError, PlanError
from modelalloy.io.stats_file import save_stats
from modelalloy.methods import get_method
from modelalloy.stats import compute_stats


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: a torch thread pool only spins (10x slower on a shared, loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

RNG = np.random.default_rng(7)


def _call(name, tensors, stats, **params):
    method = get_method(name)
    full = {p.name: [p.default] * len(tensors) if p.per_model else p.default for p in method.params} | params
    out = method([torch.from_numpy(t) for t in tensors], stats=None if stats is None else [torch.from_numpy(s) for s in stats], **full)
    return out.numpy()


# ---- the methods on small matrices --------------------------------------------------------------


def test_fisher_is_the_fisher_weighted_mean():
    thetas = [RNG.standard_normal((4, 5)) for _ in range(3)]
    fishers = [RNG.uniform(0, 2, (4, 5)) for _ in range(3)]
    fishers[1][0, :] = 0.0  # no information there from model 1
    lam, eps = [1.0, 2.0, 0.5], 1e-3
    got = _call("fisher", thetas, fishers, weight=lam, epsilon=eps)
    num = sum(l * (f + eps) * t for l, f, t in zip(lam, fishers, thetas))
    den = sum(l * (f + eps) for l, f in zip(lam, fishers))
    np.testing.assert_allclose(got, num / den, rtol=1e-12)
    # hand-computed entry: (1·(F0+ε)θ0 + 2·(F1+ε)θ1 + 0.5·(F2+ε)θ2) / (same weights)
    i, j = 2, 3
    w = [lam[k] * (fishers[k][i, j] + eps) for k in range(3)]
    assert got[i, j] == pytest.approx(sum(w[k] * thetas[k][i, j] for k in range(3)) / sum(w))


def test_fisher_with_equal_fishers_is_the_plain_mean():
    thetas = [RNG.standard_normal(6) for _ in range(3)]
    same = np.full(6, 0.3)
    np.testing.assert_allclose(_call("fisher", thetas, [same] * 3), np.mean(thetas, axis=0), rtol=1e-12)


def _tasks(n_in=6, n_out=4, tokens=(20, 9, 14)):
    xs = [RNG.standard_normal((n, n_in)) for n in tokens]
    ws = [RNG.standard_normal((n_out, n_in)) for _ in tokens]  # torch Linear: [out, in]
    return xs, ws


def test_regmean_is_least_squares_on_the_union_of_the_data():
    xs, ws = _tasks()
    grams = [x.T @ x for x in xs]
    got = _call("regmean", ws, grams, alpha=1.0, layout="out_in")
    # Independent: one least-squares fit of a single layer to every model's outputs on its own data.
    x_all = np.vstack(xs)
    y_all = np.vstack([x @ w.T for x, w in zip(xs, ws)])
    w_ls, *_ = np.linalg.lstsq(x_all, y_all, rcond=None)
    np.testing.assert_allclose(got, w_ls.T, atol=1e-10)


def test_regmean_scales_off_diagonals_by_alpha():
    xs, ws = _tasks()
    grams = [x.T @ x for x in xs]
    alpha = 0.3
    scaled = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams]
    expected = np.linalg.solve(sum(scaled), sum(g @ w.T for g, w in zip(scaled, ws))).T
    np.testing.assert_allclose(_call("regmean", ws, grams, alpha=alpha, layout="out_in"), expected, atol=1e-10)
    # α = 0: per input feature a weighted mean with weights diag(G_i)
    d = [np.diag(g) for g in grams]
    expected0 = sum(w * di for w, di in zip(ws, d)) / sum(d)
    np.testing.assert_allclose(_call("regmean", ws, grams, alpha=0.0, layout="out_in"), expected0, atol=1e-10)


def test_regmean_conv1d_layout():
    xs, ws = _tasks()
    grams = [x.T @ x for x in xs]
    conv = [w.T.copy() for w in ws]  # GPT-2 Conv1D stores [in, out]
    np.testing.assert_allclose(_call("regmean", conv, grams, layout="in_out"), _call("regmean", ws, grams, layout="out_in").T, atol=1e-10)


def test_regmean_limits():
    xs, ws = _tasks()
    grams = [x.T @ x for x in xs]
    np.testing.assert_allclose(_call("regmean", [ws[0]], [grams[0]], layout="out_in"), ws[0], atol=1e-10)  # one model
    np.testing.assert_allclose(_call("regmean", [ws[1]] * 3, grams, layout="out_in"), ws[1], atol=1e-10)  # identical
    vectors = [RNG.standard_normal(5) for _ in range(3)]  # not a linear layer: averaged
    np.testing.assert_allclose(_call("regmean", vectors, None, layout="vector"), np.mean(vectors, axis=0), atol=1e-12)


def test_regmean_keeps_the_average_where_no_data_reached():
    # All data lives in the first 3 of 6 input directions: Σ G is singular.
    xs = [np.hstack([RNG.standard_normal((10, 3)), np.zeros((10, 3))]) for _ in range(2)]
    ws = [RNG.standard_normal((4, 6)) for _ in range(2)]
    got = _call("regmean", ws, [x.T @ x for x in xs], layout="out_in")
    x_all, y_all = np.vstack(xs), np.vstack([x @ w.T for x, w in zip(xs, ws)])
    np.testing.assert_allclose(x_all @ got.T, x_all @ np.linalg.lstsq(x_all, y_all, rcond=None)[0], atol=1e-9)
    np.testing.assert_allclose(got[:, 3:], np.mean(ws, axis=0)[:, 3:], atol=1e-10)


# ---- `alloy stats` on a tiny real model ---------------------------------------------------------


def _samples(n=5, vocab=128, seed=3):
    rng = np.random.default_rng(seed)
    return [[int(i) for i in rng.integers(0, vocab, int(rng.integers(2, 10)))] for _ in range(n)]


def _write_jsonl(path, samples):
    path.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in samples))
    return path


def _independent_fisher(model_dir, samples):
    """Per-sample gradients with torch.func (no hooks, no .backward), squared and averaged."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def log_likelihood(p, ids):
        logits = torch.func.functional_call(model, p, (ids[None],)).logits[0, :-1]
        return torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), ids[1:]].sum()

    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for s in samples:
        grads = torch.func.grad(log_likelihood)(params, torch.tensor(s))
        for k, g in grads.items():
            total[k] += g**2
    return model, {k: (v / len(samples)).numpy() for k, v in total.items()}


def test_stats_fisher_and_gram_match_independent_computation(families, tmp_path):
    fam = families("llama")
    samples = _samples()
    result = compute_stats(fam["ft_dense"], _write_jsonl(tmp_path / "d.jsonl", samples), tmp_path / "s.safetensors")
    assert (result.samples, result.tokens, result.skipped) == (5, sum(map(len, samples)), 0)
    stats = load_file(str(tmp_path / "s.safetensors"))
    model, fisher = _independent_fisher(fam["ft_dense"], samples)
    for name, expected in fisher.items():
        np.testing.assert_allclose(stats[f"fisher:{name}"], expected, rtol=2e-4, atol=1e-9, err_msg=name)
    assert float(np.abs(fisher["model.layers.1.mlp.up_proj.weight"]).sum()) > 0  # a real signal, not zeros
    # Gram matrices: inputs of layer 0's q_proj are input_layernorm(embeddings); lm_head's are the
    # final hidden states (after the final norm).
    q_in, head_in = [], []
    with torch.no_grad():
        for s in samples:
            out = model(torch.tensor([s]), output_hidden_states=True)
            q_in.append(model.model.layers[0].input_layernorm(out.hidden_states[0])[0])
            head_in.append(out.hidden_states[-1][0])
    q_in, head_in = torch.cat(q_in).double().numpy(), torch.cat(head_in).double().numpy()
    np.testing.assert_allclose(stats["gram:model.layers.0.self_attn.q_proj.weight"], q_in.T @ q_in, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats["gram:lm_head.weight"], head_in.T @ head_in, rtol=1e-4, atol=1e-4)
    assert "gram:model.embed_tokens.weight" not in stats  # an embedding is not a linear layer


def test_stats_from_text_with_the_models_tokenizer(families, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["merge", "the", "weights", "of", "models", "and", "measure", "[UNK]"]
    tok = Tokenizer(models.WordLevel({w: i + 3 for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model_dir = tmp_path / "model"
    shutil.copytree(families("llama")["ft_flip"], model_dir)
    (model_dir / "tokenizer_config.json").unlink()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(model_dir)
    lines = ["merge the weights of models", "", "and measure the models", "weights"]
    (tmp_path / "d.txt").write_text("\n".join(lines) + "\n")
    compute_stats(model_dir, tmp_path / "d.txt", tmp_path / "text.safetensors", kinds=("gram",))
    ids = [[tok.token_to_id(w) for w in line.split()] for line in lines if line]
    compute_stats(model_dir, _write_jsonl(tmp_path / "d.jsonl", ids), tmp_path / "ids.safetensors", kinds=("gram",))
    a, b = load_file(str(tmp_path / "text.safetensors")), load_file(str(tmp_path / "ids.safetensors"))
    assert a.keys() == b.keys() and all(k.startswith("gram:") for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_stats_input_errors(families, tmp_path):
    fam = families("llama")
    (tmp_path / "t.txt").write_text("hello world\n")
    with pytest.raises(ConfigError, match="tokenizer"):  # the test models ship no tokenizer
        compute_stats(fam["base"], tmp_path / "t.txt", tmp_path / "o.safetensors")
    (tmp_path / "bad.jsonl").write_text('{"input_ids": [1, 2]}\n{"txt": "x"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: each JSON line needs"):
        compute_stats(fam["base"], tmp_path / "bad.jsonl", tmp_path / "o.safetensors")
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        compute_stats(fam["base"], _write_jsonl(tmp_path / "v.jsonl", [[1, 999]]), tmp_path / "o.safetensors")
    runner = CliRunner()
    res = runner.invoke(app, ["stats", str(fam["base"]), str(tmp_path / "o.safetensors"), "--data", str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 2 and "missing.jsonl: data file not found" in res.output


# ---- merging with statistics -------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_stats(families, tmp_path_factory):
    """Statistics for two llama fine-tunes, made through the CLI."""
    fam = families("llama")
    root = tmp_path_factory.mktemp("stats")
    runner = CliRunner()
    paths = {}
    for i, name in enumerate(("ft_dense", "ft_flip")):
        data = _write_jsonl(root / f"{name}.jsonl", _samples(4, seed=10 + i))
        paths[name] = root / f"{name}.safetensors"
        res = runner.invoke(app, ["stats", str(fam[name]), str(paths[name]), "--data", str(data), "-q"])
        assert res.exit_code == 0, res.output
    return fam, paths


def _config(method, fam, stats, extra=""):
    return parse_config(
        f"""
merge_method: {method}
models:
  - model: {fam['ft_dense']}
    stats: {stats['ft_dense']}
  - model: {fam['ft_flip']}
    stats: {stats['ft_flip']}
{extra}
"""
    )


def _load(path):
    return {k: v.astype(np.float64) for k, v in load_file(str(path)).items()}


def test_regmean_merge_end_to_end(llama_stats, tmp_path):
    fam, stats = llama_stats
    merge(_config("regmean", fam, stats, "parameters: {alpha: 0.7}"), tmp_path / "out", threads=2)
    merged = _load(tmp_path / "out" / "model.safetensors")
    ws = [_load(fam[n] / "model.safetensors") for n in ("ft_dense", "ft_flip")]
    st = [_load(stats[n]) for n in ("ft_dense", "ft_flip")]
    name = "model.layers.2.self_attn.o_proj.weight"
    grams = [0.7 * s[f"gram:{name}"] + 0.3 * np.diag(np.diag(s[f"gram:{name}"])) for s in st]
    expected = np.linalg.solve(sum(grams), sum(g @ w[name].T for g, w in zip(grams, ws))).T
    np.testing.assert_allclose(merged[name], expected, rtol=1e-4, atol=1e-5)
    for vector in ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"):  # averaged
        np.testing.assert_allclose(merged[vector], (ws[0][vector] + ws[1][vector]) / 2, atol=1e-6)
    card = (tmp_path / "out" / "README.md").read_text()  # the statistics are inputs, hashed like models
    assert f"| `{stats['ft_flip']}` | statistics of `{fam['ft_flip']}` | - | `" in card
    assert f"statistics of `{fam['ft_flip']}` | - | `-` |" not in card


def test_fisher_merge_end_to_end(llama_stats, tmp_path):
    fam, stats = llama_stats
    merge(_config("fisher", fam, stats), tmp_path / "out", threads=2)
    merged = _load(tmp_path / "out" / "model.safetensors")
    ws = [_load(fam[n] / "model.safetensors") for n in ("ft_dense", "ft_flip")]
    st = [_load(stats[n]) for n in ("ft_dense", "ft_flip")]
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.norm.weight", "model.embed_tokens.weight"):
        f = [s[f"fisher:{name}"] + 1e-6 for s in st]
        np.testing.assert_allclose(merged[name], (f[0] * ws[0][name] + f[1] * ws[1][name]) / (f[0] + f[1]), rtol=1e-5, atol=1e-6)


def test_plan_estimates_the_gram_memory(llama_stats):
    fam, stats = llama_stats
    plan, _ = plan_merge(_config("regmean", fam, stats))
    down = next(r for r in plan.recipes if r.name == "model.layers.0.mlp.down_proj.weight")  # [32, 64]
    assert [s.tensor for s in down.stats] == ["gram:model.layers.0.mlp.down_proj.weight"] * 2
    # two float32 Grams of 64×64 are read, and a float64 solve of 64×64 is made, besides the inputs
    assert plan.peak_memory_estimate(1) - 400 * 2**20 >= 2 * 64 * 64 * 4 + 3 * 64 * 64 * 8


def test_plan_checks_the_statistics(llama_stats, families, tmp_path):
    fam, stats = llama_stats
    base_cfg = f"merge_method: regmean\nmodels:\n  - model: {fam['ft_dense']}\n    stats: {stats['ft_dense']}\n  - model: {fam['ft_flip']}\n"
    with pytest.raises(ConfigError, match=r"regmean needs gram statistics for .*ft_flip; add `stats: FILE`"):
        plan_merge(parse_config(base_cfg))
    # a Fisher-only file has no Gram matrices
    fisher_only = tmp_path / "f.safetensors"
    save_stats(fisher_only, fisher={"model.norm.weight": torch.ones(32)})
    with pytest.raises(PlanError, match=r"f.safetensors: no gram statistic for tensor 'model.layers.0.mlp.down_proj.weight'"):
        plan_merge(parse_config(base_cfg + f"    stats: {fisher_only}\n"))
    # a Gram of the wrong size (statistics of another model)
    wrong = tmp_path / "w.safetensors"
    gram = {k.removeprefix("gram:"): torch.from_numpy(v) for k, v in load_file(str(stats["ft_flip"])).items() if k.startswith("gram:")}
    gram["model.layers.3.mlp.down_proj.weight"] = torch.eye(32)
    save_stats(wrong, gram=gram)
    with pytest.raises(PlanError, match=r"gram statistic of 'model.layers.3.mlp.down_proj.weight' has shape \[32, 32\], but .* needs \[64, 64\]"):
        plan_merge(parse_config(base_cfg + f"    stats: {wrong}\n"))
    # not a statistics file at all
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="not a statistics file made by `alloy stats`"):
        plan_merge(parse_config(base_cfg + f"    stats: {plain}\n"))
    # the CLI says it in one line, exit code 2
    (tmp_path / "c.yaml").write_text(base_cfg + f"    stats: {wrong}\n")
    res = CliRunner().invoke(app, ["plan", str(tmp_path / "c.yaml")])
    assert res.exit_code == 2 and "needs [64, 64]" in res.output and "Traceback" not in res.output


def test_regmean_on_gpt2_conv1d(families, tmp_path):
    """GPT-2 keeps its linear layers as Conv1D, weight (in, out): the Gram is still (in, in)."""
    fam = families("gpt2")
    stats = {}
    for i, name in enumerate(("ft_dense", "ft_flip")):
        stats[name] = tmp_path / f"{name}.safetensors"
        compute_stats(fam[name], _write_jsonl(tmp_path / f"{name}.jsonl", _samples(10, seed=20 + i)), stats[name], kinds=("gram",))
    merge(_config("regmean", fam, stats), tmp_path / "out", threads=1)
    merged = _load(tmp_path / "out" / "model.safetensors")
    name = "transformer.h.1.mlp.c_fc.weight"  # (in 32, out 128)
    ws = [_load(fam[n] / "model.safetensors")[name] for n in ("ft_dense", "ft_flip")]
    grams = [_load(stats[n])[f"gram:{name}"] for n in ("ft_dense", "ft_flip")]
    assert grams[0].shape == (32, 32) and np.linalg.matrix_rank(sum(grams)) == 32  # enough tokens: a unique solution
    x = np.linalg.solve(sum(grams), sum(g @ w for g, w in zip(grams, ws)))
    np.testing.assert_allclose(merged[name], x, rtol=1e-4, atol=1e-5)

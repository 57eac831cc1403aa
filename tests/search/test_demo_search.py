"""`alloy demo-search`'s search-then-held-out comparison, on the tiny Llama family (no SmolLM2)."""

from __future__ import annotations

import math

import pytest
import torch

from modelalloy.config import load_config
from modelalloy.apps.demo_search import (
    DemoSearchSettings,
    compare_heldout,
    fixed_config,
    split_halves,
    write_evals,
    write_search_spec,
)
from modelalloy.evaluate import perplexity
from modelalloy.evaluate.sets import load_evals, read_texts
from modelalloy.inmemory import load_merged_model
from modelalloy.search import load_spec, run_search

POEM = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n" * 3
PROSE = "Der Ausschuss tagte am Dienstag.\n" * 6
NEWS = "The committee met on Tuesday and agreed to publish the report next week. " * 2


def test_split_halves_never_share_text():
    plays = ["line one\nline two\nline three\nline four\n", "a\nb\nc\nd\n"]
    search, held = split_halves("shakespeare", plays)
    assert [s + h for s, h in zip(search, held)] == plays  # cut at a line break, nothing lost
    assert all(s and h for s, h in zip(search, held))
    fortunes = [f"fortune {i}\n" for i in range(10)]
    search, held = split_halves("german", fortunes)
    assert search == fortunes[::2] and held == fortunes[1::2]


def _ppl(model, tokenizer, eval_set) -> float:
    with torch.no_grad():
        return perplexity(model, tokenizer, read_texts(eval_set), max_tokens=eval_set.max_tokens, window=eval_set.window)["perplexity"]


def test_search_then_heldout_comparison(tmp_path, lm_family):
    settings = DemoSearchSettings(method="ties", trials=3, sampler="random", layer_groups=2, search_tokens=60, heldout_tokens=60, window=32)
    base, specialists = lm_family["base"], {"poem": lm_family["ft_a"], "prose": lm_family["ft_b"]}
    halves = {"poem": split_halves("poem", [POEM]), "prose": split_halves("prose", [PROSE])}
    write_evals(tmp_path / "evals.yaml", {d: h[0] for d, h in halves.items()}, {d: h[1] for d, h in halves.items()}, [NEWS], settings)
    write_search_spec(tmp_path / "search.yaml", base, specialists, settings)
    spec = load_spec(tmp_path / "search.yaml")
    assert spec.objective.search == ["search_poem", "search_prose"] and spec.layer_groups == 2
    result = run_search(spec, tmp_path / "out")
    assert result.trials == 3

    methods = ("linear", "ties")
    cmp = compare_heldout(tmp_path, base, specialists, result.best_config, result.trials, methods=methods)
    sets = {s.name: s for s in load_evals(tmp_path / "evals.yaml")}
    held = ["heldout_poem", "heldout_prose", "heldout_news"]
    assert set(cmp.table) == {"base", "ft-poem", "ft-prose", "searched", *methods}
    assert all(set(scores) == set(held) for scores in cmp.table.values())

    # Each merged row, checked against the same config merged independently (the in-memory merge
    # that `alloy merge` shares bit for bit) and scored with plain perplexity.
    best = load_config(tmp_path / "out" / "best.yaml")
    for name, config in [("searched", best), *[(m, fixed_config(base, specialists, m, 0)) for m in methods]]:
        model, donor = load_merged_model(config)
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(donor)
        for s in held:
            assert cmp.table[name][s] == pytest.approx(_ppl(model.eval(), tokenizer, sets[s]), rel=1e-5), (name, s)
    # The search's own held-out report of its best agrees with the comparison.
    assert cmp.table["searched"]["heldout_poem"] == pytest.approx(result.holdout[next(iter(result.holdout))]["heldout_poem"]["score"], rel=1e-6)

    # Mean log-perplexity over the domains and mean NAI over the sets whose expert beat the base, by hand.
    t = cmp.table
    for row in cmp.rows:
        m = row["model"]
        assert row["mean_log_ppl"] == pytest.approx((math.log(t[m]["heldout_poem"]) + math.log(t[m]["heldout_prose"])) / 2)
        nais = [(t["base"][f"heldout_{d}"] - t[m][f"heldout_{d}"]) / (t["base"][f"heldout_{d}"] - t[f"ft-{d}"][f"heldout_{d}"])
                for d in ("poem", "prose") if t[f"ft-{d}"][f"heldout_{d}"] < t["base"][f"heldout_{d}"]]
        assert row["mean_nai"] == (pytest.approx(sum(nais) / len(nais)) if nais else None)
    fixed = {r["model"]: r["mean_log_ppl"] for r in cmp.rows if r["model"] != "searched"}
    assert cmp.best_fixed == min(fixed, key=fixed.get)
    searched = next(r for r in cmp.rows if r["model"] == "searched")["mean_log_ppl"]
    assert cmp.searched_beats_fixed == (searched < fixed[cmp.best_fixed])


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_untouched_tensors_skip_the_merge_bit_for_bit(tmp_path, lm_family, method):
    """Fine-tunes that changed only layer 1: trials take the base's tensors elsewhere, the same
    bits as the full merge computes."""
    import shutil

    from safetensors.torch import load_file, save_file

    from modelalloy.config import parse_config
    from modelalloy.search.trial import TrialEvaluator

    base = lm_family["base"]
    partials = []
    for seed in (3, 4):  # two fine-tunes that each changed only layer 1
        partial = tmp_path / f"ft_layer1_{seed}"
        shutil.copytree(base, partial)
        (weights,) = partial.glob("*.safetensors")
        tensors = load_file(weights)
        g = torch.Generator().manual_seed(seed)
        changed = [n for n in tensors if ".layers.1." in n]
        for n in changed:
            tensors[n] = tensors[n] + 0.05 * torch.randn(tensors[n].shape, generator=g)
        save_file(tensors, weights, metadata={"format": "pt"})
        partials.append(partial)
    config = parse_config(
        f"merge_method: {method}\nbase_model: {base}\nrandom_seed: 5\n"
        f"models:\n  - model: {partials[0]}\n    parameters: {{weight: 0.7, density: 0.6}}\n"
        f"  - model: {partials[1]}\n    parameters: {{weight: 0.4, density: 0.8}}\n"
    )
    evaluator = TrialEvaluator([str(base), *map(str, partials)], [])
    state, _ = evaluator.merged_state(config)
    skipped = {k[1] for k, equal in evaluator._equal_base.items() if equal}
    assert skipped and not skipped & set(changed) and set(changed) <= set(state)
    reference, _ = load_merged_model(config)
    expected = reference.state_dict()
    for name, tensor in state.items():
        assert torch.equal(tensor, expected[name]), name
    assert any(not torch.equal(state[n], tensors[n]) for n in changed)  # the merge did change layer 1

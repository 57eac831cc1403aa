"""`run_study` on tiny specialists: the keys other tools read, the fusion baselines, resuming."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from modelalloy.study import StudyError, load_study, parse_study, predict, run_study
from modelalloy.study import run as study_run
from modelalloy.study.spec import MethodSpec


@pytest.fixture(scope="module")
def quick(study_yaml, tmp_path_factory):
    out = tmp_path_factory.mktemp("quick-out")
    stages = []
    start = time.perf_counter()
    result = run_study(load_study(study_yaml).quick(), out, progress=lambda s, d, t: stages.append(s))
    return result, out, stages, time.perf_counter() - start


def test_quick_study_has_the_keys_others_read(quick):
    result, out, stages, seconds = quick
    assert seconds < 60
    assert json.loads((out / "study.json").read_text()) == json.loads(json.dumps(result))
    assert set(result) >= {"axes", "runs", "fusion", "divergence", "prediction"}
    assert result["axes"]["k"] == [2, 3] and result["axes"]["strengths"] == ["short", "long"] and result["axes"]["methods"] == ["linear", "task_arithmetic"]
    assert len(result["runs"]) == 2 * 2 * 2  # methods × one subset per k × strengths
    for r in result["runs"]:
        assert {"method", "experts", "k", "strength", "scores", "nai", "interference", "coherence"} <= set(r)
        assert r["k"] == len(r["experts"]) and set(r["nai"]) == {"value", "ci95"} and r["nai"]["ci95"] is not None
        assert set(r["interference"]) == {"sign_conflict", "mean_cosine", "norm_ratio", "relative_norm", "mean_cka"}
        assert r["interference"]["norm_ratio"] >= 1.0 and 0 <= r["interference"]["sign_conflict"] <= 1
        c = r["coherence"]
        assert c["entropy_ratio"] > 0 and {"distinct_2", "repeated_4gram", "parents_distinct_2", "parents_repeated_4gram"} <= set(c)
        assert r["held_in_cross_entropy"]["ci95"] is not None  # what the scaling-law fit reads
    kinds = {f["kind"] for f in result["fusion"]}
    assert kinds == {"moe", "ensemble", "oracle_routing"}
    for f in result["fusion"]:
        assert {"kind", "experts", "scores", "nai", "params", "forward_passes"} <= set(f)
    ens = next(f for f in result["fusion"] if f["kind"] == "ensemble")
    assert ens["forward_passes"] == ens["k"] and ens["params"] == ens["k"] * result["base"]["params"]
    moe = next(f for f in result["fusion"] if f["kind"] == "moe")
    assert moe["forward_passes"] == 1 and moe["params"] > result["base"]["params"] > 0
    assert len(result["divergence"]) == 2 * 3  # per strength, per pair of the three parents
    d = result["divergence"][0]
    assert len(d["cka_per_layer"]) == 2 and 0 < d["mean_cka"] <= 1
    assert [p["diagnostic"] for p in result["prediction"]] == ["sign_conflict", "mean_cosine", "norm_ratio", "relative_norm", "mean_cka"]
    assert all(p["n"] == 8 and -1 <= p["spearman_rho"] <= 1 for p in result["prediction"])
    curve = [c for c in result["curves"]["vs_k"] if c["family"] == "merge" and c["method"] == "linear" and c["strength"] == "long"]
    assert [c["k"] for c in curve] == [2, 3] and all(c["mean_nai"]["ci95"] for c in curve)
    # k = 1 (each specialist alone), 2 and 3: three points, too few for the three-parameter law.
    assert [(e["method"], e["strength"]) for e in result["scaling_law"]] == [(m, st) for st in ("short", "long") for m in ("linear", "task_arithmetic")]
    assert all(not e["fitted"] and e["reason"].startswith("3 distinct k (1, 2, 3)") for e in result["scaling_law"])
    assert (out / "draws.npz").is_file()
    assert set(result["timings"]) == {"base and specialists", "weight diagnostics and divergence", "merges", "ensembles", "mixtures of experts", "rating"}
    assert sum(result["timings"].values()) == pytest.approx(seconds, abs=5)
    assert [s for s in dict.fromkeys(stages) if s.startswith("stage")][:2] == ["stage 1/5: base and specialists", "stage 2/5: weight diagnostics (short)"]


def test_oracle_routing_is_each_experts_own_score(quick):
    result = quick[0]
    for f in (f for f in result["fusion"] if f["kind"] == "oracle_routing"):
        for name, s in f["scores"].items():
            expert = next(x["expert"] for x in result["axes"]["sets"] if x["name"] == name)
            if expert in f["experts"]:
                assert s["value"] == result["specialists"][f"{expert}@{f['strength']}"]["scores"][name]["value"]
                assert f["nai_per_set"][name]["value"] == pytest.approx(1.0)
        assert f["nai"]["value"] == pytest.approx(1.0)


def test_a_rerun_scores_nothing(quick, study_yaml, monkeypatch):
    _, out, _, _ = quick

    def no(*a, **k):
        raise AssertionError("a cached study loaded a model")

    monkeypatch.setattr(study_run, "_load_dir", no)
    monkeypatch.setattr(study_run._Merges, "load", no)
    again = run_study(load_study(study_yaml).quick(), out)
    assert [r["nai"] for r in again["runs"]] == [r["nai"] for r in quick[0]["runs"]]


def test_prediction_for_new_models(quick):
    result = quick[0]
    run = result["runs"][0]
    rows = predict(result, run["interference"], neighbours=1)
    sc = next(r for r in rows if r["diagnostic"] == "sign_conflict")
    assert sc["predicted_nai"] == pytest.approx(run["nai"]["value"]) and sc["n"] == 8


def test_study_file_errors_name_the_field(study_yaml):
    import yaml

    data = yaml.safe_load(study_yaml.read_text())
    with pytest.raises(StudyError, match="expert 'prse' is not a specialist.*did you mean 'prose'"):
        parse_study(data | {"sets": [{"name": "x", "texts": ["a b"], "expert": "prse"}]})
    with pytest.raises(StudyError, match="at least two specialists"):
        parse_study(data | {"specialists": data["specialists"][:1]})
    with pytest.raises(StudyError, match="same number of checkpoints"):
        parse_study(data | {"specialists": [data["specialists"][0], {"name": "y", "model": "m"}]})
    with pytest.raises(StudyError, match="methods: .*ties"):
        parse_study(data | {"methods": ["tie"]})
    with pytest.raises(StudyError, match="unknown key 'method'"):
        parse_study(data | {"method": ["ties"]})


def test_subsets_are_every_one_or_a_seeded_sample(study_yaml):
    spec = load_study(study_yaml)
    assert spec.subsets() == [("prose", "digits"), ("prose", "shout"), ("digits", "shout"), ("prose", "digits", "shout")]
    sampled = spec.model_copy(update={"experts": spec.experts.model_copy(update={"sample_per_k": 2, "seed": 3})})
    assert sampled.subsets() == sampled.subsets() and len(sampled.subsets()) == 3


def test_merges_measured_on_a_local_ray_instance_match_one_process(quick, study_yaml, tmp_path):
    ray = pytest.importorskip("ray")
    try:
        result = run_study(load_study(study_yaml).quick(), tmp_path / "ray", ray=True, workers=2)
    finally:
        ray.shutdown()
    one = quick[0]["runs"]
    assert [(r["method"], r["experts"], r["strength"]) for r in result["runs"]] == [(r["method"], r["experts"], r["strength"]) for r in one]
    for a, b in zip(result["runs"], one):
        assert a["nai"]["value"] == pytest.approx(b["nai"]["value"], rel=1e-6, abs=1e-9)
        assert a["coherence"]["distinct_2"] == pytest.approx(b["coherence"]["distinct_2"])


def test_diagnostics_are_also_ranked_within_each_method(quick):
    stats = pytest.importorskip("scipy.stats")
    result = quick[0]
    methods = sorted({r["method"] for r in result["runs"]})
    for row in result["prediction"]:
        assert sorted(row["by_method"]) == methods
        for m, within in row["by_method"].items():
            pairs = [(r["interference"][row["diagnostic"]], r["nai"]["value"]) for r in result["runs"] if r["method"] == m]
            assert within["n"] == len(pairs)
            expected = stats.spearmanr(*zip(*pairs)).statistic  # an independent implementation (average ranks for ties)
            if np.isnan(expected):
                assert within["spearman_rho"] is None or np.isnan(within["spearman_rho"])
            else:
                assert within["spearman_rho"] == pytest.approx(float(expected))


def test_study_merges_equal_the_in_memory_merge_of_evaluate(study_models, tmp_path):
    """The study's merges (inputs kept, untouched tensors taken from the base) give exactly what
    `evaluate.load_model` merges, for specialists that share their lower layers with the base."""
    import torch
    import transformers

    from modelalloy.evaluate.runner import load_model

    base = transformers.AutoModelForCausalLM.from_pretrained(study_models["base"], dtype=torch.float32)
    frozen = {k: v for k, v in base.state_dict().items() if k.startswith(("model.embed_tokens.", "model.layers.0."))}
    experts = []
    for name, paths in list(study_models["specialists"].items())[:2]:
        model = transformers.AutoModelForCausalLM.from_pretrained(paths[1], dtype=torch.float32)
        model.load_state_dict(frozen, strict=False)  # as a top-layer fine-tune: the base's bottom, bit for bit
        model.save_pretrained(tmp_path / name)
        experts.append(str(tmp_path / name))
    spec = parse_study({"base": str(study_models["base"]), "specialists": [{"name": f"e{i}", "model": p} for i, p in enumerate(experts)],
                        "sets": [{"name": "t", "texts": ["abc " * 20], "expert": "e0"}]}, folder=tmp_path, source="test")
    merges = study_run._Merges(spec)
    for method in ("ties", "dare_ties", "della", "task_arithmetic"):
        cfg = study_run.merge_config(spec, MethodSpec(method=method), experts)
        want = load_model(cfg)[0].state_dict()
        got = merges.load(cfg).state_dict()
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(want[k], got[k]), (method, k)


def test_the_study_summary_truncates_nothing_at_80_columns(monkeypatch, quick):
    from rich.console import Console

    from modelalloy.cli import common, studies

    console = Console(width=80, force_terminal=False, record=True)
    monkeypatch.setattr(common, "out", console)
    studies._print_study(quick[0])
    text = console.export_text()
    assert "…" not in text
    flat = "".join(text.split())  # a folded cell continues on the next line
    for r in quick[0]["runs"]:
        assert r["method"] in flat and "".join(r["strength"].split()) in flat

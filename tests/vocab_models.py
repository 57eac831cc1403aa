"""Tiny models whose tokenizers differ: added tokens, padded embeddings, a renamed special token.

Tokenizers are trained here with the `tokenizers` library (byte-level BPE, Unigram as
SentencePiece does it, WordPiece as BERT does it) and wrapped as transformers
`PreTrainedTokenizerFast`, saved beside tiny llama or BERT models whose embedding rows match.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "merging language models averages their weights",
    "tokens that a model lacks take a row from another model",
    "hello world, hello merge; embeddings line up by token",
] * 20
TEXT = "the lazy fox merges hello world"


def bpe_tokenizer(vocab_size: int = 300) -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def unigram_tokenizer(vocab_size: int = 120) -> transformers.PreTrainedTokenizerFast:
    """SentencePiece-style: Unigram model, Metaspace (▁) pre-tokenizer and decoder."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>")
    tok.train_from_iterator(CORPUS, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def wordpiece_tokenizer(vocab_size: int = 150) -> transformers.PreTrainedTokenizerFast:
    """BERT-style: WordPiece with ## continuations and [CLS] ... [SEP] around each text."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )


def with_added(tok: transformers.PreTrainedTokenizerFast, tokens: list[str], *, special: bool = True):
    tok = _clone(tok)
    tok.add_tokens([AddedToken(t, special=special, normalized=False) for t in tokens])
    return tok


def with_renamed(tok: transformers.PreTrainedTokenizerFast, old: str, new: str):
    """Same ids, but the special token `old` is called `new` (as if another eos marker was chosen)."""
    state = json.loads(tok.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    if isinstance(vocab, dict):
        vocab[new] = vocab.pop(old)
    for added in state["added_tokens"]:
        if added["content"] == old:
            added["content"] = new
    specials = {k: (new if v == old else v) for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)), **specials)


def _clone(tok):
    state = tok.backend_tokenizer.to_str()
    specials = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(state), **specials)


def llama_config(rows: int, *, tied: bool = False) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
        vocab_size=rows, max_position_embeddings=64, tie_word_embeddings=tied,
    )


def bert_config(rows: int) -> transformers.BertConfig:
    return transformers.BertConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, vocab_size=rows, max_position_embeddings=64
    )


def save_model(path: Path, config, tok, *, seed: int, like: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A model with `config`, weights = `like` + noise where shapes allow (new rows random), and `tok`."""
    torch.manual_seed(seed)
    cls = transformers.AutoModelForMaskedLM if isinstance(config, transformers.BertConfig) else transformers.AutoModelForCausalLM
    model = cls.from_config(config)
    if like is not None:
        g = torch.Generator().manual_seed(seed)
        state = model.state_dict()
        for name, value in state.items():
            if name in like and value.is_floating_point():
                old = like[name]
                rows = min(old.shape[0], value.shape[0]) if value.dim() else None
                noise = torch.randn(value.shape, generator=g) * 0.02
                if value.dim() and old.shape[1:] == value.shape[1:]:
                    value[:rows] = old[:rows] + noise[:rows]
        model.load_state_dict(state)
        if config.tie_word_embeddings:
            model.tie_weights()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}

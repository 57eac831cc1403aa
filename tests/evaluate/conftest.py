"""A tiny Llama family with a real (character-level) tokenizer saved beside the weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Every printable ASCII character and newline is one token; </s> ends a document."""
    chars = ["</s>", "<unk>", "\n"] + [chr(i) for i in range(32, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per character
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def tiny_llama(seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=128, max_position_embeddings=128, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def lm_family(tmp_path_factory) -> dict[str, Path]:
    """base, and two 'fine-tunes' (base + seeded deltas) with the tokenizer saved in each."""
    root = tmp_path_factory.mktemp("lm")
    tok = char_tokenizer()
    base = tiny_llama(0)
    paths = {}
    g = torch.Generator().manual_seed(7)
    for name, scale in (("base", 0.0), ("ft_a", 0.05), ("ft_b", 0.05)):
        model = tiny_llama(0)
        with torch.no_grad():
            for p, q in zip(model.parameters(), base.parameters()):
                p.copy_(q + scale * torch.randn(q.shape, generator=g))
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return paths


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core machine they only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

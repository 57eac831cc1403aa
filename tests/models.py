"""Tiny real models, built with transformers from configs and saved with save_pretrained.

Each family gets a base and three "fine-tunes": base + seeded deltas, one dense, one sparse (90 %
of entries untouched) and one that is the dense delta with the sign flipped on half the entries,
so that sign-consensus methods have real conflicts to resolve.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=4, vocab_size=128)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False),
    "mistral": lambda: transformers.MistralConfig(**TINY, num_key_value_heads=2, max_position_embeddings=64, sliding_window=32),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, num_key_value_heads=2, max_position_embeddings=64),
    "gemma": lambda: transformers.GemmaConfig(**TINY, num_key_value_heads=2, head_dim=8, max_position_embeddings=64),
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=128, n_positions=64),
    "bert": lambda: transformers.BertConfig(**TINY, max_position_embeddings=64),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, num_key_value_heads=2, head_dim=8, max_position_embeddings=64),
    "phi": lambda: transformers.PhiConfig(**TINY, max_position_embeddings=64),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**TINY, max_position_embeddings=64),
}
CAUSAL = {"llama", "mistral", "qwen2", "gemma", "gpt2", "qwen3", "phi", "gpt_neox"}


def build_family(root: Path, family: str, *, seed: int = 0) -> dict[str, Path]:
    """Write base, ft_dense, ft_sparse and ft_flip for `family` under root; returns their paths."""
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    cls = transformers.AutoModelForCausalLM if family in CAUSAL else transformers.AutoModelForMaskedLM
    base = cls.from_config(config)
    base.eval()
    paths = {"base": root / f"{family}-base"}
    base.save_pretrained(paths["base"])
    _write_tokenizer_files(paths["base"])
    state = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    dense = {k: torch.randn(v.shape, generator=g) * 0.02 if v.is_floating_point() else None for k, v in state.items()}
    variants = {
        "ft_dense": lambda k, d: d,
        "ft_sparse": lambda k, d: d * (torch.rand(d.shape, generator=g) < 0.1) * 3,
        "ft_flip": lambda k, d: -d * torch.where(torch.rand(d.shape, generator=g) < 0.5, 1.0, -0.5),
    }
    for name, make in variants.items():
        model = cls.from_config(config)
        new_state = {k: (v + make(k, dense[k]).to(v.dtype)) if dense[k] is not None else v for k, v in state.items()}
        model.load_state_dict(new_state, strict=False)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        paths[name] = root / f"{family}-{name}"
        model.save_pretrained(paths[name])
        _write_tokenizer_files(paths[name])
    return paths


def _write_tokenizer_files(path: Path) -> None:
    """A marker tokenizer_config.json and generation_config.json, to check they are copied."""
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "marker": path.name}))

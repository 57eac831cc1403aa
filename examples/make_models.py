"""Make a small Llama base and two seeded "fine-tunes" of it, as Hugging Face checkpoints.

Used by scripts/example.sh (the README's first command) so that the end-to-end merge runs on a
fresh machine with no download: the models are built with transformers from a config.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers


def main(root: Path) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=4096, max_position_embeddings=256, tie_word_embeddings=False,
    )
    base = transformers.AutoModelForCausalLM.from_config(config)
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    for i, name in enumerate(("coder", "writer")):
        # A fine-tune is the base plus a seeded, sparse-ish task vector of its own.
        state = {
            k: v + torch.randn(v.shape, generator=g) * 0.01 * (torch.rand(v.shape, generator=g) < 0.3 + 0.2 * i)
            for k, v in base.state_dict().items()
        }
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.load_state_dict(state)
        model.save_pretrained(root / name)
    print(f"made base, coder and writer ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters) in {root}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

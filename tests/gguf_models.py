"""Small GGUF files written by the tests with the `gguf` package's own writer, as llama.cpp lays them out.

The Q/K row interleaving is written out here from llama.cpp's converter description (per head,
rows (half, pair) -> (pair, half)), independently of modelalloy's own implementation.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
BLOCK = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llama_cpp_name(name: str) -> str:
    if name in HF_TO_GGUF:
        return HF_TO_GGUF[name]
    parts = name.split(".")
    layer, inner, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
    return f"blk.{layer}.{BLOCK[inner]}.{kind}"


def interleave(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, state: dict[str, torch.Tensor], config, tok, *, qtypes: dict[str, gguf.GGMLQuantizationType] | None = None) -> None:
    """A llama GGUF of `state`; tensors F32 unless `qtypes` names another type for them."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(config.rope_theta if hasattr(config, "rope_theta") else 10000.0)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    state_json = json.loads(tok.backend_tokenizer.to_str())
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {str(a) for a in tok.added_tokens_decoder.values() if a.special}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state_json["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    qtypes = qtypes or {}
    for name, value in state.items():
        x = value.detach().float().numpy()
        if name.endswith(("q_proj.weight",)):
            x = interleave(x, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            x = interleave(x, config.num_key_value_heads)
        qtype = qtypes.get(name, gguf.GGMLQuantizationType.F32)
        data = gguf.quants.quantize(x, qtype) if qtype != gguf.GGMLQuantizationType.F32 else x
        w.add_tensor(llama_cpp_name(name), data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

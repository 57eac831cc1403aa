"""What a tensor name means, inferred from the name and config.json, for any architecture.

Transformer checkpoints name their repeated blocks ``<container>.<index>.<rest>``:
``model.layers.3.mlp.up_proj.weight`` (Llama, Mistral, Qwen, Gemma, Phi), ``transformer.h.3.attn``
(GPT-2), ``gpt_neox.layers.3`` (GPT-NeoX), ``bert.encoder.layer.3`` (BERT). The first such index
is the layer. Tensors outside the layers are "pre" (embeddings, which come before the first
layer) or "post" (final norm, LM head, pooler), which matters for slices and gradients.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Containers of repeated blocks, as named across the transformers library.
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|decoder_layers|encoder_layers)\.(\d+)\.")
_PRE = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|(^|\.)embeddings\.)")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# Model types whose layers use transformers' Conv1D, which stores its weight as [in, out].
_CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})

# Block kinds, checked in order; the first matching pattern names the block.
_KINDS: tuple[tuple[str, re.Pattern], ...] = (
    ("embedding", re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings")),
    ("head", re.compile(r"(^|\.)(lm_head|cls|classifier|score|qa_outputs|pooler)\.")),
    ("norm", re.compile(r"norm|(^|\.)ln_|layernorm|LayerNorm")),
    ("attention", re.compile(r"attn|attention|self_attn|q_proj|k_proj|v_proj|o_proj|query|key|value|qkv")),
    ("mlp", re.compile(r"mlp|ffn|feed_forward|intermediate|fc\d|up_proj|down_proj|gate_proj|(^|\.)output\.dense")),
)


@dataclass(frozen=True)
class TensorRole:
    layer: int | None  # index of the repeated block, None outside the layers
    position: str  # "pre", "layer" or "post"
    kind: str  # embedding, head, norm, attention, mlp or other


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def role(name: str) -> TensorRole:
    layer = layer_index(name)
    if layer is not None:
        position = "layer"
    else:
        position = "pre" if _PRE.search(name) else "post"
    kind = next((k for k, pattern in _KINDS if pattern.search(name)), "other")
    return TensorRole(layer, position, kind)


def linear_layout(config: dict, name: str, shape: tuple[int, ...]) -> str:
    """How a tensor is laid out as a linear map: "out_in" (torch Linear), "in_out" (Conv1D), or
    "vector" for anything that is not a layer's weight matrix (1-D tensors, embeddings, LM head)."""
    if len(shape) != 2 or role(name).kind in ("embedding", "head"):
        return "vector"
    if config.get("model_type") in _CONV1D_MODEL_TYPES and layer_index(name) is not None:
        return "in_out"
    return "out_in"


def with_layer(name: str, new_index: int) -> str:
    """The same tensor name in layer `new_index` (for slices that renumber layers)."""
    m = _LAYER.search(name)
    if m is None:
        raise ValueError(f"{name!r} is not inside a layer")
    return name[: m.start(1)] + str(new_index) + name[m.end(1) :]


def layer_count_key(config: dict) -> str | None:
    """The config.json key that holds the number of layers (text_config for multimodal models)."""
    return next((k for k in _LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)


def num_layers(config: dict, tensor_names) -> int:
    """Layers from config.json, else one more than the largest layer index among the tensors."""
    key = layer_count_key(config)
    if key is not None:
        return int(config[key])
    indices = [i for i in (layer_index(n) for n in tensor_names) if i is not None]
    return max(indices) + 1 if indices else 0


def _whole_number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_model_config(config: dict) -> str | None:
    """What is wrong with the config.json keys this package reads, or None. A layer count of
    "four" would otherwise be skipped for the tensor names' count, a "false" string read as
    true: the model would load differently elsewhere, so it is refused by name."""
    for scope, where in ((config, ""), (config.get("text_config"), "text_config.")):
        if not isinstance(scope, dict):
            continue
        for key in (*_LAYER_COUNT_KEYS, "vocab_size"):
            value = scope.get(key)
            if value is not None and not _whole_number(value):
                return f"{where}{key} is {value!r}, not a whole number; fix config.json (e.g. \"{key}\": 32)"
        tied = scope.get("tie_word_embeddings")
        if tied is not None and not isinstance(tied, bool):
            return f"{where}tie_word_embeddings is {tied!r}, not true or false; fix config.json"
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        return f"architectures is {archs!r}, not a list of class names; fix config.json (e.g. [\"LlamaForCausalLM\"])"
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        return f"model_type is {model_type!r}, not a string; fix config.json"
    return None


def architecture(config: dict) -> str:
    archs = config.get("architectures") or []
    return archs[0] if archs else str(config.get("model_type", "unknown"))


def tied_embeddings(config: dict) -> bool:
    return bool(config.get("tie_word_embeddings", config.get("model_type") in ("gpt2", "bert", "gemma", "gemma2")))

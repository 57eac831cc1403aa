"""The models' tokenizers: loading them, the tokens they list, editing the output's, its chat template.

Vocabulary alignment (`vocab.py`) reads each input's token -> id map, its added and special
tokens, and drops the ids a model's embedding has no row for; `resolve_chat_template` picks the
template written with the output tokenizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelalloy.errors import CheckpointError, PlanError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from modelalloy.io.checkpoint import Checkpoint


def load_tokenizer(ckpt: Checkpoint):
    """The model's fast tokenizer (transformers), or a one-line CheckpointError."""
    own = getattr(ckpt, "load_tokenizer", None)
    if own is not None:  # GGUF files carry their tokenizer in the metadata
        return own()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(ckpt.path), use_fast=True, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for missing files
        raise CheckpointError(
            f"{ckpt.ref}: cannot load its tokenizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "vocabulary alignment needs tokenizer.json (or files transformers can convert) beside the weights"
        ) from None
    if not getattr(tok, "is_fast", False):
        raise CheckpointError(f"{ckpt.ref}: only a slow (Python) tokenizer is available; save a fast tokenizer (tokenizer.json)")
    return tok


def vocab_within(tok, rows: int) -> tuple[dict[str, int], list[str]]:
    """The tokenizer's token -> id map, without ids the embedding has no row for (those are listed)."""
    vocab = tok.get_vocab()
    if not vocab or max(vocab.values()) < rows:
        return vocab, []
    kept = {t: i for t, i in vocab.items() if i < rows}
    stripped = sorted((t for t, i in vocab.items() if i >= rows), key=vocab.get)
    return kept, stripped


def special_tokens(tok) -> set[str]:
    """The tokenizer's special tokens, the added ones marked special included."""
    specials = set(getattr(tok, "all_special_tokens", []) or [])
    for added in (getattr(tok, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            specials.add(str(added))
    return specials


def added_tokens(tok) -> list[str]:
    """Tokens added on top of the tokenizer's model (chat markers...), in id order."""
    decoder = getattr(tok, "added_tokens_decoder", None) or {}
    return [str(decoder[i]) for i in sorted(decoder)]


def without_tokens(tok, drop: list[str], ref: str):
    """A copy of `tok` without the added tokens `drop` (ids past the embedding)."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tok.backend_tokenizer.to_str())
    dropset = set(drop)
    in_model = [t for t in drop if t in (state.get("model", {}).get("vocab") or {})]
    if in_model:
        raise PlanError(
            f"{ref}: its tokenizer has {len(drop)} tokens past the {min(tok.get_vocab()[t] for t in drop)} embedding rows, "
            f"some in the base vocabulary (e.g. {in_model[0]!r}); this model's tokenizer and weights do not match"
        )
    state["added_tokens"] = [a for a in state.get("added_tokens", []) if a["content"] not in dropset]
    backend = Tokenizer.from_str(json.dumps(state))
    specials = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str) and v not in dropset}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


# ---------------------------------------------------------------------------------- chat template

# Written for modelalloy from the formats' public descriptions (ChatML, Llama 3, Alpaca, Mistral).
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
}


def resolve_chat_template(setting: str | None, toks: Mapping[str, Any], refs: list[str]) -> str | None:
    """`auto`: the template most inputs share (first mentioned wins ties); a builtin name; or the literal."""
    if setting is None:
        return None
    if setting == "auto":
        found = [t for t in (getattr(toks[r], "chat_template", None) for r in refs) if isinstance(t, str)]
        if not found:
            return None
        return max(dict.fromkeys(found), key=found.count)
    return CHAT_TEMPLATES.get(setting, setting)

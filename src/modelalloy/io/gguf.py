"""GGUF (llama.cpp's format) in and out, tensor by tensor, under Hugging Face names.

Reading: the header and metadata are parsed with the `gguf` package; each tensor is then read
with positioned reads into a fresh buffer (as for safetensors, so that a mapped file's pages do
not pile up in RSS) and dequantised alone. Names are mapped to the Hugging Face layout of the
llama family (llama, mistral, qwen2, qwen3), and the rows of Q and K, which llama.cpp's
converter interleaves for its rotary embedding on `llama` models, are put back in HF order.
config.json and the tokenizer are recovered from the metadata by transformers' GGUF support.

Writing: the output layout is known before any arithmetic (every tensor's name, shape and type),
so the header, metadata and tensor table are written first and each finished tensor is
quantised and written at its own offset, in any order, from any thread.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from struct import error as struct_error
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelalloy.errors import CheckpointError, OutputError
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.files import check_regular
from modelalloy.io.safetensors_format import TensorLocation

# GGUF architectures we map, and the transformers classes their configs name.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
HF_TO_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# llama-family tensor names: GGUF -> Hugging Face (inside `model.layers.N.` for blk.N.*).
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_HF = {v: k for k, v in _BLOCK.items()}
_GLOBAL_HF = {v: k for k, v in _GLOBAL.items()}
# Derived from the config on load (llama-3 rope factors), never merged.
_SKIP = {"rope_freqs.weight"}


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if not llama-family."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m:
        inner = _BLOCK.get(m.group(2))
        return f"model.layers.{m.group(1)}.{inner}.{m.group(3)}" if inner else None
    stem, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL[stem]}.{kind}" if stem in _GLOBAL else None


def gguf_name(hf: str) -> str | None:
    """The inverse of `hf_name`."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
    if m:
        inner = _BLOCK_HF.get(m.group(2))
        return f"blk.{m.group(1)}.{inner}.{m.group(3)}" if inner else None
    stem, _, kind = hf.rpartition(".")
    return f"{_GLOBAL_HF[stem]}.{kind}" if stem in _GLOBAL_HF else None


def _rope_heads(hf: str, config: dict) -> int | None:
    """Heads whose rows llama.cpp's converter interleaved in this tensor (q: heads, k: kv heads)."""
    if config.get("model_type") not in ("llama", "mistral"):
        return None  # qwen2/qwen3 use the NeoX rotary layout, stored as is
    if hf.endswith("self_attn.q_proj.weight") or hf.endswith("self_attn.q_proj.bias"):
        return int(config["num_attention_heads"])
    if hf.endswith("self_attn.k_proj.weight") or hf.endswith("self_attn.k_proj.bias"):
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def unpermute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's row order: per head, rows (pair, half) -> (half, pair). Shape kept."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF row order -> llama.cpp's (the inverse of `unpermute_rope`)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class _Stored:
    name: str  # GGUF name
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # elements, numpy (row-major) order
    start: int
    nbytes: int


@dataclass
class GGUFCheckpoint(Checkpoint):
    """A GGUF file opened like a Hugging Face checkpoint: HF names, HF config, float tensors."""

    file: Path = Path()
    _stored: dict[str, _Stored] = field(default_factory=dict, repr=False)
    _tokenizer: Any = field(default=None, repr=False)

    def read(self, name: str) -> torch.Tensor:
        import gguf

        stored = self._stored.get(name)
        if stored is None:
            raise CheckpointError(f"{self.ref}: no tensor named {name!r}")
        raw = np.empty(stored.nbytes, dtype=np.uint8)
        view, done, fd = memoryview(raw), 0, self._fd(str(self.file))
        while done < stored.nbytes:  # positioned reads into our own buffer (no mapped pages)
            got = os.preadv(fd, [view[done:]], stored.start + done)
            if got <= 0:
                raise CheckpointError(f"{self.file}: tensor {stored.name!r} is cut short; the file is truncated")
            done += got
        q = gguf.GGMLQuantizationType
        if stored.qtype == q.F32:
            out = torch.from_numpy(raw.view(np.float32).reshape(stored.shape))
        elif stored.qtype == q.F16:
            out = torch.from_numpy(raw.view(np.float16).reshape(stored.shape))
        elif stored.qtype == q.BF16:
            out = torch.from_numpy(raw.view(np.int16).reshape(stored.shape)).view(torch.bfloat16)
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(stored.shape, stored.qtype)
            out = torch.from_numpy(gguf.quants.dequantize(raw.reshape(byte_shape), stored.qtype).astype(np.float32, copy=False))
        heads = _rope_heads(name, self.config)
        return unpermute_rope(out, heads).contiguous() if heads else out

    def load_tokenizer(self):
        """The fast tokenizer transformers builds from the GGUF metadata (cached)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.file.parent), gguf_file=self.file.name)
            except Exception as e:  # transformers raises ValueError/KeyError/... for unsupported tokenizers
                raise CheckpointError(f"{self.file}: cannot rebuild its tokenizer from the GGUF metadata ({type(e).__name__}: {e})") from None
        return self._tokenizer


def find_gguf(ref: str) -> Path | None:
    """The GGUF file a reference means: a .gguf file, or a directory whose weights are one .gguf."""
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise CheckpointError(f"{ref}: holds several GGUF files ({names}); name the one to merge")
        if found:
            check_regular(found[0])  # a pipe named model.gguf would block the reader forever
        return found[0] if found else None
    return None


def _read_header(file: Path) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int, int, int]]]:
    """(metadata without the long token arrays, [(name, numpy shape, ggml type, absolute start, nbytes)]).

    transformers' header reader parses the metadata in milliseconds; the `gguf` package's reader
    (the fallback for transformers versions without it) builds an array per token and takes seconds.
    """
    try:
        from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata
    except ImportError:
        GgufHeader = None
    if GgufHeader is not None:
        header = GgufHeader.from_file(str(file))
        metadata, _ = read_gguf_metadata(str(file))
        tensors = [(t.name, tuple(t.shape), int(t.ggml_type), header.data_start + t.offset, t.nbytes) for t in header.tensors]
        return metadata, tensors
    import gguf

    reader = gguf.GGUFReader(file)
    metadata = {k: f.contents() for k, f in reader.fields.items() if not (k.startswith("tokenizer.ggml.") and len(f.data) > 1)}
    tensors = [(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), int(t.tensor_type), int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
    return metadata, tensors


# GGUF metadata key (after the architecture prefix) -> config.json key, for the llama family.
_CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
}
_TOKEN_IDS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "padding_token_id": "pad_token_id"}


def _config(metadata: dict[str, Any], arch: str, names: set[str], rows: int | None) -> dict:
    config: dict[str, Any] = {"architectures": [ARCHITECTURES[arch]], "model_type": arch}
    for key, hf in _CONFIG_KEYS.items():
        if f"{arch}.{key}" in metadata:
            config[hf] = metadata[f"{arch}.{key}"]
    if arch == "llama" and "llama.rope.dimension_count" in metadata:
        config["head_dim"] = metadata["llama.rope.dimension_count"]
    scaling = metadata.get(f"{arch}.rope.scaling.type")
    if scaling and scaling != "none":
        config["rope_scaling"] = {"rope_type": scaling, "factor": float(metadata.get(f"{arch}.rope.scaling.factor", 1.0))}
    for key, hf in _TOKEN_IDS.items():
        if f"tokenizer.ggml.{key}" in metadata:
            config[hf] = metadata[f"tokenizer.ggml.{key}"]
    config["tie_word_embeddings"] = "lm_head.weight" not in names
    config["vocab_size"] = rows if rows is not None else metadata.get(f"{arch}.vocab_size")
    return config


def open_gguf_reference(ref: str, *, allow_pickle: bool, open_any: Callable[..., Checkpoint]) -> GGUFCheckpoint | None:
    """The input format GGUF: a .gguf file, or a directory whose only weights are one; else None."""
    file = find_gguf(ref)
    return open_gguf(ref, file) if file is not None else None


def open_gguf(ref: str, file: Path) -> GGUFCheckpoint:
    """Parse a GGUF file's header: HF names, shapes and config; no tensor data is read."""
    import gguf

    try:
        metadata, entries = _read_header(file)
    except (ValueError, OSError, IndexError, KeyError, struct_error) as e:
        raise CheckpointError(f"{file}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{file}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    stored: dict[str, _Stored] = {}
    tensors: dict[str, TensorLocation] = {}
    q = gguf.GGMLQuantizationType
    dtypes = {q.F16: torch.float16, q.BF16: torch.bfloat16}
    for gname, shape, qtype, start, nbytes in entries:
        if gname in _SKIP:
            continue
        name = hf_name(gname)
        if name is None:
            raise CheckpointError(f"{file}: tensor {gname!r} has no Hugging Face name for a {arch} model")
        qtype = q(qtype)
        stored[name] = _Stored(gname, qtype, shape, start, nbytes)
        dtype = dtypes.get(qtype, torch.float32)  # quantised types dequantise to float32
        tensors[name] = TensorLocation(name, str(file), dtype, shape, start, start + nbytes)
    emb = tensors.get("model.embed_tokens.weight")
    config = _config(metadata, arch, set(tensors), emb.shape[0] if emb else None)
    return GGUFCheckpoint(ref=ref, path=file.parent, config=config, tensors=tensors, file=file, _stored=stored)


# ----------------------------------------------------------------------------------- writing

OUT_TYPES = ("f32", "f16", "bf16", "q8_0")


def _qtype(out_type: str, shape: tuple[int, ...]):
    import gguf

    q = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return q.F32  # norms and biases stay in float32, as llama.cpp keeps them
    if out_type == "q8_0":
        block = gguf.GGML_QUANT_SIZES[q.Q8_0][0]
        return q.Q8_0 if shape[-1] % block == 0 else q.F16  # rows not a multiple of 32 cannot be blocked
    return {"f32": q.F32, "f16": q.F16, "bf16": q.BF16}[out_type]


def _tokenizer_metadata(writer, tokenizer, rows: int, pre: str) -> None:
    """Byte-level BPE tokenizer -> `tokenizer.ggml.*` (tokens by id, types, merges, special ids)."""
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state.get("model", {})
    byte_level = '"ByteLevel"' in json.dumps(state.get("pre_tokenizer"))
    if model.get("type") != "BPE" or not byte_level:
        # SentencePiece-style vocabularies (Unigram, or BPE over ▁-pieces) are llama.cpp's `llama` tokenizer,
        # which needs scores and byte tokens we do not write yet; writing them as `gpt2` would tokenize wrongly.
        kind = f"{model.get('type')}" + ("" if byte_level else " (not byte-level)")
        raise OutputError(f"--out-format gguf: writing a {kind} tokenizer to GGUF is not supported yet; only byte-level BPE (gpt2-style)")
    vocab = tokenizer.get_vocab()
    tokens = [f"[PAD{i}]" for i in range(rows)]  # rows without a token, as llama.cpp's converter names them
    types = [gguf.TokenType.UNUSED] * rows
    for tok, i in vocab.items():
        if i < rows:
            tokens[i], types[i] = tok, gguf.TokenType.NORMAL
    for i, added in (tokenizer.added_tokens_decoder or {}).items():
        if i < rows:
            types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for attr, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                      ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        token = getattr(tokenizer, attr, None)  # by name: a tokenizer without one may still report an id
        if isinstance(token, str) and vocab.get(token, rows) < rows:
            add(vocab[token])
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


class GGUFWriter:
    """Writes planned tensors (HF names) into one GGUF file; `write` is safe from several threads."""

    def __init__(self, path: Path, tensors: list, *, config: dict, tokenizer, out_type: str = "f16", name: str = "merged", pre: str = "default"):
        import gguf

        if out_type not in OUT_TYPES:
            raise OutputError(f"--out-type {out_type!r}: use one of {', '.join(OUT_TYPES)}")
        model_type = config.get("model_type")
        arch = HF_TO_GGUF_ARCH.get(model_type)
        if arch is None:
            raise OutputError(f"--out-format gguf: {model_type!r} models are not supported; supported: {', '.join(HF_TO_GGUF_ARCH)}")
        self.path, self.config = path, config
        w = gguf.GGUFWriter(path, arch)
        heads = int(config["num_attention_heads"])
        w.add_name(name)
        w.add_block_count(int(config["num_hidden_layers"]))
        w.add_context_length(int(config.get("max_position_embeddings", 2048)))
        w.add_embedding_length(int(config["hidden_size"]))
        w.add_feed_forward_length(int(config["intermediate_size"]))
        w.add_head_count(heads)
        w.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
        w.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
        w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        w.add_rope_dimension_count(int(config.get("head_dim") or config["hidden_size"] // heads))
        w.add_vocab_size(int(config["vocab_size"]))
        w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[out_type])  # llama.cpp's LLAMA_FTYPE values
        _tokenizer_metadata(w, tokenizer, int(config["vocab_size"]), pre)
        self._plan: dict[str, tuple[str, Any, tuple[int, ...], int, int]] = {}  # hf -> (gguf, qtype, shape, offset, nbytes)
        offset = 0
        for t in tensors:
            gname = gguf_name(t.name)
            if gname is None:
                raise OutputError(f"--out-format gguf: tensor {t.name!r} has no GGUF name (llama-family layouts only)")
            qtype = _qtype(out_type, t.shape)
            nbytes = math.prod(gguf.quants.quant_shape_to_byte_shape(t.shape, qtype))
            w.add_tensor_info(gname, t.shape, np.float32, nbytes, raw_dtype=qtype)
            self._plan[t.name] = (gname, qtype, t.shape, offset, nbytes)
            offset += w.ggml_pad(nbytes, w.data_alignment)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        self._data_start = w.ggml_pad(fout.tell(), w.data_alignment)
        w.close()
        self._fd = os.open(path, os.O_RDWR)
        os.ftruncate(self._fd, self._data_start + offset)
        self._lock = threading.Lock()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        import gguf

        gname, qtype, shape, offset, nbytes = self._plan[name]
        if tuple(tensor.shape) != shape:
            raise AssertionError(f"{name}: planned {shape}, got {tuple(tensor.shape)}")  # a bug of ours
        heads = _rope_heads(name, self.config)
        x = tensor.detach().to(torch.float32)
        if heads:
            x = permute_rope(x, heads)
        data = gguf.quants.quantize(x.contiguous().numpy(), qtype)
        raw = memoryview(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
        assert len(raw) == nbytes, (name, len(raw), nbytes)
        done = 0
        while done < nbytes:
            done += os.pwrite(self._fd, raw[done:], self._data_start + offset + done)

    def finalize(self) -> list[str]:
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        return [self.path.name]

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

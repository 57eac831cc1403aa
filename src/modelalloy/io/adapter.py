"""PEFT LoRA adapters: reading them lazily, and a base model with an adapter folded in on read.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys
are ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (``lora_embedding_A`` /
``lora_embedding_B`` for embeddings) plus full tensors for ``modules_to_save``. For a module,
PEFT's weight update is

    ΔW = s · B·A          (shape [out, in]; transposed when ``fan_in_fan_out``, as GPT-2's Conv1D)
    s  = α / r            (α / √r with ``use_rslora``)

with r and α taken from ``rank_pattern`` / ``alpha_pattern`` when a key there matches the module
(PEFT's rule: the first key k, in order, for which ``(.*\\.)?(k)$`` matches the module name). For
an embedding, ΔW = s · (B·A)ᵀ with A [r, num_embeddings], B [dim, r].

`AdapterCheckpoint` is what a ``base+adapter`` model reference opens: it looks like the base
checkpoint, but `read` returns W + ΔW, computed for that one tensor when it is read. That is how
an adapter is applied while streaming, with no merged copy on disk.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelalloy.errors import CheckpointError
from modelalloy.io.checkpoint import MAX_JSON_BYTES, Checkpoint
from modelalloy.io.files import check_regular, open_regular, read_regular
from modelalloy.io.safetensors_format import TensorLocation, read_header, read_tensor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")
# Parts of PEFT's LoRA variants whose arithmetic is not W + s·B·A: folding them as LoRA would be wrong.
_UNSUPPORTED = {
    "lora_magnitude_vector": "DoRA (use_dora)",
    "lora_B.bias": "lora_bias",
    "lora_A.bias": "lora_bias",
}


def match_pattern(patterns, module: str) -> str | None:
    """The first key of a PEFT rank_pattern / alpha_pattern that matches `module` (PEFT's rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its factors are and how its update is scaled."""

    module: str  # module name in the base model, e.g. model.layers.0.self_attn.q_proj
    a: str  # tensor names inside the adapter file
    b: str
    rank: int
    alpha: float
    scale: float
    embedding: bool
    fan_in_fan_out: bool

    @property
    def target(self) -> str:
        return self.module + ".weight"


@dataclass
class Adapter:
    """A PEFT LoRA adapter opened lazily: its config and where each tensor lives."""

    ref: str
    path: Path
    config: dict
    tensors: dict[str, TensorLocation]
    modules: dict[str, LoraModule]  # by base tensor name (module + ".weight")
    replaced: dict[str, str]  # modules_to_save: base tensor name -> adapter tensor name
    _fd: int | None = field(default=None, repr=False)

    def read(self, name: str) -> torch.Tensor:
        if self._fd is None:
            self._fd = open_regular(self.path / ADAPTER_WEIGHTS)
        return read_tensor(self._fd, self.tensors[name])

    def factors(self, target: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the module updating `target`, in float32, as stored (unscaled)."""
        m = self.modules[target]
        return self.read(m.a).float(), self.read(m.b).float()

    def delta(self, target: str) -> torch.Tensor:
        """ΔW for the base tensor `target`, in float32 and in that tensor's layout."""
        m = self.modules[target]
        a, b = self.factors(target)
        product = b @ a  # [out, r] @ [r, in] -> [out, in]; embeddings: [dim, r] @ [r, vocab]
        if m.embedding or m.fan_in_fan_out:
            product = product.T
        return product * m.scale

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def open_adapter(ref: str) -> Adapter:
    """Open a PEFT LoRA adapter directory: config and headers are read and checked, no weights."""
    from modelalloy.io.checkpoint import resolve_model_path

    path, _ = resolve_model_path(ref)
    config_file = path / ADAPTER_CONFIG
    check_regular(config_file)
    if not config_file.is_file():
        raise CheckpointError(f"{ref}: no {ADAPTER_CONFIG}; a LoRA adapter is a directory saved by PEFT's save_pretrained")
    try:
        config = json.loads(read_regular(config_file, limit=MAX_JSON_BYTES))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{config_file}: unreadable adapter config ({e})") from None
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{config_file}: peft_type {peft_type} is not LoRA; only LoRA adapters can be folded into weights")
    if config.get("use_dora"):
        raise CheckpointError(f"{config_file}: DoRA adapters (use_dora: true) rescale columns and are not supported; merge it with PEFT's merge_and_unload")
    weights = path / ADAPTER_WEIGHTS
    check_regular(weights)
    if not weights.is_file():
        hint = "; convert adapter_model.bin to safetensors first" if (path / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"{ref}: {ADAPTER_WEIGHTS} is missing{hint}")
    found, _ = read_header(str(weights))

    r0, alpha0 = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora, fan_in_fan_out = bool(config.get("use_rslora")), bool(config.get("fan_in_fan_out"))
    parts: dict[str, dict[str, str]] = {}
    replaced: dict[str, str] = {}
    for name in found:
        if not name.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{weights}: tensor {name!r} does not start with {PEFT_PREFIX!r}; not a PEFT adapter file")
        inner = name[len(PEFT_PREFIX) :]
        for suffix, what in _UNSUPPORTED.items():
            if inner.endswith(suffix) or f".{suffix}." in inner:
                raise CheckpointError(f"{weights}: {inner!r} belongs to {what}, which is not plain LoRA; not supported")
        m = _LORA_KEY.match(inner)
        if m:
            parts.setdefault(m["module"], {})[m["part"]] = name
        elif ".lora_" in inner:
            raise CheckpointError(f"{weights}: unknown LoRA tensor {inner!r}")
        else:
            # A module saved in full (modules_to_save), or the base layer of an adapted embedding
            # (PEFT's save_embedding_layers writes it as <module>.base_layer.weight).
            replaced[inner.replace(".base_layer.", ".")] = name
    modules: dict[str, LoraModule] = {}
    for module, p in parts.items():
        embedding = "lora_embedding_A" in p or "lora_embedding_B" in p
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        if a_key not in p or b_key not in p:
            raise CheckpointError(f"{weights}: module {module!r} has only one of {a_key}/{b_key}")
        rk, ak = match_pattern(rank_pattern, module), match_pattern(alpha_pattern, module)
        rank = int(rank_pattern[rk]) if rk is not None else r0
        alpha = float(alpha_pattern[ak]) if ak is not None else alpha0
        a_shape, b_shape = found[p[a_key]].shape, found[p[b_key]].shape
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != rank or b_shape[1] != rank:
            raise CheckpointError(
                f"{weights}: module {module!r} has A {list(a_shape)} and B {list(b_shape)}, which do not fit rank {rank} from the config"
            )
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        lm = LoraModule(module, p[a_key], p[b_key], rank, alpha, scale, embedding, fan_in_fan_out and not embedding)
        modules[lm.target] = lm
    return Adapter(ref, path, config, found, modules, replaced)


def delta_shape(m: LoraModule, tensors: dict[str, TensorLocation]) -> tuple[int, int]:
    out, inp = tensors[m.b].shape[0], tensors[m.a].shape[1]
    return (inp, out) if m.embedding or m.fan_in_fan_out else (out, inp)


@dataclass
class AdapterCheckpoint(Checkpoint):
    """A base checkpoint whose tensors are read with a LoRA adapter folded in (W + ΔW)."""

    adapter: Adapter | None = None
    base: Checkpoint | None = None

    def read(self, name: str) -> torch.Tensor:
        assert self.adapter is not None and self.base is not None
        if name in self.adapter.replaced:
            weight = self.adapter.read(self.adapter.replaced[name]).to(self.tensors[name].dtype)
        else:
            weight = self.base.read(name)
        if name not in self.adapter.modules:
            return weight
        # float32 sum, one rounding to the stored dtype (PEFT merges bf16 on CPU the same way).
        return (weight.float() + self.adapter.delta(name)).to(weight.dtype)

    def close(self) -> None:
        if self.base is not None:
            self.base.close()
        if self.adapter is not None:
            self.adapter.close()


def with_adapter(base: Checkpoint, adapter: Adapter, ref: str) -> AdapterCheckpoint:
    """`base` seen through `adapter`; every adapted tensor is checked against the base's shape."""
    for target, m in adapter.modules.items():
        loc = base.tensors.get(target)
        if loc is None:
            raise CheckpointError(f"{adapter.ref}: adapts {m.module!r}, but {base.ref} has no tensor {target!r}; was it trained on another model?")
        want = delta_shape(m, adapter.tensors)
        if tuple(loc.shape) != want:
            raise CheckpointError(
                f"{adapter.ref}: module {m.module!r} updates a {list(want)} weight, but {target!r} in {base.ref} is {list(loc.shape)}"
                + ("; set fan_in_fan_out to match the layer type" if tuple(loc.shape) == want[::-1] else "")
            )
    for target, name in adapter.replaced.items():
        loc = base.tensors.get(target)
        if loc is None:
            raise CheckpointError(f"{adapter.ref}: saves module tensor {target!r}, which {base.ref} does not have")
        if tuple(loc.shape) != tuple(adapter.tensors[name].shape):
            raise CheckpointError(f"{adapter.ref}: {target!r} is {list(adapter.tensors[name].shape)} in the adapter but {list(loc.shape)} in {base.ref}")
    return AdapterCheckpoint(ref=ref, path=base.path, config=base.config, tensors=base.tensors, revision=base.revision, adapter=adapter, base=base)


def open_base_plus_adapter(ref: str, *, allow_pickle: bool, open_any: Callable[..., Checkpoint]) -> AdapterCheckpoint | None:
    """The input format ``base+adapter`` (mergekit's syntax): the base, opened by `open_any` (any
    format), with the adapter folded in on read. None for any other reference (a path that
    exists, '+' and all, is a path)."""
    base_ref, plus, adapter_ref = ref.partition("+")
    if not (plus and base_ref and adapter_ref) or Path(ref).expanduser().exists():
        return None
    return with_adapter(open_any(base_ref, allow_pickle=allow_pickle), open_adapter(adapter_ref), ref)

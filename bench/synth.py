"""A synthetic Llama checkpoint and seeded fine-tunes, written straight in the safetensors format.

No transformers model is built (initialising 1B parameters through nn.Module costs minutes);
each tensor is drawn from a generator seeded by (model seed, tensor name), so a shard can be
written without holding the model. Variants are base + a seeded delta whose size keeps the
variant clearly apart from the base (cos ≈ 0.9988, so SLERP takes its real branch, not lerp).

A shard is written tensor by tensor (the header first, then each tensor's bytes as it is drawn):
the bytes are those `safetensors.torch.save_file` writes for the same tensors (a test compares
them), but only one tensor is held at a time, so the 7B's 10 GB shard costs ~1.5 GB of memory,
not the 20 GB that save_file's dict and its serialised copy would.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class LlamaSize:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    shard_bytes: int  # like a hub checkpoint: several shards plus an index (greedy, in tensor order)

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = h // self.num_attention_heads * self.num_key_value_heads
        shapes = [("model.embed_tokens.weight", (v, h))]
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            shapes += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]

    @property
    def parameters(self) -> int:
        return sum(math.prod(s) for _, s in self.tensor_shapes())

    @property
    def largest_tensor_bytes(self) -> int:
        return max(math.prod(s) for _, s in self.tensor_shapes()) * 2  # bf16

    @property
    def model_bytes(self) -> int:
        """The tensor bytes of one model (bf16), as the index's total_size says; headers not counted."""
        return self.parameters * 2

    def shards(self) -> list[list[tuple[str, tuple[int, ...]]]]:
        """The tensors of each shard, in order: a new shard starts where the next tensor would pass
        shard_bytes (transformers' rule for max_shard_size)."""
        shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        used = 0
        for name, shape in self.tensor_shapes():
            nbytes = math.prod(shape) * 2
            if shards[-1] and used + nbytes > self.shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, shape))
            used += nbytes
        return shards

    def config(self) -> dict:
        """A config.json that transformers' LlamaConfig and mergekit both accept."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        }


SIZES = {
    # ~0.15B: for developing the harness.
    "tiny": LlamaSize("tiny", 768, 2048, 6, 12, 4, 32000, 200_000_000),
    # ~0.5B: the second size for the memory check.
    "small": LlamaSize("small", 1536, 4096, 12, 16, 4, 32000, 500_000_000),
    # ~1.1B (TinyLlama's shape): the benchmark.
    "1b": LlamaSize("1b", 2048, 5632, 22, 32, 4, 32000, 1_000_000_000),
    # 6.74B, Llama-2-7B's shape (no grouped-query attention), sharded as meta-llama/Llama-2-7b-hf
    # is (max_shard_size 10GB): model-00001-of-00002 9.98 GB (embeddings and layers 0-23),
    # model-00002-of-00002 3.50 GB. The scaling curve's top size (largest tensor 262 MB).
    "7b": LlamaSize("7b", 4096, 11008, 32, 32, 32, 32000, 10_000_000_000),
}

DELTA_SCALE = 0.05  # delta std relative to the base's


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest(), "little") >> 1


def _base_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(_seed("base", name))
    if len(shape) == 1:  # RMSNorm weights sit around 1
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def _variant_tensor(name: str, shape: tuple[int, ...], variant: int) -> torch.Tensor:
    base = _base_tensor(name, shape)
    g = torch.Generator().manual_seed(_seed("variant", variant, name))
    scale = (0.05 if len(shape) == 1 else 0.02) * DELTA_SCALE
    return base.add_(torch.randn(shape, generator=g), alpha=scale)


def model_names(variants: int) -> list[str]:
    return ["base"] + [f"ft{v}" for v in range(1, variants + 1)]


def _header(entries: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The safetensors header of bf16 tensors laid out as save_file lays them: sorted by name
    (save_file sorts by dtype, then name), compact JSON, padded with spaces to 8 bytes."""
    header: dict[str, object] = {"__metadata__": metadata}
    pos = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_shard(path: Path, shard: list[tuple[str, tuple[int, ...]]], tensor, metadata: dict[str, str] | None = None) -> int:
    """Write one safetensors file of bf16 tensors, drawing each with `tensor(name, shape)` just
    before its bytes are written; returns the tensor bytes written."""
    entries = sorted(shard)
    total = 0
    with open(path, "wb") as f:
        f.write(_header(entries, metadata or {"format": "pt"}))
        for name, shape in entries:
            t = tensor(name, shape).to(torch.bfloat16)
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: drew shape {tuple(t.shape)}, expected {shape}")
            f.write(memoryview(t.contiguous().view(torch.int16).numpy()).cast("B"))
            total += t.numel() * 2
            del t
    return total


def write_model(out: Path, size: LlamaSize, variant: int) -> None:
    """Write one model (variant 0 = base) shard by shard, tensor by tensor."""
    out.mkdir(parents=True, exist_ok=True)
    shards = size.shards()
    weight_map = {}
    total = 0

    def draw(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return _base_tensor(name, shape) if variant == 0 else _variant_tensor(name, shape, variant)

    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        total += write_shard(out / file, shard, draw)
        weight_map.update({name: file for name, _ in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(size.config(), indent=2))


def _spec(size: LlamaSize, variants: int) -> str:
    return json.dumps({"size": asdict(size), "variants": variants, "delta": DELTA_SCALE, "v": 1}, sort_keys=True)


def models_ready(root: Path, size: LlamaSize, variants: int) -> bool:
    """Whether root/size.name holds the base and `variants` fine-tunes of this spec, complete."""
    folder = root / size.name
    stamp = folder / "SPEC.json"
    return stamp.exists() and stamp.read_text() == _spec(size, variants) and all((folder / n / "config.json").exists() for n in model_names(variants))


def bytes_to_generate(root: Path, size: LlamaSize, variants: int) -> int:
    """The disk space generating these models still needs: their bytes, less what earlier (partial
    or outdated) files of the same names hold, which are overwritten."""
    if models_ready(root, size, variants):
        return 0
    present = sum(f.stat().st_size for n in model_names(variants) for f in (root / size.name / n).glob("*.safetensors"))
    return max(0, (variants + 1) * size.model_bytes - present)


def ensure_models(root: Path, size: LlamaSize, variants: int, log=print) -> dict[str, Path]:
    """The base and `variants` fine-tunes under root/size.name, generated once (a stamp marks done)."""
    folder = root / size.name
    paths = {name: folder / name for name in model_names(variants)}
    if models_ready(root, size, variants):
        return paths
    for v, (name, path) in enumerate(paths.items()):
        log(f"generating {size.name} {name} ({size.parameters / 1e9:.2f}B parameters, bf16) in {path}")
        write_model(path, size, v)
    (folder / "SPEC.json").write_text(_spec(size, variants))
    return paths

"""What a merge run is told (`MergeOptions`), what it reports as it goes (`Progress`) and at the end (`MergeResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from modelalloy.errors import OutputError


class MergeOptions(BaseModel):
    """How to run a merge; the CLI's flags are made from these fields (help text lives here)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_shard_size: str = Field("5GB", description="largest output shard, e.g. 5GB, 500MB, 2GiB")
    device: str = Field("cpu", description="where the arithmetic runs: cpu, cuda or auto")
    threads: int = Field(2, ge=1, description="recipes merged at once (each overlaps reading with compute)")
    force: bool = Field(False, description="replace an existing output directory")
    allow_pickle: bool = Field(False, description="load pickle .bin checkpoints (pickle can run code: only for files you trust)")
    allow_crimes: bool = Field(False, description="merge models of different architectures")
    strict: bool = Field(False, description="a parameter the method does not use is an error, even one other methods take (default: a warning, as mergekit ignores it)")
    write_model_card: bool = Field(True, description="write README.md with the config, method and input hashes")
    copy_tokenizer: bool = Field(True, description="copy tokenizer and generation files from the donor model")
    hash_inputs: bool = Field(True, description="BLAKE3 digest of every input tensor read, recorded in the model card")
    out_format: Literal["safetensors", "gguf"] = Field("safetensors", description="output weights: safetensors shards, or one GGUF file (llama.cpp)")
    out_type: Literal["f32", "f16", "bf16", "q8_0"] = Field("f16", description="tensor type inside a GGUF output (norms stay f32)")
    resume: bool = Field(True, description="reuse the finished shards an interrupted run of the same merge left in OUT.partial")
    # Checked against the registry (`engine/backends`) when the merge starts, so a new backend touches nothing here.
    backend: str = Field("local", description="local: a thread pool in this process; ray: one Ray task per output shard (inputs and output on storage every worker sees)")
    ray_address: str | None = Field(None, description="with --backend ray: the Ray cluster to join (e.g. auto, ray://host:10001); without it a local Ray instance is started")



@dataclass
class Progress:
    """What the progress callback sees after each tensor."""

    done: int
    total: int
    bytes_written: int
    total_bytes: int
    tensor: str
    elapsed: float


@dataclass
class MergeResult:
    out_dir: Path
    tensors: int
    bytes_written: int
    files: list[str]
    seconds: float
    input_hashes: dict[str, str] = field(default_factory=dict)
    shards_reused: int = 0  # finished shards taken over from an interrupted run

    def summary(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "tensors": self.tensors,
            "bytes_written": self.bytes_written,
            "files": self.files,
            "seconds": round(self.seconds, 3),
            "input_hashes": self.input_hashes,
            "shards_reused": self.shards_reused,
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OutputError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise OutputError(f"--device {name!r}: use cpu, cuda or auto")
    return torch.device(name)

"""`open_checkpoint`: a model reference opened by the first input format that claims it.

Each format is a function `(ref, *, allow_pickle, open_any) -> Checkpoint | None` (None: not
mine; `open_any` opens a reference it builds on, such as an adapter's base, in any format), listed
here in the order they are tried; the formats build on `checkpoint.Checkpoint` and never import
this module back. A Hugging Face directory (safetensors, sharded index, or pickle `.bin` with
opt-in) is the last resort, and says what is wrong with a reference nothing else claimed.
"""

from __future__ import annotations

from collections.abc import Callable

from modelalloy.io.adapter import open_base_plus_adapter
from modelalloy.io.checkpoint import Checkpoint, open_hf_directory
from modelalloy.io.gguf import open_gguf_reference

Format = Callable[..., "Checkpoint | None"]

FORMATS: list[Format] = [
    open_base_plus_adapter,  # mergekit's ``base+adapter``: a PEFT LoRA folded in on read
    open_gguf_reference,  # a .gguf file, or a directory whose only weights are one
]


def register_format(opener: Format) -> None:
    """Try `opener` before the Hugging Face directory (and after the formats already listed)."""
    if opener in FORMATS:
        raise ValueError(f"input format {getattr(opener, '__name__', opener)!r} is already registered")
    FORMATS.append(opener)


def open_checkpoint(ref: str, *, allow_pickle: bool = False) -> Checkpoint:
    """Open `ref` lazily: config and every tensor header are read and validated; no tensor data.

    ``base+adapter`` (mergekit's syntax) opens the base with a PEFT LoRA adapter folded in on read.
    A `.gguf` file, or a directory whose only weights are one, opens as a `GGUFCheckpoint`.
    """
    for opener in FORMATS:
        ckpt = opener(ref, allow_pickle=allow_pickle, open_any=open_checkpoint)
        if ckpt is not None:
            return ckpt
    return open_hf_directory(ref, allow_pickle=allow_pickle)

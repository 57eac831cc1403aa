"""Scoring models that share their bottom layers: the shared layers run once per eval set.

Fine-tunes that trained only their top layers, and most merges of them, keep the base's embeddings
and lower decoder layers bit for bit: a task vector that is zero there merges back to the base
(TIES, DARE, task arithmetic...). On the same tokens, such models compute the same hidden states
up to their first differing layer, so those are computed once per set and batch, kept, and each
further model runs only its own top layers and the head: for the demo's 135M model with 26 of 30
layers shared, a third of the work per model.

Which layers are shared is decided from the weights, never assumed: each model's embedding and
decoder layers are hashed (BLAKE3 of their tensors' bytes), and a model reuses kept states only
when its bottom hashes equal theirs and the batch's token ids are the same. The shortcut needs a
decoder stack at ``model.model.layers`` taking ``inputs_embeds``; the first reuse in a run is
checked against the model's own full forward on that batch, and a model whose forward does
something else between the embedding and the first layer (a scaled embedding, say) fails that
check, which turns sharing off for the run.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

EMBED = "embed"
MAX_KEPT_BYTES = 2 * 1024**3  # hidden states kept over a whole run, at most


def _decoder(model):
    """(inner model, its decoder layers) when the model has the usual layout, else None."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or getattr(inner, "embed_tokens", None) is None:
        return None
    return inner, layers


def _block_of(name: str) -> str | None:
    """'embed' for the embedding, the layer index (as text) for a decoder layer's tensors."""
    if name.startswith("model.embed_tokens."):
        return EMBED
    if name.startswith("model.layers."):
        return name.split(".")[2]
    return None


def _hash_blocks(tensors: Iterator[tuple[str, torch.Tensor]]) -> dict[str, str]:
    import blake3

    hashers: dict[str, blake3.blake3] = {}
    for name, tensor in sorted(tensors, key=lambda x: x[0]):
        block = _block_of(name)
        if block is None:
            continue
        # Every core, and the tensor's own memory (no copy): 0.05 s for a 135M model, 0.47 s before.
        h = hashers.setdefault(block, blake3.blake3(max_threads=blake3.blake3.AUTO))
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return {block: h.hexdigest() for block, h in hashers.items()}


def model_hashes(model) -> dict[str, str] | None:
    """Hashes of a loaded model's embedding and of each decoder layer; None for other layouts."""
    if _decoder(model) is None:
        return None
    return _hash_blocks(model.state_dict().items())


def directory_hashes(path: str | Path) -> dict[str, str] | None:
    """The same hashes read from a model directory's safetensors files, without building the model."""
    from safetensors import safe_open

    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return None
    if not any(a.endswith("ForCausalLM") for a in architectures):
        return None

    def tensors():
        for f in files:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():
                    if _block_of(name) is not None:
                        yield name, st.get_tensor(name)

    return _hash_blocks(tensors())


def shared_depth(a: Mapping[str, str], b: Mapping[str, str]) -> int:
    """How many decoder layers, from the bottom, two models share (0 unless the embedding is shared too)."""
    if a.get(EMBED) is None or a.get(EMBED) != b.get(EMBED):
        return 0
    depth = 0
    while str(depth) in a and a.get(str(depth)) == b.get(str(depth)):
        depth += 1
    return depth


def bottom_key(hashes: Mapping[str, str], depth: int) -> str:
    import blake3

    return blake3.blake3("\0".join([hashes[EMBED]] + [hashes[str(i)] for i in range(depth)]).encode()).hexdigest()


@dataclass
class SharedBottom:
    """The hidden states after the first `depth` layers, per batch of one set, for models of one bottom."""

    depth: int
    states: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # batch -> (input ids, states)
    run: BottomRun | None = None

    def get(self, batch: int, input_ids: torch.Tensor) -> torch.Tensor | None:
        kept = self.states.get(batch)
        if kept is None or kept[0].shape != input_ids.shape or not torch.equal(kept[0], input_ids):
            return None
        return kept[1]

    def put(self, batch: int, input_ids: torch.Tensor, states: torch.Tensor) -> None:
        size = states.numel() * states.element_size()
        if self.run is not None and not self.run.reserve(size):
            return
        self.states[batch] = (input_ids.clone(), states)


@dataclass
class BottomRun:
    """What the shared bottoms of one `evaluate` run hold: memory, and whether sharing checked out."""

    limit: int = MAX_KEPT_BYTES
    used: int = 0
    checked: bool = False
    enabled: bool = True
    notes: list[str] = field(default_factory=list)

    def reserve(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True


def forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch: int, bottom: SharedBottom | None) -> torch.Tensor:
    """The model's logits on one batch, reusing or keeping the states of a shared bottom."""
    if bottom is None or (bottom.run is not None and not bottom.run.enabled):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    inner, layers = _decoder(model)
    states = bottom.get(batch, input_ids)
    if states is None:
        kept = {}
        hook = layers[bottom.depth - 1].register_forward_hook(lambda _m, _i, out: kept.__setitem__("h", out[0] if isinstance(out, tuple) else out))
        try:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            hook.remove()
        bottom.put(batch, input_ids, kept["h"].detach())
        return logits
    with _top_only(inner, layers, bottom.depth):
        logits = model(inputs_embeds=states, attention_mask=attention_mask).logits
    run = bottom.run
    if run is not None and not run.checked:
        # Once per run: the shortcut must give what the model's own forward gives.
        run.checked = True
        full = model(input_ids=input_ids, attention_mask=attention_mask).logits
        if not torch.allclose(full, logits, rtol=1e-4, atol=1e-4):
            run.enabled = False
            run.notes.append(f"{type(model).__name__}: its forward from kept hidden states differs from its full forward; "
                             "shared layers are recomputed for every model")
            return full
    return logits


@contextlib.contextmanager
def _top_only(inner, layers: torch.nn.ModuleList, depth: int):
    """The decoder with only layers depth.. : fed the states after layer depth - 1 as `inputs_embeds`."""
    inner.layers = torch.nn.ModuleList(list(layers)[depth:])
    try:
        yield
    finally:
        inner.layers = layers


def states_after(model, depth: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The hidden states after the first `depth` decoder layers, running only those layers."""
    inner, layers = _decoder(model)
    kept = {}
    hook = layers[depth - 1].register_forward_hook(lambda _m, _i, out: kept.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    inner.layers = torch.nn.ModuleList(list(layers)[:depth])
    try:
        inner(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        inner.layers = layers
        hook.remove()
    return kept["h"]


@contextlib.contextmanager
def top_only(model, depth: int):
    """Within: `model(inputs_embeds=states_after(model, depth, ids), ...)` runs layers depth.. and the head."""
    decoder = _decoder(model)
    if decoder is None:
        raise ValueError(f"{type(model).__name__} has no decoder stack at model.layers")
    with _top_only(*decoder, depth):
        yield


class BottomSharing:
    """Which models of one `evaluate` run share bottom layers, and the states kept for them."""

    def __init__(self, directories: Mapping[str, str | Path]) -> None:
        self.run = BottomRun()
        # Model directories are hashed up front, so the first model scored already knows how
        # deep its bottom is shared with those after it.
        self.known: dict[str, dict[str, str]] = {}
        for label, ref in directories.items():
            hashes = directory_hashes(ref)
            if hashes:
                self.known[label] = hashes
        self.kept: dict[tuple[str, str], SharedBottom] = {}

    def enter(self, label: str, model) -> tuple[int, str] | None:
        hashes = model_hashes(model)
        if hashes is None:
            return None
        self.known[label] = hashes
        depth = max((shared_depth(hashes, other) for name, other in self.known.items() if name != label), default=0)
        n_layers = sum(1 for k in hashes if k != EMBED)
        depth = min(depth, n_layers - 1)  # the top layer is always the model's own (the head reads it)
        return (depth, bottom_key(hashes, depth)) if depth >= 1 else None

    def bottom(self, eval_set, depth_key, tokenizer) -> SharedBottom | None:
        if depth_key is None:
            return None
        depth, key = depth_key
        where = (eval_set.name, key)
        if where not in self.kept:
            self.kept[where] = SharedBottom(depth, run=self.run)
        return self.kept[where]

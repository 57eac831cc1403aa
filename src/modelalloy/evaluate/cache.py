"""The score cache: a JSON file of scores keyed by what the model and the set are made of."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from modelalloy.config import MergeConfig, load_config
from modelalloy.evaluate.sets import EvalSet, read_texts


def is_config(ref: str | Path | MergeConfig) -> bool:
    return isinstance(ref, MergeConfig) or str(ref).endswith((".yaml", ".yml"))


def _dir_fingerprint(path: Path) -> str:
    """What a model directory is made of, cheaply: weight/config/tokenizer files, sizes and mtimes."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".json", ".model", ".bin") or f.name.startswith("tokenizer")):
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def model_fingerprint(ref: str | Path | MergeConfig) -> str:
    if is_config(ref):
        cfg = ref if isinstance(ref, MergeConfig) else load_config(ref)
        parts = [cfg.model_dump_json()] + [_dir_fingerprint(Path(r)) if Path(r).is_dir() else r for r in cfg.all_model_refs()]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return _dir_fingerprint(Path(ref))


def set_fingerprint(eval_set: EvalSet) -> str:
    h = hashlib.sha256(eval_set.model_dump_json(exclude={"name", "expert"}).encode())
    if eval_set.kind == "perplexity":
        for t in read_texts(eval_set):
            h.update(hashlib.sha256(t.encode()).digest())
    elif eval_set.kind == "lm_eval":
        # A task's YAML and its local data files: whatever the folder holds.
        folder = Path(eval_set.task_dir) if eval_set.task_dir else None
        for f in sorted(folder.rglob("*")) if folder and folder.is_dir() else ():
            if f.is_file():
                h.update(f"{f.relative_to(folder)}\0".encode() + hashlib.sha256(f.read_bytes()).digest())
    else:
        h.update(Path(eval_set.path).read_bytes())
    return h.hexdigest()


class ScoreCache:
    """A JSON file of scores keyed by (model fingerprint, set fingerprint); written atomically."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.data: dict[str, dict] = {}
        if self.path and self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.data = {}  # a damaged cache only costs a rescore

    def get(self, key: str) -> dict | None:
        return self.data.get(key)

    def put(self, key: str, value: dict) -> None:
        self.data[key] = value
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)



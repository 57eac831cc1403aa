"""Evaluation sets: what to score a model on, read from a small YAML file or built in code.

An evals file (``evals.yaml``) lists sets; each is a perplexity set (text) or a multiple-choice
set (JSONL with ``context``, ``choices``, ``answer``):

    sets:
      - name: shakespeare
        kind: perplexity            # default
        path: data/shakespeare/     # a text file, a directory of .txt/.md files, or JSONL with "text"
        max_tokens: 4096            # token budget (the first tokens of the concatenated documents)
        window: 512                 # tokens the model sees at once
        stride: 511                 # new tokens scored per window, at most window - 1 (default);
                                    # smaller strides give each scored token more context
        unit: auto                  # what the bootstrap resamples: document, window (the tokens one
                                    # window scores), or auto (whichever makes more units)
        expert: ./ft-shakespeare    # the parent fine-tuned for it (for `alloy rate`); omit = control
      - name: trivia
        kind: choice
        path: trivia.jsonl
      - name: sentiment             # an encoder with a classification head (*ForSequenceClassification)
        kind: classification
        path: reviews.jsonl         # JSONL with "text" and "label" (an index, or a name in config.id2label)
      - name: my-task               # an lm-evaluation-harness task (extra `lmeval`); nothing is downloaded
        kind: lm_eval
        task: my_task
        task_dir: tasks/            # YAML task definitions over local data files

Relative paths are taken from the evals file's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from modelalloy.config import read_yaml_file
from modelalloy.errors import ModelAlloyError, did_you_mean


class EvalError(ModelAlloyError):
    """An evaluation input: evals file, data set, tokenizer, or a score table that doesn't fit."""


class EvalSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: Literal["perplexity", "choice", "classification", "lm_eval"] = "perplexity"
    path: str | None = None
    texts: tuple[str, ...] | None = Field(None, description="the documents themselves (instead of path)")
    max_tokens: int = Field(4096, ge=2)
    window: int = Field(512, ge=2)
    stride: int | None = Field(None, ge=1, description="new tokens scored per window; default and maximum window - 1")
    batch_size: int = Field(4, ge=1)
    unit: Literal["auto", "document", "window"] = Field("auto", description="perplexity: the units a bootstrap resamples (documents, or the tokens each window scores)")
    max_items: int | None = Field(None, ge=1, description="multiple choice, classification, lm_eval: score only the first N items")
    task: str | None = Field(None, description="lm_eval: the task name")
    task_dir: str | None = Field(None, description="lm_eval: a folder of YAML task definitions over local data")
    expert: str | None = None

    @model_validator(mode="after")
    def _check(self) -> EvalSet:
        if self.kind == "lm_eval":
            if not self.task:
                raise ValueError(f"eval set {self.name!r}: an lm_eval set needs task: (an lm-evaluation-harness task name)")
            if self.path is not None or self.texts is not None:
                raise ValueError(f"eval set {self.name!r}: an lm_eval set takes task: and task_dir:, not path: or texts:")
        elif self.task is not None or self.task_dir is not None:
            raise ValueError(f"eval set {self.name!r}: task: and task_dir: belong to kind lm_eval only")
        elif (self.path is None) == (self.texts is None):
            raise ValueError(f"eval set {self.name!r}: give exactly one of path or texts")
        if self.stride is not None and self.stride >= self.window:
            # A window of W tokens predicts W - 1 of them: its first token is only context.
            raise ValueError(f"eval set {self.name!r}: stride {self.stride} must be below window {self.window} (at most {self.window - 1}), or tokens go unscored")
        return self

    @property
    def higher_is_better(self) -> bool:
        return self.kind != "perplexity"  # accuracies; perplexity is lower-is-better

    @property
    def metric(self) -> str:
        return {"perplexity": "perplexity", "lm_eval": f"lm_eval:{self.task}"}.get(self.kind, "accuracy")


class EvalsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sets: list[EvalSet]


def load_evals(path: str | Path) -> list[EvalSet]:
    """Read an evals YAML file; relative data paths are resolved against its folder."""
    path = Path(path)
    data = read_yaml_file(path, "evals file", EvalError)
    if not isinstance(data, dict):
        raise EvalError(f"{path}: an evals file is a mapping with a 'sets' list")
    try:
        parsed = EvalsFile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            key = str(first["loc"][-1])
            msg = f"unknown key {key!r}{did_you_mean(key, EvalSet.model_fields)}"
        raise EvalError(f"{path}: {where}: {msg}") from None
    names = [s.name for s in parsed.sets]
    if len(set(names)) != len(names):
        raise EvalError(f"{path}: two eval sets share a name; names must be unique")
    out = []
    for s in parsed.sets:
        if s.path is not None and not Path(s.path).is_absolute():
            s = s.model_copy(update={"path": str(path.parent / s.path)})
        if s.task_dir is not None and not Path(s.task_dir).is_absolute():
            s = s.model_copy(update={"task_dir": str(path.parent / s.task_dir)})
        out.append(s)
    return out


def read_texts(eval_set: EvalSet) -> list[str]:
    """The documents of a perplexity set, in a stable order."""
    if eval_set.texts is not None:
        return list(eval_set.texts)
    path = Path(eval_set.path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md", ".py", ".jsonl", ""))
        if not files:
            raise EvalError(f"eval set {eval_set.name!r}: {path} holds no .txt, .md, .py or .jsonl files")
        return [t for f in files for t in _read_file(f, eval_set.name)]
    if not path.exists():
        raise EvalError(f"eval set {eval_set.name!r}: {path} not found")
    return _read_file(path, eval_set.name)


def _read_file(path: Path, name: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"eval set {name!r}: cannot read {path} ({e})") from None
    if path.suffix != ".jsonl":
        return [text]
    docs = []
    for i, row in enumerate(_jsonl(text, path, name)):
        if not isinstance(row.get("text"), str):
            raise EvalError(f"eval set {name!r}: {path} line {i + 1} has no string field 'text'")
        docs.append(row["text"])
    return docs


def _jsonl(text: str, path: Path, name: str) -> list[dict]:
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"eval set {name!r}: {path} line {i + 1} is not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise EvalError(f"eval set {name!r}: {path} line {i + 1} is not a JSON object")
        rows.append(row)
    return rows


def read_choices(eval_set: EvalSet) -> list[tuple[str, list[str], int]]:
    """The items of a multiple-choice set: (context, choices, index of the right answer)."""
    path = Path(eval_set.path or "")
    if eval_set.path is None or not path.is_file():
        raise EvalError(f"eval set {eval_set.name!r}: a choice set needs path: a JSONL file with context, choices, answer")
    items = []
    for i, row in enumerate(_jsonl(path.read_text(encoding="utf-8"), path, eval_set.name)):
        context, choices, answer = row.get("context"), row.get("choices"), row.get("answer")
        if not isinstance(context, str) or not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise EvalError(f"eval set {eval_set.name!r}: {path} item {i + 1} needs 'context' (text) and 'choices' (two or more texts)")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise EvalError(f"eval set {eval_set.name!r}: {path} item {i + 1}: 'answer' must be a choice index (0 to {len(choices) - 1}) or one of the choices")
        items.append((context, choices, answer))
    if not items:
        raise EvalError(f"eval set {eval_set.name!r}: {path} holds no items")
    return items[: eval_set.max_items] if eval_set.max_items else items


def read_labeled(eval_set: EvalSet, id2label: dict[int, str] | None) -> list[tuple[str, int]]:
    """The items of a classification set: (text, label index); names are mapped with `id2label`."""
    path = Path(eval_set.path or "")
    if eval_set.path is None or not path.is_file():
        raise EvalError(f"eval set {eval_set.name!r}: a classification set needs path: a JSONL file with text and label")
    index = {name: i for i, name in (id2label or {}).items()}
    n_labels = len(id2label or {})
    items = []
    for i, row in enumerate(_jsonl(path.read_text(encoding="utf-8"), path, eval_set.name)):
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str):
            raise EvalError(f"eval set {eval_set.name!r}: {path} item {i + 1} has no string field 'text'")
        if isinstance(label, str) and label in index:
            label = index[label]
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < n_labels:
            names = ", ".join(str(v) for v in (id2label or {}).values())
            raise EvalError(f"eval set {eval_set.name!r}: {path} item {i + 1}: 'label' {label!r} must be a class index (0 to {n_labels - 1}) or one of the model's labels ({names})")
        items.append((text, label))
    if not items:
        raise EvalError(f"eval set {eval_set.name!r}: {path} holds no items")
    return items[: eval_set.max_items] if eval_set.max_items else items

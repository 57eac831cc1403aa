"""What a study sweeps, read from `STUDY.yaml`:

    base: ./base
    specialists:                      # N ≥ 2
      - name: shakespeare
        checkpoints: [./ft-shk-half, ./ft-shk]   # one per strength, in order (or model: DIR)
        prompts: ["To be, or not"]    # optional: the MoE router's prompts (default: its set's text)
    strengths: [half, full]           # labels of the checkpoints (default s1, s2, ...)
    sets:                             # eval sets as in evals.yaml; expert: a specialist's name
      - {name: shakespeare, path: held/shk.txt, expert: shakespeare, max_tokens: 4096}
      - {name: news, path: held/news/}            # no expert: a control
    methods: [linear, {method: ties, parameters: {density: 0.5}}]   # default: the demo's six
    experts: {k: [2, 3], sample_per_k: 2, seed: 0}   # default: every subset of every size 2..N
    fusion: [moe, ensemble, oracle_routing]
    coherence: {prompts: 32, prompt_tokens: 16, new_tokens: 64}
    divergence: {tokens: 512}
    bootstrap: {resamples: 1000, seed: 0}

Relative paths are taken from the file's folder. `quick()` shrinks a study for CI.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modelalloy.config import read_yaml_file
from modelalloy.errors import ModelAlloyError, did_you_mean
from modelalloy.evaluate import EvalSet
from modelalloy.methods import get_method

DEFAULT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "della")
FUSION_KINDS = ("moe", "ensemble", "oracle_routing")


class StudyError(ModelAlloyError):
    """A study file, or what it names, that cannot be studied; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Specialist(_Strict):
    name: str
    model: str | None = None
    checkpoints: tuple[str, ...] | None = None
    prompts: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _one(self) -> Specialist:
        if (self.model is None) == (self.checkpoints is None):
            raise ValueError(f"specialist {self.name!r}: give exactly one of model: (one strength) or checkpoints: (a list, one per strength)")
        return self

    @property
    def paths(self) -> tuple[str, ...]:
        return self.checkpoints if self.checkpoints is not None else (self.model,)


class MethodSpec(_Strict):
    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    name: str | None = None  # a label, when one method is studied with two settings

    @property
    def label(self) -> str:
        return self.name or self.method


class ExpertAxis(_Strict):
    k: tuple[int, ...] | None = None  # default 2..N
    sample_per_k: int | None = Field(None, ge=1)  # None: every subset
    seed: int = 0


class Coherence(_Strict):
    prompts: int = Field(32, ge=1)
    prompt_tokens: int = Field(16, ge=1)
    new_tokens: int = Field(64, ge=4)


class Divergence(_Strict):
    tokens: int = Field(512, ge=8)


class BootstrapSpec(_Strict):
    resamples: int = Field(1000, ge=10)
    seed: int = 0


class StudySpec(_Strict):
    base: str
    specialists: tuple[Specialist, ...]
    strengths: tuple[str, ...] | None = None
    sets: tuple[EvalSet, ...]
    methods: tuple[MethodSpec, ...] = tuple(MethodSpec(method=m) for m in DEFAULT_METHODS)
    experts: ExpertAxis = ExpertAxis()
    fusion: tuple[Literal["moe", "ensemble", "oracle_routing"], ...] = FUSION_KINDS
    coherence: Coherence = Coherence()
    divergence: Divergence = Divergence()
    bootstrap: BootstrapSpec = BootstrapSpec()

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, v):
        return [{"method": m} if isinstance(m, str) else m for m in v]

    @model_validator(mode="after")
    def _check(self) -> StudySpec:
        names = [s.name for s in self.specialists]
        if len(names) < 2:
            raise ValueError("a study needs at least two specialists (it merges subsets of 2 or more)")
        if len(set(names)) != len(names):
            raise ValueError("two specialists share a name; names must be unique")
        counts = {len(s.paths) for s in self.specialists}
        if len(counts) != 1:
            raise ValueError("every specialist needs the same number of checkpoints (one per strength)")
        if self.strengths is not None and len(self.strengths) != counts.pop():
            raise ValueError(f"strengths: {len(self.strengths)} labels, but each specialist has {len(self.specialists[0].paths)} checkpoints")
        for s in self.sets:
            if s.expert is not None and s.expert not in names:
                raise ValueError(f"set {s.name!r}: expert {s.expert!r} is not a specialist{did_you_mean(s.expert, names)}")
        if not any(s.expert for s in self.sets):
            raise ValueError("no set names an expert: the merge rate (NAI) is measured on each specialist's own set")
        labels = [m.label for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ValueError("two methods share a label; give one of them name:")
        for k in self.experts.k or ():
            if not 2 <= k <= len(names):
                raise ValueError(f"experts.k: {k} is not between 2 and the {len(names)} specialists")
        return self

    @property
    def strength_labels(self) -> tuple[str, ...]:
        return self.strengths or tuple(f"s{i + 1}" for i in range(len(self.specialists[0].paths)))

    def subsets(self) -> list[tuple[str, ...]]:
        """The expert subsets, by k: all of them, or `sample_per_k` drawn per k (seeded)."""
        names = [s.name for s in self.specialists]
        out = []
        for k in self.experts.k or range(2, len(names) + 1):
            every = list(itertools.combinations(names, k))
            if self.experts.sample_per_k is not None and len(every) > self.experts.sample_per_k:
                every = sorted(random.Random(f"{self.experts.seed}/{k}").sample(every, self.experts.sample_per_k), key=every.index)
            out += every
        return out

    def quick(self) -> StudySpec:
        """A CI-sized study: one subset per k, 2 methods, short continuations, 200 resamples.

        The sets keep their size: fewer than 10 units would leave them without intervals.
        """
        return self.model_copy(update={
            "methods": self.methods[:2],
            "experts": self.experts.model_copy(update={"sample_per_k": 1}),
            "coherence": Coherence(prompts=4, prompt_tokens=8, new_tokens=8),
            "divergence": Divergence(tokens=64),
            "bootstrap": self.bootstrap.model_copy(update={"resamples": 200}),
        })


def _resolve(path: str, folder: Path) -> str:
    return path if Path(path).is_absolute() else str(folder / path)


def parse_study(data: Any, *, folder: Path = Path("."), source: str = "<study>") -> StudySpec:
    """A `StudySpec` from parsed YAML; paths relative to `folder`; errors name the field."""
    if not isinstance(data, dict):
        raise StudyError(f"{source}: a study file is a mapping (base, specialists, sets, ...)")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = f"unknown key {str(first['loc'][-1])!r}"
        raise StudyError(f"{source}: {where}: {msg}") from None
    for m in spec.methods:
        try:
            get_method(m.method)
        except ModelAlloyError as e:
            raise StudyError(f"{source}: methods: {e}") from None
    specialists = tuple(
        s.model_copy(update={"model": _resolve(s.model, folder) if s.model else None,
                             "checkpoints": tuple(_resolve(p, folder) for p in s.checkpoints) if s.checkpoints else None})
        for s in spec.specialists
    )
    sets = tuple(s.model_copy(update={"path": _resolve(s.path, folder)}) if s.path else s for s in spec.sets)
    return spec.model_copy(update={"base": _resolve(spec.base, folder), "specialists": specialists, "sets": sets})


def load_study(path: str | Path) -> StudySpec:
    path = Path(path)
    return parse_study(read_yaml_file(path, "study file", StudyError), folder=path.parent, source=str(path))

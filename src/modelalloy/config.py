"""The merge configuration: mergekit's YAML schema, accepted as is, checked strictly.

Parameter values (mergekit's ``ParameterSetting``) are one of:
  - a scalar: ``0.5``, ``true``, ``"l1"``;
  - a gradient: ``[0, 0.5, 1]``, interpolated linearly at t = layer / (layers in slice − 1),
    anchors evenly spaced; a list of non-numbers picks ``list[int(t·(len−1))]``;
  - a conditional list: ``[{filter: self_attn, value: ...}, {value: ...}]``; the first entry whose
    filter is empty/``*`` or a substring of the tensor name wins, and its value may be a gradient.
A conditional list where nothing matches means "not set here": the next scope is asked.
Scopes, highest first: the model's own parameters, the slice's, the top level's (METHODS.md).

Unlike mergekit, an unknown key anywhere is an error with a "did you mean".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modelalloy.errors import ConfigError, ModelAlloyError, did_you_mean

Scalar = Union[bool, int, float, str]


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    filter: str | None = None
    value: Any


ParameterSetting = Any  # validated by `check_setting`; pydantic unions report poorly here


def check_setting(value: Any, where: str) -> Any:
    """Normalise one parameter setting (see module docstring); conditional dicts become `Conditional`."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{where}: an empty list is not a parameter value")
        if all(isinstance(v, (bool, int, float, str)) for v in value):
            return value
        if all(isinstance(v, dict) for v in value):
            out = []
            for i, entry in enumerate(value):
                unknown = set(entry) - {"filter", "value"}
                if unknown:
                    key = sorted(unknown)[0]
                    raise ConfigError(f"{where}[{i}]: unknown key {key!r}{did_you_mean(key, ['filter', 'value'])}; entries are {{filter, value}}")
                if "value" not in entry:
                    raise ConfigError(f"{where}[{i}]: a conditional entry needs a 'value'")
                out.append(Conditional(filter=entry.get("filter"), value=check_setting(entry["value"], f"{where}[{i}].value")))
            return out
        raise ConfigError(f"{where}: a list must be all numbers (a gradient), all strings, or all {{filter, value}} entries")
    if value is None:
        raise ConfigError(f"{where}: empty value")
    raise ConfigError(f"{where}: {type(value).__name__} is not a parameter value (scalar, list or filter list)")


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of a setting for one tensor at depth t ∈ [0, 1]; None when no filter matches."""
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if setting and isinstance(setting[0], Conditional):
            for entry in setting:
                if entry.filter in (None, "*") or entry.filter in tensor_name:
                    return evaluate_setting(entry.value, tensor_name, t)
            return None
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            scaled = t * (len(setting) - 1)
            i0 = min(int(scaled), len(setting) - 1)
            i1 = min(i0 + 1, len(setting) - 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        return setting[int(t * (len(setting) - 1))]
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ModelRef(_Strict):
    """A model as mergekit's dict form writes it; the string form is parsed by `model_ref`."""

    model: str
    lora: str | None = None
    override_architecture: str | None = None


def model_ref(value: Any) -> str:
    """The reference string of a model entry (string, or mergekit's dict form)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        inner = value.get("model")
        if isinstance(inner, dict):  # {model: {path, revision}}
            path, rev = inner.get("path"), inner.get("revision")
            if not isinstance(path, str):
                raise ValueError("model.path must be a string")
            if rev is not None and not isinstance(rev, str):
                raise ValueError("model.revision must be a string")
            return f"{path}@{rev}" if rev else path
        unknown = [k for k in value if k not in ModelRef.model_fields]
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} in a model entry{did_you_mean(str(unknown[0]), ModelRef.model_fields)}")
        try:
            ref = ModelRef.model_validate(value)
        except ValidationError as e:  # one line, not pydantic's multi-line report
            first = e.errors()[0]
            raise ValueError(f"model entry {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        if ref.lora:
            return f"{ref.model}+{ref.lora}"
        return ref.model
    raise ValueError(f"a model is a path or an id, not {type(value).__name__}")


Parameters = dict[str, Any]


class InputModel(_Strict):
    model: str
    parameters: Parameters = Field(default_factory=dict)
    stats: str | None = None  # statistics file from `alloy stats`, for data-aware methods (fisher, regmean)

    @field_validator("model", mode="before")
    @classmethod
    def _ref(cls, v: Any) -> str:
        return model_ref(v)

    @field_validator("parameters", mode="before")
    @classmethod
    def _params(cls, v: Any) -> Any:
        return {} if v is None else v


class InputSlice(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters = Field(default_factory=dict)

    @field_validator("model", mode="before")
    @classmethod
    def _ref(cls, v: Any) -> str:
        return model_ref(v)

    @field_validator("parameters", mode="before")
    @classmethod
    def _params(cls, v: Any) -> Any:
        return {} if v is None else v

    @model_validator(mode="after")
    def _range(self) -> InputSlice:
        start, end = self.layer_range
        if start < 0 or end <= start:
            raise ValueError(f"layer_range {list(self.layer_range)} must be [start, end) with 0 <= start < end")
        return self


class OutputSlice(_Strict):
    sources: list[InputSlice]
    base_model: str | None = None
    residual_weight: float | None = None  # accepted for compatibility; mergekit ignores it too
    parameters: Parameters = Field(default_factory=dict)

    @field_validator("base_model", mode="before")
    @classmethod
    def _ref(cls, v: Any) -> Any:
        return None if v is None else model_ref(v)

    @field_validator("parameters", mode="before")
    @classmethod
    def _params(cls, v: Any) -> Any:
        return {} if v is None else v

    @model_validator(mode="after")
    def _lengths(self) -> OutputSlice:
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(
                "all sources of a slice must cover the same number of layers, got "
                + ", ".join(f"{s.model} {list(s.layer_range)}" for s in self.sources)
            )
        return self


class ModelTokenSource(_Strict):
    """Another token's embedding: ``{kind: model_token, model: M, token: "<s>"}`` (or ``token_id``)."""

    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = None

    @field_validator("model", mode="before")
    @classmethod
    def _ref(cls, v: Any) -> str:
        return model_ref(v)

    @model_validator(mode="after")
    def _one(self) -> ModelTokenSource:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("a model_token source takes exactly one of token or token_id")
        if self.token_id is not None and self.token_id < 0:
            raise ValueError(f"token_id {self.token_id} must be >= 0")
        return self


class ZeroSource(_Strict):
    """An all-zero embedding row: ``{kind: zero}``."""

    kind: Literal["zero"]


class TokenEmbedding(_Strict):
    """Where one token's embedding row comes from (mergekit's ``TokenEmbeddingConfig``).

    `source` is a model (that model's row of the same token), a `ModelTokenSource` or a
    `ZeroSource`; without `force` it only fills the models that lack the token, with `force` it
    replaces the row in every model before merging.
    """

    source: Union[ModelTokenSource, ZeroSource, str, None] = None
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, v: Any) -> Any:
        if isinstance(v, dict) and "kind" not in v:
            return model_ref(v)
        return v


class TokenizerConfig(_Strict):
    """The output vocabulary (mergekit's ``tokenizer:`` section).

    `source`: ``union`` (every model's tokens; the default, as in mergekit), ``base`` or a model.
    `tokens`: per-token embedding sources. `pad_to_multiple_of`: the embedding gets extra rows up
    to a multiple of this (filled with the mean embedding), as GPU kernels prefer.
    """

    source: str = "union"
    tokens: dict[str, TokenEmbedding] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(None, ge=1)

    @field_validator("source", mode="before")
    @classmethod
    def _ref(cls, v: Any) -> str:
        return model_ref(v)

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens(cls, v: Any) -> Any:
        if v is None:
            return {}
        if isinstance(v, dict):  # `"<tok>": MODEL` is short for `{source: MODEL}`
            return {k: ({"source": e} if isinstance(e, str) else {} if e is None else e) for k, e in v.items()}
        return v


# Chat templates shipped with modelalloy (written for it; `auto` picks the inputs' most common one).
BUILTIN_CHAT_TEMPLATES = ("alpaca", "chatml", "llama3", "mistral")


class MergeConfig(_Strict):
    """A mergekit merge configuration (plus `random_seed`, which mergekit takes on its CLI)."""

    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, Any] | None = None
    base_model: str | None = None
    parameters: Parameters = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    random_seed: int = 0
    name: str | None = None  # mergekit-multi documents carry one

    @field_validator("base_model", mode="before")
    @classmethod
    def _ref(cls, v: Any) -> Any:
        return None if v is None else model_ref(v)

    @field_validator("parameters", mode="before")
    @classmethod
    def _params(cls, v: Any) -> Any:
        return {} if v is None else v

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is None:
            return v
        name = v.removeprefix("torch.")
        if name not in DTYPE_NAMES:
            raise ValueError(f"dtype {v!r} is not one of {', '.join(DTYPE_NAMES)}{did_you_mean(name, DTYPE_NAMES)}")
        return name

    @field_validator("tokenizer_source", mode="before")
    @classmethod
    def _tokenizer_ref(cls, v: Any) -> Any:
        return None if v is None else model_ref(v)

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v: str | None) -> str | None:
        if v is None or v == "auto" or v in BUILTIN_CHAT_TEMPLATES:
            return v
        if len(v) < 20 or "{" not in v:  # mergekit's rule for telling a literal template from a name
            raise ValueError(
                f"chat_template {v!r} is neither auto, a builtin ({', '.join(BUILTIN_CHAT_TEMPLATES)})"
                f"{did_you_mean(v, BUILTIN_CHAT_TEMPLATES)} nor a Jinja template"
            )
        return v

    @model_validator(mode="after")
    def _shape(self) -> MergeConfig:
        given = [k for k in ("models", "slices", "modules") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of models, slices or modules" + (f" (found {', '.join(given)})" if given else ""))
        if self.modules is not None:
            raise ValueError("modules (multi-module architectures) are not supported yet; merge each part with models or slices")
        if self.models is not None and not self.models:
            raise ValueError("models is empty")
        if self.slices is not None and not self.slices:
            raise ValueError("slices is empty")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give tokenizer_source or tokenizer, not both")
        return self

    def all_model_refs(self) -> list[str]:
        """Every referenced model, in first-mention order (base first when given)."""
        refs: list[str] = [self.base_model] if self.base_model else []
        for m in self.models or []:
            refs.append(m.model)
        for s in self.slices or []:
            if s.base_model:
                refs.append(s.base_model)
            refs.extend(src.model for src in s.sources)
        return list(dict.fromkeys(refs))


# dtype names mergekit accepts, plus float64 (METHODS.md: compute in float64 when asked).
DTYPE_NAMES = ("bfloat16", "float16", "float32", "float64", "int64")


def _yaml_position(text: str, loc: tuple) -> str:
    """'line L, column C' of the YAML key or item at a pydantic error location, '' if not found."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return ""
    mark = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if k.value == key), None)
            if pair is None:
                break
            mark, node = pair[0].start_mark, pair[1]  # point at the key the user wrote
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            mark = node.start_mark
        else:
            break
    if mark is None:
        return ""
    return f"line {mark.line + 1}, column {mark.column + 1}"


_FIELDS = {
    (): MergeConfig,
    ("models",): InputModel,
    ("slices",): OutputSlice,
    ("slices", "sources"): InputSlice,
    ("tokenizer",): TokenizerConfig,
    ("tokenizer", "tokens"): TokenEmbedding,
    ("tokenizer", "tokens", "source"): ModelTokenSource,
}


def _explain(err: dict, text: str, source: str) -> str:
    loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith(("function-", "tagged-union"))))
    path = ".".join(str(x) for x in loc) or "(top level)"
    pos = _yaml_position(text, loc)
    at = f"{source}: {path}" + (f" ({pos})" if pos else "")
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        owner = _FIELDS.get(tuple(x for x in loc[:-1] if isinstance(x, str)))
        known = list(owner.model_fields) if owner else []
        return f"{at}: unknown key {key!r}{did_you_mean(key, known)}"
    if err["type"] == "missing":
        return f"{at}: required field missing"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{at}: {msg}"


def validation_line(err: ValidationError, source: str, fields_at: Callable[[tuple], Iterable[str]]) -> str:
    """One line for pydantic's first error: 'SOURCE: where: message'; an unknown key gets a
    "did you mean" among `fields_at(location)`."""
    first = err.errors()[0]
    loc = first["loc"]
    where = ".".join(str(x) for x in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        key = str(loc[-1])
        return f"{source}: {where}: unknown key {key!r}{did_you_mean(key, fields_at(loc))}"
    msg = "required field missing" if first["type"] == "missing" else first["msg"].removeprefix("Value error, ")
    return f"{source}: {where}: {msg}"


def read_yaml_file(path: str | Path, what: str, error: type[ModelAlloyError] = ConfigError) -> Any:
    """The YAML document in `path` (a merge, MoE, stack, search or evals file); a missing,
    unreadable or invalid file is one `error` line naming it."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as e:
        raise error(f"{path}: cannot read the {what} ({str(e).splitlines()[0]})") from None


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a merge YAML file; every problem is a one-line `ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config ({e})") from None
    return parse_config(text, source=str(path))


def parse_config(text: str, *, source: str = "<config>") -> MergeConfig:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    except Exception as e:  # noqa: BLE001 PyYAML's constructors raise plain built-in errors on bad scalars (2001-02-30, !!int 0x, !!int)
        raise ConfigError(f"{source}: not valid YAML: a value cannot be read ({type(e).__name__}: {e})") from None
    if len(docs) != 1:
        raise ConfigError(
            f"{source}: expected one YAML document, found {len(docs)}"
            + ("; multi-document (mergekit-multi) files are not supported yet" if len(docs) > 1 else "")
        )
    data = docs[0]
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping with merge_method and models or slices")
    try:
        config = MergeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e.errors()[0], text, source)) from None
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{source}: the config is nested too deeply") from None
    return config

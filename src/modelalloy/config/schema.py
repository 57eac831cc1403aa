"""The merge configuration's pydantic models: mergekit's YAML schema, accepted as is, checked strictly.

`MergeConfig` and its parts (models, slices, the tokenizer section), and `model_ref`, which reads
a model entry in any of mergekit's forms. Parameter values are left as written here; `settings`
checks and evaluates them. Unlike mergekit, an unknown key anywhere is an error.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modelalloy.errors import did_you_mean


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

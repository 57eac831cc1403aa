"""mergekit-moe's YAML schema (`MoEConfig`, plus `random_seed`) and reading it.

Field-level checks happen here (gate modes, architectures, dtypes; an unknown key is an error
with a "did you mean"); the checks that need the models are `build_moe`'s (`compose/moe.py`).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from modelalloy.config import DTYPE_NAMES, read_yaml_file, validation_line
from modelalloy.errors import ConfigError, did_you_mean

GATE_MODES = ("hidden", "hidden_avg", "cheap_embed", "random", "uniform_random")
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Expert(_Strict):
    source_model: str
    positive_prompts: list[str] = Field(default_factory=list)
    negative_prompts: list[str] = Field(default_factory=list)
    residual_scale: float | None = None  # multiplies this expert's down_proj
    noise_scale: float | None = None

    @field_validator("noise_scale")
    @classmethod
    def _no_noise(cls, v):
        if v is not None:
            raise ValueError("noise_scale is not supported; leave it out")
        return v


class MoEConfig(_Strict):
    """mergekit-moe's YAML schema (plus `random_seed`)."""

    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None
    dtype: str | None = None
    random_seed: int = 0

    @field_validator("gate_mode")
    @classmethod
    def _gate(cls, v: str) -> str:
        if v not in GATE_MODES:
            raise ValueError(f"gate_mode {v!r} is not one of {', '.join(GATE_MODES)}{did_you_mean(v, GATE_MODES)}")
        return v

    @field_validator("architecture")
    @classmethod
    def _arch(cls, v: str | None) -> str | None:
        if v is None:
            return v
        name = {"qwen": "qwen2_moe", "qwen2": "qwen2_moe"}.get(v.lower(), v.lower())
        if name not in ARCHITECTURES:
            raise ValueError(f"architecture {v!r} is not one of {', '.join(ARCHITECTURES)}{did_you_mean(v, ARCHITECTURES)}")
        return name

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v.removeprefix("torch.") not in DTYPE_NAMES:
            raise ValueError(f"dtype {v!r} is not one of {', '.join(DTYPE_NAMES)}")
        return None if v is None else v.removeprefix("torch.")


def load_moe_config(path: str | Path) -> MoEConfig:
    path = Path(path)
    data = read_yaml_file(path, "MoE config")
    return parse_moe_config(data, source=str(path))


def parse_moe_config(data, *, source: str = "<moe config>") -> MoEConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: an MoE config is a mapping with base_model and experts")
    try:
        return MoEConfig.model_validate(data)
    except ValidationError as e:
        fields = lambda loc: Expert.model_fields if len(loc) > 1 else MoEConfig.model_fields  # noqa: E731
        raise ConfigError(validation_line(e, source, fields)) from None

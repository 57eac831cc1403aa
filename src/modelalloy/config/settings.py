"""Parameter settings: the values a merge config gives a method's parameters, checked and evaluated.

Parameter values (mergekit's ``ParameterSetting``) are one of:
  - a scalar: ``0.5``, ``true``, ``"l1"``;
  - a gradient: ``[0, 0.5, 1]``, interpolated linearly at t = layer / (layers in slice − 1),
    anchors evenly spaced; a list of non-numbers picks ``list[int(t·(len−1))]``;
  - a conditional list: ``[{filter: self_attn, value: ...}, {value: ...}]``; the first entry whose
    filter is empty/``*`` or a substring of the tensor name wins, and its value may be a gradient.
A conditional list where nothing matches means "not set here": the next scope is asked.
Scopes, highest first: the model's own parameters, the slice's, the top level's (METHODS.md).
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict

from modelalloy.errors import ConfigError, did_you_mean

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

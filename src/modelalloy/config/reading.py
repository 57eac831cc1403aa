"""Reading merge configs from YAML: `load_config` and `parse_config`, every problem one line.

Errors name the file, the key path and, where the YAML has it, its line and column; an unknown
key gets a "did you mean". `read_yaml_file` and `validation_line` do the same for the other YAML
files (MoE, stack, search, evals).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from modelalloy.config.schema import InputModel, InputSlice, MergeConfig, ModelTokenSource, OutputSlice, TokenEmbedding, TokenizerConfig
from modelalloy.errors import ConfigError, ModelAlloyError, did_you_mean


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

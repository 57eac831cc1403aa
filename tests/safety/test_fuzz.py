"""Fuzzing the two parsers of untrusted input: the merge config loader and the safetensors header.

Either may reject an input (a `ModelAlloyError`, one line for the user); neither may crash with
any other exception. The regular suite runs a few hundred inputs per target; the long run is

    FUZZ_EXAMPLES=10000 .venv/bin/python -m pytest -p no:xdist -q tests/safety/test_fuzz.py --hypothesis-show-statistics

(10,000 inputs for each of the six targets; `-k config` or `-k header` for one parser).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from modelalloy.config import check_setting, evaluate_setting, parse_config
from modelalloy.errors import ModelAlloyError
from modelalloy.io.safetensors_format import DTYPES, read_header, read_tensor

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="FUZZ_EXAMPLES" not in os.environ, suppress_health_check=list(HealthCheck), database=None)

# ---------------------------------------------------------------------------------------------
# The config loader

CONFIG_KEYS = [
    "merge_method", "models", "slices", "modules", "base_model", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "random_seed", "name", "model", "sources",
    "layer_range", "filter", "value", "weight", "density", "t", "lora", "override_architecture",
    "residual_weight", "path", "revision", "normalize", "lambda",
]
scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=12) | st.sampled_from(["ties", "linear", "bfloat16", "float64", "torch.float16", "./m", "a/b"])
keys = st.sampled_from(CONFIG_KEYS) | st.text(max_size=8) | st.integers(-3, 3)
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=6), max_leaves=30)

VALID = """merge_method: ties
base_model: org/base
models:
  - model: org/a
    parameters:
      density: 0.5
      weight:
        - filter: mlp
          value: [0.2, 0.8]
        - value: 0.5
  - model: {model: org/b, lora: org/l}
    parameters: {density: 0.4, weight: 0.5}
parameters: {normalize: true, lambda: 1.0}
dtype: bfloat16
"""


def load_config_text(text: str) -> None:
    try:
        config = parse_config(text, source="fuzz.yaml")
    except ModelAlloyError:
        return
    scopes = [config.parameters] + [m.parameters for m in config.models or []]
    for s in config.slices or []:
        scopes += [s.parameters] + [src.parameters for src in s.sources]
    for scope in scopes:
        for name, value in scope.items():
            try:
                setting = check_setting(value, name)
            except ModelAlloyError:
                continue
            for t in (0.0, 0.5, 1.0):
                evaluate_setting(setting, "model.layers.0.mlp.up_proj.weight", t)
    config.all_model_refs()


def mutate(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """Apply (position, delete count, insert) edits: a cheap byte-level mutator for valid inputs."""
    out = bytearray(data)
    for pos, delete, insert in edits:
        pos %= len(out) + 1
        out[pos : pos + delete] = insert
    return bytes(out)


edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 4), st.binary(max_size=4)), min_size=1, max_size=6)


# YAML built from a grammar's worth of tokens: tags, timestamps, anchors, flow and block nesting.
TOKENS = [
    "merge_method: ", "models:", "slices:", "sources:", "parameters:", "base_model: x", "model: ", "layer_range: [0, 2]",
    "filter: mlp", "value: ", "weight: ", "density: ", "t: ", "dtype: ", "random_seed: ", "lora: ", "revision: ",
    "\n", "\n  ", "\n    ", "- ", "{", "}", "[", "]", ", ", ": ", "? ", "'", '"', "|", ">", "---", "...", "#", "\t",
    "!!int ", "!!float ", "!!binary ", "!!timestamp ", "!!str ", "!!set ", "!!omap ", "!!python/name:os.system ",
    "2001-02-30", "2001-12-14t21:59:43.10-05:00", "&a ", "*a", "*b", "0x", "0o7", "1e400", "-.inf", ".nan", "~", "null",
    "ties", "linear", "0.5", "-1", "99999999999999999999999", "yes", "on",
]
yaml_token_text = st.lists(st.sampled_from(TOKENS), max_size=40).map("".join)
deep_nesting = st.tuples(st.sampled_from(["[", "{a: ", "- ", "[{b: "]), st.integers(1, 3000)).map(lambda p: p[0] * p[1])


@FUZZ
@given(st.text(max_size=300) | yaml_token_text | deep_nesting)
def test_fuzz_config_text(text):
    load_config_text(text)


@FUZZ
@given(documents)
def test_fuzz_config_structure(document):
    load_config_text(yaml.safe_dump(document, allow_unicode=True))
    if isinstance(document, dict):  # grafted onto a valid config, to reach the deeper validators
        base = yaml.safe_load(VALID)
        base.update(document)
        load_config_text(yaml.safe_dump(base, allow_unicode=True))


@FUZZ
@given(edits)
def test_fuzz_config_mutations(changes):
    load_config_text(mutate(VALID.encode(), changes).decode("utf-8", errors="replace"))


# ---------------------------------------------------------------------------------------------
# The safetensors header reader

_SCRATCH = tempfile.TemporaryDirectory(prefix="alloy-fuzz-")
_FILE = Path(_SCRATCH.name) / "fuzz.safetensors"


def read_safetensors_bytes(data: bytes) -> None:
    _FILE.write_bytes(data)
    try:
        tensors, _ = read_header(str(_FILE))
    except ModelAlloyError:
        return
    fd = os.open(_FILE, os.O_RDONLY)
    try:
        for loc in tensors.values():  # an accepted header must describe readable tensors exactly
            t = read_tensor(fd, loc)
            assert t.dtype == loc.dtype and tuple(t.shape) == loc.shape
    finally:
        os.close(fd)


dtype_names = st.sampled_from(sorted(DTYPES)) | st.text(max_size=5) | st.integers()
dims = st.lists(st.integers(-2, 6) | st.sampled_from([2**40, True]), max_size=3)
offsets = st.lists(st.integers(-4, 200) | st.sampled_from([2**64, 1.5]), min_size=0, max_size=3)
entries = st.fixed_dictionaries({"dtype": dtype_names, "shape": dims, "data_offsets": offsets}) | scalars
headers = st.dictionaries(st.text(max_size=6) | st.just("__metadata__"), entries | st.dictionaries(st.text(max_size=4), scalars, max_size=3), max_size=5)


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_header_raw_bytes(data):
    read_safetensors_bytes(data)


@FUZZ
@given(headers, st.binary(max_size=256), st.integers(-2, 2), st.booleans())
def test_fuzz_header_structure(header, data, length_error, raw_length):
    raw = json.dumps(header).encode()
    n = len(raw) + (length_error if raw_length else 0)
    read_safetensors_bytes(struct.pack("<Q", max(n, 0)) + raw + data)


_VALID_FILE = save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16), "c": torch.zeros(0, 2, dtype=torch.int64)})


@FUZZ
@given(edits)
def test_fuzz_header_mutations(changes):
    read_safetensors_bytes(mutate(_VALID_FILE, changes))


def test_the_mutation_base_files_are_valid():
    # The mutators start from inputs that are accepted, so that mutations reach the deep checks.
    assert parse_config(VALID).merge_method == "ties"
    _FILE.write_bytes(_VALID_FILE)
    tensors, _ = read_header(str(_FILE))
    assert sorted(tensors) == ["a", "b", "c"] and tensors["a"].shape == (2, 3)

"""From a config and the input headers to a list of tensor recipes, checking everything first.

A `Plan` is plain data: one `TensorRecipe` per output tensor (its method, where each input comes
from, the resolved parameters, shape, output dtype and random seed), the config.json to write,
and the donor of the tokenizer. Any problem the config and headers can reveal (unknown method or
parameter, missing tensor, shape mismatch, wrong number of models, layer ranges out of bounds)
is raised here, before a single tensor is read.
"""

from __future__ import annotations

import copy
import hashlib
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from modelalloy import arch
from modelalloy.config import MergeConfig, check_setting, evaluate_setting
from modelalloy.errors import ConfigError, PlanError, did_you_mean
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.safetensors_format import TensorLocation, itemsize
from modelalloy.io.spans import BUFFER_BUDGET
from modelalloy.io.stats_file import stat_key
from modelalloy.methods import MergeMethod, Param, get_method
from modelalloy.methods.blockwise import BLOCK_ENTRIES
from modelalloy.tokenizer import load_tokenizer, resolve_chat_template
from modelalloy.vocab import VocabPlan, build_vocab, tokenizer_config

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64, "int64": torch.int64}


@dataclass(frozen=True)
class TensorSource:
    model: str  # model reference as written in the config
    tensor: str  # tensor name inside that model


@dataclass(frozen=True, eq=False)
class TensorRecipe:
    """How to make one output tensor. Per-model parameters are tuples aligned with `inputs`.

    `stats` carries a data-aware method's extra per-model tensors (a Fisher diagonal, a Gram
    matrix), aligned with `inputs` and read like them: each is a `TensorSource` whose `model`
    is the statistics file (opened as a checkpoint under its path) and whose `tensor` is the key
    (`stat_key`). Empty when the method reads none for this tensor.
    """

    name: str
    method: str
    inputs: tuple[TensorSource, ...]
    base: TensorSource | None
    params: dict[str, Any]
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    seed: int
    stats: tuple[TensorSource, ...] = ()
    aligned: bool = False  # vocabulary rows are put in output order first (Plan.vocab)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_nbytes(self) -> int:
        return self.numel * itemsize(self.out_dtype)

    def sources(self) -> tuple[TensorSource, ...]:
        return ((self.base,) if self.base else ()) + self.inputs + self.stats


@dataclass
class Plan:
    config: MergeConfig
    method: MergeMethod
    recipes: list[TensorRecipe]
    output_config: dict
    donor: str  # the model whose config, tokenizer and generation files are copied
    input_dtype: torch.dtype | None  # config `dtype`: inputs are cast to it before merging
    compute_dtype: torch.dtype
    notes: list[str] = field(default_factory=list)  # warnings found while planning
    vocab: VocabPlan | None = None  # output tokenizer and row alignment, with a tokenizer section
    chat_template: str | None = None  # resolved `chat_template`, written with the tokenizer

    @property
    def output_bytes(self) -> int:
        return sum(r.out_nbytes for r in self.recipes)

    def input_bytes(self, checkpoints: Mapping[str, Checkpoint]) -> int:
        return sum(checkpoints[s.model].tensors[s.tensor].nbytes for r in self.recipes for s in r.sources())

    def peak_memory_estimate(self, concurrency: int, *, streaming: bool = True) -> int:
        """Bytes: the largest recipes' working sets in flight at once, plus the interpreter.

        With `streaming` (what `alloy merge` does on the CPU), a blockwise method's working set is
        a block's, whatever the tensor's size, and inputs not in the page cache are read ahead
        into the span reader's buffers (`io/spans.py`)."""
        compute = itemsize(self.compute_dtype)
        block = BLOCK_ENTRIES if streaming and self.method.blockwise else None
        consensus = self.method.name in ("ties", "dare_ties") or "consensus_method" in self.method.param_names

        def working_set(r: TensorRecipe) -> int:
            n = len(r.sources())
            live = 2 * n + 3 if consensus else n + 3  # inputs, deltas (kept for consensus), sum, masks
            if r.aligned:
                live += n  # the raw, unaligned rows of every model are held while the aligned ones are built
            entries = min(r.numel, block) if block and not (r.aligned or r.stats) else r.numel
            return entries * compute * live + _matrix_extra(r, compute)

        largest = sorted((working_set(r) for r in self.recipes), reverse=True)[:concurrency]
        return sum(largest) + (BUFFER_BUDGET if block else 0) + 400 * 2**20


def _matrix_extra(r: TensorRecipe, compute: int) -> int:
    """Bytes beyond the inputs for per-matrix methods: each task's SVD factors (tsv, iso_*), or
    the [in, in] Gram matrices and the float64 square solve (regmean, wudi)."""
    layout = r.params.get("layout")
    if layout not in ("out_in", "in_out") or len(r.shape) != 2:
        return 0
    n_in = r.shape[1] if layout == "out_in" else r.shape[0]
    square = n_in * n_in
    return max(2 * len(r.inputs) * r.numel * compute, len(r.stats) * square * compute + 3 * square * 8 + 2 * r.numel * 8)


@dataclass
class _Source:
    model: str
    start: int
    end: int
    parameters: dict
    stats: str | None = None  # statistics file (models: form only)


@dataclass
class _Slice:
    sources: list[_Source]
    base: str | None
    parameters: dict

    @property
    def length(self) -> int:
        return self.sources[0].end - self.sources[0].start


def seed_for(random_seed: int, tensor: str, method: str) -> int:
    """A stable 63-bit seed from (seed, tensor, method): same on every machine, thread and order."""
    digest = hashlib.blake2b(f"{random_seed}\0{tensor}\0{method}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def make_plan(config: MergeConfig, checkpoints: Mapping[str, Checkpoint], *, allow_crimes: bool = False) -> Plan:
    """Resolve `config` against the opened input headers; raises on anything wrong."""
    method = get_method(config.merge_method)
    notes: list[str] = []
    _check_parameter_names(config, method, notes)
    _check_architectures(config, checkpoints, allow_crimes)
    slices = _normalise_slices(config, method, checkpoints)
    input_dtype = DTYPES[config.dtype] if config.dtype else None
    out_dtype = DTYPES[config.out_dtype] if config.out_dtype else input_dtype
    compute_dtype = torch.float64 if input_dtype == torch.float64 else torch.float32
    vocab = None
    if tokenizer_config(config) is not None:
        base = config.base_model or slices[0].base or slices[0].sources[0].model
        vocab = build_vocab(config, checkpoints, base=base, models=config.all_model_refs())
    planner = _Planner(config, method, checkpoints, out_dtype, notes, vocab)

    first, last = slices[0], slices[-1]
    recipes: list[TensorRecipe] = []
    recipes += planner.outside_layers(first, "pre")
    out_layer = 0
    for sl in slices:
        for i in range(sl.length):
            t = i / (sl.length - 1) if sl.length > 1 else 1.0
            recipes += planner.layer(sl, i, out_layer, t)
            out_layer += 1
    recipes += planner.outside_layers(last, "post")
    if not recipes:
        raise PlanError("the inputs hold no tensors to merge")

    donor = _donor(config, slices)
    output_config = _output_config(checkpoints[donor].config, config, slices, checkpoints, out_layer, recipes)
    chat_template = None
    if vocab is not None:
        _set_vocab_size(output_config, vocab.rows)
        chat_template = vocab.chat_template
        for ref, m in vocab.report["models"].items():
            if m["stripped"]:
                notes.append(f"{ref}: {len(m['stripped'])} tokenizer tokens have no embedding row and were left out ({m['stripped'][0]!r}...)")
    elif config.chat_template is not None:
        # `auto` looks at every input's template; a name or a literal needs none of them.
        refs = config.all_model_refs() if config.chat_template == "auto" else []
        toks = {ref: load_tokenizer(checkpoints[ref]) for ref in refs}
        chat_template = resolve_chat_template(config.chat_template, toks, refs)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return Plan(config, method, recipes, output_config, donor, input_dtype, compute_dtype, notes, vocab, chat_template)


def _check_parameter_names(config: MergeConfig, method: MergeMethod, notes: list[str]) -> None:
    def check(params: dict, where: str, *, per_model_scope: bool) -> None:
        for key, value in params.items():
            p = method.param(key)
            if p is None:
                raise ConfigError(
                    f"{where}: unknown parameter {key!r} for {method.name}{did_you_mean(key, method.param_names)}"
                    + (f"; {method.name} takes {', '.join(method.param_names)}" if method.param_names else "; it takes none")
                )
            if per_model_scope and not p.per_model:
                raise ConfigError(f"{where}: {key!r} is a global parameter of {method.name}; set it in the top-level or slice parameters")
            _check_written_values(p, check_setting(value, f"{where}.{key}"), f"{where}.{key}")

    check(config.parameters, "parameters", per_model_scope=False)
    for i, m in enumerate(config.models or []):
        check(m.parameters, f"models[{i}] ({m.model}).parameters", per_model_scope=True)
    for i, s in enumerate(config.slices or []):
        check(s.parameters, f"slices[{i}].parameters", per_model_scope=False)
        for j, src in enumerate(s.sources):
            check(src.parameters, f"slices[{i}].sources[{j}] ({src.model}).parameters", per_model_scope=True)


def _check_written_values(p: Param, setting: Any, where: str) -> None:
    """Range-check every value the user wrote, even one a higher-precedence scope overrides."""
    if isinstance(setting, list):
        for entry in setting:
            _check_written_values(p, entry.value if hasattr(entry, "value") else entry, where)
    elif not (isinstance(setting, str) and p.kind in (int, float)):  # strings pick from lists per layer
        p.coerce(setting, where)


def _check_architectures(config: MergeConfig, checkpoints: Mapping[str, Checkpoint], allow_crimes: bool) -> None:
    refs = config.all_model_refs()
    archs = {ref: arch.architecture(checkpoints[ref].config) for ref in refs}
    if len(set(archs.values())) > 1 and not allow_crimes:
        listing = ", ".join(f"{ref} is {a}" for ref, a in archs.items())
        raise PlanError(f"the models have different architectures ({listing}); pass --allow-crimes if you mean it")


def _normalise_slices(config: MergeConfig, method: MergeMethod, checkpoints: Mapping[str, Checkpoint]) -> list[_Slice]:
    """`models:` becomes one slice over all layers; every slice is checked against the method."""
    def layers(ref: str) -> int:
        c = checkpoints[ref]
        return arch.num_layers(c.config, c.tensors)

    if config.models is not None:
        counts = {m.model: layers(m.model) for m in config.models}
        if config.base_model:
            counts.setdefault(config.base_model, layers(config.base_model))
        if len(set(counts.values())) > 1:
            listing = ", ".join(f"{ref} has {n}" for ref, n in counts.items())
            raise PlanError(f"the models have different layer counts ({listing}); use slices to pick matching layer ranges")
        n = next(iter(counts.values()))
        sources = [_Source(m.model, 0, n, dict(m.parameters), m.stats) for m in config.models]
        if config.base_model and method.base != "unused" and config.base_model not in [s.model for s in sources]:
            sources.insert(0, _Source(config.base_model, 0, n, {}))
        slices = [_Slice(sources, config.base_model, {})]
    else:
        slices = []
        for i, s in enumerate(config.slices or []):
            sources = []
            for j, src in enumerate(s.sources):
                start, end = src.layer_range
                n = layers(src.model)
                if end > n:
                    raise PlanError(f"slices[{i}].sources[{j}]: layer_range [{start}, {end}) is outside {src.model}, which has {n} layers")
                sources.append(_Source(src.model, start, end, dict(src.parameters)))
            slices.append(_Slice(sources, s.base_model or config.base_model, dict(s.parameters)))

    for i, sl in enumerate(slices):
        where = "models" if config.models is not None else f"slices[{i}]"
        refs = [s.model for s in sl.sources]
        if method.base == "required" and not sl.base:
            raise ConfigError(f"{method.name} needs a base_model (the model the task vectors are taken from)")
        if method.base != "unused" and sl.base and sl.base not in refs:
            raise ConfigError(f"{where}: base_model {sl.base} is not among the sources; add it with the same layer_range")
        if method.base != "unused" and sl.base:
            for src in sl.sources:
                if src.model == sl.base and src.parameters:
                    names = ", ".join(sorted(src.parameters))
                    # mergekit ignores these silently; we at least say so.
                    warnings.warn(f"{where}: parameters of the base model {sl.base} ({names}) are not used by {method.name}", stacklevel=3)
        others = len([r for r in refs if not (method.base != "unused" and r == sl.base)])
        if len(set(refs)) != len(refs) and method.name != "passthrough":
            raise ConfigError(f"{where}: a model appears twice among the sources of one merge")
        if method.stats:
            for src in sl.sources:
                if src.stats is None and not (method.base != "unused" and src.model == sl.base):
                    how = f"add `stats: FILE` to it, made by `alloy stats {src.model} --data TEXT FILE`"
                    if config.models is None:
                        how = "give the models with `models:` (slices cannot carry stats) and " + how
                    raise ConfigError(f"{where}: {method.name} needs {method.stats} statistics for {src.model}; {how}")
        elif any(src.stats for src in sl.sources):
            warnings.warn(f"{where}: {method.name} reads no statistics; the models' stats files are not used", stacklevel=3)
        low, high = method.min_models, method.max_models
        if others < low or (high is not None and others > high):
            want = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            base_note = " besides the base" if method.base != "unused" and sl.base else ""
            raise ConfigError(f"{where}: {method.name} takes {want} model(s){base_note}, got {others}")
    return slices


class _Planner:
    def __init__(self, config: MergeConfig, method: MergeMethod, checkpoints: Mapping[str, Checkpoint], out_dtype, notes: list[str], vocab: VocabPlan | None = None):
        self.config, self.method, self.checkpoints = config, method, checkpoints
        self.out_dtype, self.notes = out_dtype, notes
        self.vocab = vocab
        self._warned: set[str] = set()
        self._regions: dict[str, dict[str | int, list[str]]] = {}  # model -> layer or position -> names

    def _template(self, sl: _Slice) -> _Source:
        """The source whose tensor names define the output: the base if it is there, else the first."""
        if sl.base and self.method.base != "unused":
            return next(s for s in sl.sources if s.model == sl.base)
        return sl.sources[0]

    def _split(self, sl: _Slice) -> tuple[_Source | None, list[_Source]]:
        if self.method.base != "unused" and sl.base:
            base = next(s for s in sl.sources if s.model == sl.base)
            return base, [s for s in sl.sources if s is not base]
        return None, list(sl.sources)

    def outside_layers(self, sl: _Slice, position: str) -> list[TensorRecipe]:
        template = self.checkpoints[self._template(sl).model]
        names = [n for n in _ordered(template) if arch.role(n).position == position]
        for s in sl.sources:
            self._refuse_extra(sl, s, position, set(names))
        return [self._recipe(sl, name, {s.model: name for s in sl.sources}, 0.0) for name in names]

    def _refuse_extra(self, sl: _Slice, src: _Source, region: str | int, used: set[str]) -> None:
        """A tensor that an input has and the template lacks would be dropped silently (as mergekit
        does); refuse it. Tensors the template has and an input lacks fail in `_location`."""
        regions = self._regions.get(src.model)
        if regions is None:
            regions = self._regions[src.model] = {}
            for n in _ordered(self.checkpoints[src.model]):
                r = arch.role(n)
                regions.setdefault(r.layer if r.layer is not None else r.position, []).append(n)
        extra = [n for n in regions.get(region, []) if n not in used]
        if extra:
            raise PlanError(
                f"tensor {extra[0]!r} is in {src.model} but missing from {self._template(sl).model}; "
                "the models do not have the same layout (a tied or untied lm_head?)"
            )

    def layer(self, sl: _Slice, offset: int, out_layer: int, t: float) -> list[TensorRecipe]:
        tsrc = self._template(sl)
        template = self.checkpoints[tsrc.model]
        layer = tsrc.start + offset
        names = [n for n in _ordered(template) if arch.layer_index(n) == layer]
        recipes = []
        for name in names:
            per_model = {s.model: arch.with_layer(name, s.start + offset) for s in sl.sources}
            recipes.append(self._recipe(sl, arch.with_layer(name, out_layer), per_model, t))
        for s in sl.sources:
            self._refuse_extra(sl, s, s.start + offset, {arch.with_layer(n, s.start + offset) for n in names})
        return recipes

    def _recipe(self, sl: _Slice, out_name: str, names: dict[str, str], t: float) -> TensorRecipe:
        base_src, others = self._split(sl)
        tsrc = self._template(sl)
        tloc = self._location(tsrc.model, names[tsrc.model])
        method = self.method
        base = TensorSource(base_src.model, names[base_src.model]) if base_src else None
        inputs = tuple(TensorSource(s.model, names[s.model]) for s in others)
        shape, aligned = tloc.shape, False
        by_token = self.vocab is not None and names[tsrc.model] in self.vocab.vocab_tensors
        if by_token:
            # Rows are matched by token (vocab.py); only the width has to agree.
            shape = (self.vocab.rows, *tloc.shape[1:])
            refs = [s.model for s in sl.sources] + [t.source for m in (s.model for s in sl.sources) for t in self.vocab.gathers[m]]
            for ref in dict.fromkeys(refs):
                loc = self._location(ref, names.get(ref, names[tsrc.model]))
                if loc.shape[1:] != tloc.shape[1:]:
                    raise PlanError(f"tensor {loc.name!r}: shape {list(loc.shape)} in {ref} but {list(tloc.shape)} in {tsrc.model}; the widths differ")
            rows_of = {s.model: self._location(s.model, names[s.model]).shape[0] for s in sl.sources}
            aligned = self.vocab.needs_alignment(list(rows_of), rows_of)
        for src in (base, *inputs):
            if src is None or by_token:
                continue
            loc = self._location(src.model, src.tensor)
            if loc.shape != tloc.shape:
                hint = (
                    "; the vocabularies differ: add a tokenizer section (tokenizer: {source: base})"
                    if arch.role(out_name).kind in ("embedding", "head")
                    else ""
                )
                raise PlanError(
                    f"tensor {src.tensor!r}: shape {list(loc.shape)} in {src.model} but {list(tloc.shape)} in {tsrc.model}{hint}"
                )
        if not tloc.dtype.is_floating_point:
            # Integer buffers (positions, masks) cannot be averaged: they come from the template.
            return TensorRecipe(out_name, "passthrough", (TensorSource(tsrc.model, names[tsrc.model]),), None, {"scale": (1.0,)}, shape, tloc.dtype, 0, aligned=aligned)
        params: dict[str, Any] = {}
        for p in method.params:
            if p.per_model:
                params[p.name] = tuple(self._resolve(p, sl, out_name, t, s.model) for s in others)
            else:
                params[p.name] = self._resolve(p, sl, out_name, t, None)
        if params.get("layout") == "auto":
            # Methods that treat weight matrices as linear maps need to know which they are.
            params["layout"] = arch.linear_layout(self.checkpoints[tsrc.model].config, out_name, tloc.shape)
        self._check_values(out_name, params, sl)
        stats = self._stats(others, names, tloc.shape, params.get("layout"))
        out_dtype = self.out_dtype or tloc.dtype
        seed = seed_for(self.config.random_seed, out_name, method.name) if method.randomized else 0
        if aligned and stats:
            # A statistic has one row per token of its own model's vocabulary; aligning it is not done yet.
            raise PlanError(
                f"tensor {out_name!r}: {method.name}'s statistics follow each model's own vocabulary, which differs here; "
                "merge models whose vocabularies match, or use a method without statistics"
            )
        return TensorRecipe(out_name, method.name, inputs, base, params, shape, out_dtype, seed, stats, aligned=aligned)

    def _stats(self, others: list[_Source], names: dict[str, str], shape: tuple[int, ...], layout: str | None) -> tuple[TensorSource, ...]:
        """The statistic of each input this tensor needs, checked to exist with the right shape.

        fisher needs one per tensor (its shape); regmean one per linear-layer weight ([in, in]),
        none for what it averages (``layout: vector``).
        """
        kind = self.method.stats
        if kind is None or (kind == "gram" and layout in (None, "vector")):
            return ()
        if kind == "gram":
            n_in = shape[1] if layout == "out_in" else shape[0]
            want: tuple[int, ...] = (n_in, n_in)
        else:
            want = shape
        found = []
        for src in others:
            tensor = names[src.model]
            key = stat_key(kind, tensor)
            loc = self.checkpoints[src.stats].tensors.get(key)
            if loc is None:
                hint = (
                    "; if it is not a linear layer's weight, set `layout: vector` for it (e.g. with a filter)"
                    if kind == "gram"
                    else f"; recompute the statistics: alloy stats {src.model} --data TEXT FILE"
                )
                raise PlanError(f"{src.stats}: no {kind} statistic for tensor {tensor!r} of {src.model}{hint}")
            if loc.shape != want:
                raise PlanError(
                    f"{src.stats}: {kind} statistic of {tensor!r} has shape {list(loc.shape)}, but {src.model}'s tensor needs "
                    f"{list(want)}; were the statistics computed for another model?"
                )
            found.append(TensorSource(src.stats, key))
        return tuple(found)

    def _location(self, model: str, tensor: str) -> TensorLocation:
        loc = self.checkpoints[model].tensors.get(tensor)
        if loc is None:
            raise PlanError(f"tensor {tensor!r} is missing from {model}; the models do not have the same layout")
        return loc

    def _resolve(self, p: Param, sl: _Slice, tensor: str, t: float, model: str | None) -> Any:
        scopes: list[dict] = []
        if model is not None:
            scopes += [s.parameters for s in sl.sources if s.model == model][:1]
        scopes += [sl.parameters, self.config.parameters]
        for scope in scopes:
            if p.name in scope:
                value = evaluate_setting(check_setting(scope[p.name], p.name), tensor, t)
                if value is not None:
                    return p.coerce(value, f"{tensor}" + (f" ({model})" if model else ""))
        if p.required:
            raise ConfigError(f"missing required parameter {p.name!r} for {model + ' ' if model else ''}tensor {tensor} ({self.method.name})")
        return p.default

    def _check_values(self, tensor: str, params: dict[str, Any], sl: _Slice) -> None:
        name = self.method.name
        # nearswap's t is a distance threshold, not an interpolation factor: any t > 0 is fine.
        if "t" in params and name != "nearswap" and not 0.0 <= params["t"] <= 1.0 and "t" not in self._warned:
            self._warned.add("t")
            self.notes.append(f"t={params['t']} is outside [0, 1] (first at {tensor}): the result extrapolates beyond the models")
        if self.method.check is not None and (problem := self.method.check(params, [s.model for s in self._split(sl)[1]])):
            raise ConfigError(f"{tensor}: {name}: {problem}")
        if name == "linear" and params.get("normalize") and abs(sum(params["weight"])) < 1e-12:
            raise ConfigError(f"{tensor}: linear weights {list(params['weight'])} sum to 0 and normalize is on; change the weights or set normalize: false")


def _ordered(ckpt: Checkpoint) -> list[str]:
    """Tensor names in storage order (file, offset): reading them in this order is sequential."""
    return sorted(ckpt.tensors, key=lambda n: (ckpt.tensors[n].file, ckpt.tensors[n].start, n))


def _donor(config: MergeConfig, slices: list[_Slice]) -> str:
    source = config.tokenizer_source
    if config.tokenizer is not None:
        source = config.tokenizer.source
    if source not in (None, "base", "union"):
        if source not in config.all_model_refs():
            raise ConfigError(f"tokenizer_source: {source!r} is not one of the models{did_you_mean(source, config.all_model_refs())}")
        return source
    return config.base_model or slices[0].base or slices[0].sources[0].model


def _set_vocab_size(out: dict, rows: int) -> None:
    """config.json's vocab_size (or text_config's) becomes the aligned row count, padding included."""
    target = out["text_config"] if isinstance(out.get("text_config"), dict) and "vocab_size" in out["text_config"] else out
    target["vocab_size"] = rows


def _output_config(donor_config: dict, config: MergeConfig, slices: list[_Slice], checkpoints, n_layers: int, recipes) -> dict:
    out = copy.deepcopy(donor_config)
    key = arch.layer_count_key(out)
    if key is not None and out[key] != n_layers:
        out[key] = n_layers
        if isinstance(out.get("layer_types"), list):
            # Per-layer attention kinds (sliding/full) follow the layers that were stacked.
            types = []
            for sl in slices:
                src_types = checkpoints[sl.sources[0].model].config.get("layer_types") or []
                types += src_types[sl.sources[0].start : sl.sources[0].end]
            out["layer_types"] = types
        if isinstance(out.get("max_window_layers"), int):
            out["max_window_layers"] = min(out["max_window_layers"], n_layers)
    float_dtypes = {r.out_dtype for r in recipes if r.out_dtype.is_floating_point}
    if len(float_dtypes) == 1:
        name = str(next(iter(float_dtypes))).removeprefix("torch.")
        for k in ("torch_dtype", "dtype"):
            if k in out or k == "dtype":
                out[k] = name
    return out

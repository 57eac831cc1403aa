"""`make_plan`: a config resolved against the opened input headers, tensor by tensor; any problem
the config and headers can reveal (unknown method or parameter, missing tensor, shape mismatch,
wrong number of models, layer ranges out of bounds) is raised here, before a tensor is read."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from modelalloy import arch
from modelalloy.config import MergeConfig, check_setting, evaluate_setting
from modelalloy.errors import ConfigError, PlanError
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.safetensors_format import TensorLocation
from modelalloy.io.stats_file import stat_key
from modelalloy.methods import MergeMethod, Param, get_method
from modelalloy.plan.recipes import DTYPES, Plan, TensorRecipe, TensorSource, seed_for
from modelalloy.plan.slices import LayerSlice, SliceSource, check_architectures, check_parameter_names, normalise_slices, pick_donor
from modelalloy.plan.tokenizer import load_tokenizer, resolve_chat_template
from modelalloy.plan.vocab import VocabPlan, build_vocab, tokenizer_config



def make_plan(config: MergeConfig, checkpoints: Mapping[str, Checkpoint], *, allow_crimes: bool = False) -> Plan:
    """Resolve `config` against the opened input headers; raises on anything wrong."""
    method = get_method(config.merge_method)
    notes: list[str] = []
    check_parameter_names(config, method, notes)
    check_architectures(config, checkpoints, allow_crimes)
    slices = normalise_slices(config, method, checkpoints)
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

    donor = pick_donor(config, slices)
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


class _Planner:
    def __init__(self, config: MergeConfig, method: MergeMethod, checkpoints: Mapping[str, Checkpoint], out_dtype, notes: list[str], vocab: VocabPlan | None = None):
        self.config, self.method, self.checkpoints = config, method, checkpoints
        self.out_dtype, self.notes = out_dtype, notes
        self.vocab = vocab
        self._warned: set[str] = set()
        self._regions: dict[str, dict[str | int, list[str]]] = {}  # model -> layer or position -> names

    def _template(self, sl: LayerSlice) -> SliceSource:
        """The source whose tensor names define the output: the base if it is there, else the first."""
        if sl.base and self.method.base != "unused":
            return next(s for s in sl.sources if s.model == sl.base)
        return sl.sources[0]

    def _split(self, sl: LayerSlice) -> tuple[SliceSource | None, list[SliceSource]]:
        if self.method.base != "unused" and sl.base:
            base = next(s for s in sl.sources if s.model == sl.base)
            return base, [s for s in sl.sources if s is not base]
        return None, list(sl.sources)

    def outside_layers(self, sl: LayerSlice, position: str) -> list[TensorRecipe]:
        template = self.checkpoints[self._template(sl).model]
        names = [n for n in _ordered(template) if arch.role(n).position == position]
        for s in sl.sources:
            self._refuse_extra(sl, s, position, set(names))
        return [self._recipe(sl, name, {s.model: name for s in sl.sources}, 0.0) for name in names]

    def _refuse_extra(self, sl: LayerSlice, src: SliceSource, region: str | int, used: set[str]) -> None:
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

    def layer(self, sl: LayerSlice, offset: int, out_layer: int, t: float) -> list[TensorRecipe]:
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

    def _recipe(self, sl: LayerSlice, out_name: str, names: dict[str, str], t: float) -> TensorRecipe:
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

    def _stats(self, others: list[SliceSource], names: dict[str, str], shape: tuple[int, ...], layout: str | None) -> tuple[TensorSource, ...]:
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

    def _resolve(self, p: Param, sl: LayerSlice, tensor: str, t: float, model: str | None) -> Any:
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

    def _check_values(self, tensor: str, params: dict[str, Any], sl: LayerSlice) -> None:
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


def _set_vocab_size(out: dict, rows: int) -> None:
    """config.json's vocab_size (or text_config's) becomes the aligned row count, padding included."""
    target = out["text_config"] if isinstance(out.get("text_config"), dict) and "vocab_size" in out["text_config"] else out
    target["vocab_size"] = rows


def _output_config(donor_config: dict, config: MergeConfig, slices: list[LayerSlice], checkpoints, n_layers: int, recipes) -> dict:
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

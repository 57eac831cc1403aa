"""Vocabulary alignment: one output tokenizer, and every model's embedding rows put in its order.

Fine-tunes often add tokens (chat markers, padding to a multiple of 64), so row 32000 of one
model's embedding may be a token another model does not have. Merging such tensors position by
position mixes unrelated tokens; truncating them to the common rows (what mergekit does without a
tokenizer section) throws tokens away. Here, with ``tokenizer_source`` or a ``tokenizer:``
section, the planner builds the output vocabulary first and records, for every model, where each
output row comes from. The executor then builds each model's aligned tensor right before the
method runs, so the merge still streams one tensor at a time.

A row a model lacks is filled, in order of preference (mergekit's order, see MERGEKIT-COMPAT.md):
the token's configured source, else the base model's row, else the only model that has the token,
else the mean over the models that have it. Padding rows (rows past the last token, from
``pad_to_multiple_of`` or kept from a padded source model) get each model's mean embedding, as
Hewitt (2021, "Initializing new word embeddings for pretrained language models") advises.

Everything over the vocabulary is done with index tensors; Python only loops over models and
over the tokens named in the config. Reading and editing the tokenizers, and the chat template,
are in `tokenizer.py`; the report's text and HTML forms in `vocab_report.py`.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from itertools import repeat
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from modelalloy import arch
from modelalloy.config import MergeConfig, ModelTokenSource, TokenizerConfig, ZeroSource
from modelalloy.errors import ConfigError, PlanError, did_you_mean
from modelalloy.plan.tokenizer import added_tokens, load_tokenizer, resolve_chat_template, special_tokens, vocab_within, without_tokens

if TYPE_CHECKING:
    from collections.abc import Mapping

    from modelalloy.io.checkpoint import Checkpoint

# The token-embedding tensor of the input side, across the transformers library and GGUF names.
_TOKEN_EMBEDDING = re.compile(r"(embed_tokens|(^|\.)wte|word_embeddings|tok_embeddings|embed_in)\.weight$")
_NOT_VOCAB = re.compile(r"position|token_type|wpe")

MEAN_ROW = -1  # a source row index meaning "that model's mean embedding"


def tokenizer_config(config: MergeConfig) -> TokenizerConfig | None:
    """The tokenizer section, with mergekit's legacy ``tokenizer_source`` read as one."""
    if config.tokenizer is not None:
        return config.tokenizer
    if config.tokenizer_source is not None:
        return TokenizerConfig(source=config.tokenizer_source)
    return None


def embedding_rows(ckpt: Checkpoint) -> tuple[str, int]:
    """(name, rows) of the token-embedding tensor of a model."""
    for name, loc in ckpt.tensors.items():
        if _TOKEN_EMBEDDING.search(name) and len(loc.shape) == 2:
            return name, loc.shape[0]
    raise PlanError(f"{ckpt.ref}: no token-embedding tensor found (looked for embed_tokens, wte, word_embeddings)")


def vocab_tensor_names(ckpt: Checkpoint) -> set[str]:
    """Tensors with one row (or entry) per token: the embedding, the LM head and its bias."""
    _, rows = embedding_rows(ckpt)
    return {
        name
        for name, loc in ckpt.tensors.items()
        if loc.shape
        and loc.shape[0] == rows
        and arch.role(name).kind in ("embedding", "head")
        and arch.role(name).position != "layer"
        and not _NOT_VOCAB.search(name)
    }


@dataclass(frozen=True)
class _Terms:
    """Rows of one model's aligned tensor taken from one source model: out[rows] += w * src[src_rows]."""

    source: str
    out_rows: torch.Tensor  # int64 [n]
    src_rows: torch.Tensor  # int64 [n]; MEAN_ROW = the source's mean embedding
    weights: torch.Tensor  # float64 [n]


@dataclass
class VocabPlan:
    """The output vocabulary and, per model, how its rows are gathered into it."""

    tokenizer: Any  # transformers fast tokenizer, written to the output
    rows: int  # rows of the output embedding (tokens + padding)
    tokens: list[str | None]  # token of each output row, None for padding rows
    gathers: dict[str, list[_Terms]]  # model ref -> terms (all models' rows in their own order)
    mean_rows: dict[str, torch.Tensor]  # model ref -> the rows its mean embedding averages
    identity: dict[str, bool]  # model ref -> its rows already are the output rows
    report: dict
    chat_template: str | None = None
    vocab_tensors: set[str] = field(default_factory=set)

    def fingerprint(self) -> str:
        """SHA-256 of the row mapping (every model's terms and padding): equal mappings, equal bytes out."""
        import hashlib

        h = hashlib.sha256(repr((self.rows, self.tokens)).encode())
        for ref in sorted(self.gathers):
            h.update(ref.encode() + self.mean_rows[ref].numpy().tobytes())
            for t in self.gathers[ref]:
                h.update(t.source.encode() + t.out_rows.numpy().tobytes() + t.src_rows.numpy().tobytes() + t.weights.numpy().tobytes())
        return h.hexdigest()

    def needs_alignment(self, models: list[str], rows_of: Mapping[str, int]) -> bool:
        return not all(self.identity[m] and rows_of[m] == self.rows for m in models)

    def aligned_reader(self, read: Callable[[str, str], torch.Tensor]) -> Callable[[str, str], torch.Tensor]:
        """A `read(model, tensor)` that returns vocabulary tensors in output-row order.

        Raw tensors are read once per recipe (a model's row may fill several others) and dropped
        with the returned function.
        """
        raw: dict[tuple[str, str], torch.Tensor] = {}

        def raw_read(model: str, tensor: str) -> torch.Tensor:
            key = (model, tensor)
            if key not in raw:
                raw[key] = read(model, tensor)
            return raw[key]

        def aligned(model: str, tensor: str) -> torch.Tensor:
            if tensor not in self.vocab_tensors:
                return read(model, tensor)
            return self.align(model, tensor, raw_read)

        return aligned

    def align(self, model: str, tensor: str, read: Callable[[str, str], torch.Tensor]) -> torch.Tensor:
        """`model`'s `tensor` with its rows in output order, filled where it lacks a token."""
        own = read(model, tensor)
        if self.identity[model] and own.shape[0] == self.rows:
            return own
        dtype = torch.promote_types(own.dtype, torch.float32)  # exact for bf16/f16 rows, room for means
        out = torch.zeros((self.rows, *own.shape[1:]), dtype=dtype)
        for terms in self.gathers[model]:
            src = read(terms.source, tensor)
            if src.shape[1:] != own.shape[1:]:
                raise PlanError(f"tensor {tensor!r}: rows of {list(src.shape[1:])} in {terms.source} but {list(own.shape[1:])} in {model}")
            src = src.to(dtype)
            src_rows = terms.src_rows
            if bool((src_rows == MEAN_ROW).any()):
                mean = src[self.mean_rows[terms.source]].mean(0, keepdim=True)
                src = torch.cat([src, mean])  # the mean is one extra row at index len(src)
                src_rows = torch.where(src_rows == MEAN_ROW, src.shape[0] - 1, src_rows)
            picked = src.index_select(0, src_rows)  # [n, ...]
            if bool((terms.weights == 1.0).all()):
                out.index_copy_(0, terms.out_rows, picked)  # rows taken whole: bit-exact copies
            else:  # a mean over the models that have the token: each adds its share, in model order
                weights = terms.weights.to(dtype).view(-1, *([1] * (picked.dim() - 1)))
                out.index_add_(0, terms.out_rows, picked * weights)
        return out


def _lookup(tokens: list[str | None], vocab: dict[str, int]) -> torch.Tensor:
    """Each token's id in `vocab`, -1 where absent; dict lookups run in C (map), not a Python loop."""
    return torch.from_numpy(np.fromiter(map(vocab.get, tokens, repeat(-1)), dtype=np.int64, count=len(tokens)))


def build_vocab(
    config: MergeConfig,
    checkpoints: Mapping[str, Checkpoint],
    *,
    base: str,
    models: list[str],
    load: Callable[[Checkpoint], Any] = load_tokenizer,
) -> VocabPlan:
    """Plan the output vocabulary for `models` (base first when there is one); checks everything."""
    from tokenizers import AddedToken

    tcfg = tokenizer_config(config)
    assert tcfg is not None
    refs = list(dict.fromkeys([base, *models]))
    for where, ref, keywords in [("tokenizer.source", tcfg.source, ("union", "base"))] + [
        (f"tokenizer.tokens[{t!r}].source", e.source if isinstance(e.source, str) else e.source.model, ("base",))
        for t, e in tcfg.tokens.items()
        if isinstance(e.source, (str, ModelTokenSource))
    ]:
        if ref not in keywords and ref not in refs:
            raise ConfigError(f"{where}: {ref!r} is not one of the models{did_you_mean(ref, refs)}")

    toks = {ref: load(checkpoints[ref]) for ref in refs}
    rows_of = {ref: embedding_rows(checkpoints[ref])[1] for ref in refs}
    vocabs: dict[str, dict[str, int]] = {}
    stripped: dict[str, list[str]] = {}
    for ref in refs:
        vocabs[ref], stripped[ref] = vocab_within(toks[ref], rows_of[ref])
    specials = set().union(*(special_tokens(t) for t in toks.values()))

    source = base if tcfg.source == "base" else tcfg.source
    out_tok = copy.deepcopy(toks[base if source == "union" else source])
    donor_rows = rows_of[base if source == "union" else source]
    # A tokenizer may list ids past its embedding (mergekit strips them too): drop them from the output.
    donor_ref = base if source == "union" else source
    if stripped[donor_ref]:
        out_tok = without_tokens(out_tok, stripped[donor_ref], donor_ref)
    out_vocab = out_tok.get_vocab()
    to_add: list[str] = []
    if source == "union":
        # Added tokens of every model join the output; tokens of a different base vocabulary cannot
        # be added faithfully (they would need that model's merges), so they are reported as dropped.
        for ref in refs:
            to_add += [t for t in added_tokens(toks[ref]) if t in vocabs[ref] and t not in out_vocab]
    to_add += [t for t in tcfg.tokens if t not in out_vocab]
    to_add = list(dict.fromkeys(to_add))
    if to_add:
        out_tok.add_tokens([AddedToken(t, special=t in specials, normalized=False) for t in to_add])
    out_vocab = out_tok.get_vocab()
    n_token_rows = max(out_vocab.values()) + 1
    rows = max(n_token_rows, donor_rows)  # a padded source keeps its padding: never shrink silently
    if tcfg.pad_to_multiple_of:
        rows = math.ceil(rows / tcfg.pad_to_multiple_of) * tcfg.pad_to_multiple_of
    out_ids = torch.from_numpy(np.fromiter(out_vocab.values(), dtype=np.int64, count=len(out_vocab)))
    table = np.full(rows, None, dtype=object)
    table[out_ids.numpy()] = list(out_vocab)
    tokens: list[str | None] = table.tolist()
    is_pad = torch.ones(rows, dtype=torch.bool)
    is_pad[out_ids] = False

    ids = torch.stack([_lookup(tokens, vocabs[ref]) for ref in refs])  # [M, rows], -1 = absent
    have = ids >= 0
    count = have.sum(0)
    idx = {ref: i for i, ref in enumerate(refs)}
    b = idx[base]
    row_of_token = out_vocab

    # Rows configured in `tokens:` replace the default fill (force: in every model).
    override = torch.zeros_like(have)
    configured: dict[str, list[_Terms]] = {ref: [] for ref in refs}
    how_configured: dict[tuple[str, int], str] = {}
    for token, entry in tcfg.tokens.items():
        r = row_of_token[token]
        src = entry.source
        targets = refs if entry.force else [ref for ref in refs if not bool(have[idx[ref], r])]
        if src is None:
            if entry.force:
                raise ConfigError(f"tokenizer.tokens[{token!r}]: force needs a source")
            continue
        where = f"tokenizer.tokens[{token!r}].source"
        if isinstance(src, ZeroSource):
            term, how = None, "zero (configured)"
        elif isinstance(src, str):
            ref = base if src == "base" else src
            if not bool(have[idx[ref], r]):
                raise ConfigError(f"{where}: {ref} has no token {token!r}; name a model that has it, or use {{kind: model_token, ...}}")
            term, how = (ref, int(ids[idx[ref], r])), f"from {ref} (configured)"
        else:
            ref = base if src.model == "base" else src.model
            if src.token is not None:
                if src.token not in vocabs[ref]:
                    raise ConfigError(f"{where}: {ref} has no token {src.token!r}{did_you_mean(src.token, [t for t in vocabs[ref] if len(t) > 1][:5000])}")
                row = vocabs[ref][src.token]
            else:
                row = src.token_id
                if row >= rows_of[ref]:
                    raise ConfigError(f"{where}: token_id {row} is past the {rows_of[ref]} embedding rows of {ref}")
            term, how = (ref, row), f"from {ref} row {row} (configured)"
        for target in targets:
            override[idx[target], r] = True
            how_configured[(target, r)] = how
            if term is not None:
                configured[target].append(_Terms(term[0], torch.tensor([r]), torch.tensor([term[1]]), torch.ones(1, dtype=torch.float64)))

    gathers: dict[str, list[_Terms]] = {}
    mean_rows: dict[str, torch.Tensor] = {}
    identity: dict[str, bool] = {}
    fills: dict[str, dict[str, Any]] = {}
    for ref in refs:
        m = idx[ref]
        terms: dict[tuple[str, bool], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}  # (source, share of a mean)

        def add(src: str, mask: torch.Tensor, src_rows: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> None:
            out_rows = mask.nonzero().flatten()
            if not len(out_rows):
                return
            if src_rows is None:
                src_rows = ids[idx[src], out_rows]
            w = torch.ones(len(out_rows), dtype=torch.float64) if weights is None else weights[out_rows]
            terms.setdefault((src, weights is not None), []).append((out_rows, src_rows, w))

        free = ~override[m]
        own = have[m] & free
        missing = ~have[m] & ~is_pad & free
        from_base = missing & have[b]
        rest = missing & ~have[b]
        single = rest & (count == 1)
        multi = rest & (count > 1)
        zero = rest & (count == 0)
        pad = is_pad & free
        add(ref, own)
        add(base, from_base)
        for k, other in enumerate(refs):
            add(other, single & have[k])
            add(other, multi & have[k], weights=1.0 / count.clamp(min=1).to(torch.float64))
        add(ref, pad, src_rows=torch.full((int(pad.sum()),), MEAN_ROW, dtype=torch.int64))
        gathers[ref] = [
            _Terms(src, torch.cat([t[0] for t in parts]), torch.cat([t[1] for t in parts]), torch.cat([t[2] for t in parts]))
            for (src, _), parts in terms.items()
        ] + configured[ref]
        mean_rows[ref] = torch.unique(torch.from_numpy(np.fromiter(vocabs[ref].values(), dtype=np.int64, count=len(vocabs[ref]))))
        identity[ref] = bool(not override[m].any() and have[m].all() and torch.equal(ids[m], torch.arange(rows)))

        def names(mask: torch.Tensor, limit: int | None = None) -> list[str]:
            return [tokens[i] for i in mask.nonzero().flatten()[:limit].tolist()]

        model_fills: dict[str, str] = {t: f"from base {base}" for t in names(from_base)}
        only = ids.new_full((rows,), -1)
        only[single] = have[:, single].to(torch.int8).argmax(0)
        for t, k in zip(names(single), only[single].tolist()):
            model_fills[t] = f"from {refs[k]} (the only model with it)"
        for t, n in zip(names(multi), count[multi].tolist()):
            model_fills[t] = f"mean of the {n} models that have it"
        for t in names(zero):
            model_fills[t] = "zero (no model has it)"
        for (target, r), how in how_configured.items():
            if target == ref:
                model_fills[tokens[r]] = how
        moved = have[m] & (ids[m] != torch.arange(rows))
        fills[ref] = {
            "tokens": len(vocabs[ref]),
            "embedding_rows": rows_of[ref],
            "stripped": stripped[ref],
            "remapped": int(moved.sum()),
            "remapped_examples": {t: [int(ids[m, row_of_token[t]]), row_of_token[t]] for t in names(moved, 20)},
            "filled": model_fills,
            "padding_rows_mean": int(pad.sum()),
            "dropped": sorted(vocabs[ref].keys() - out_vocab.keys(), key=vocabs[ref].get),
        }

    base_vocab = vocabs[base]
    report = {
        "source": tcfg.source,
        "base": base,
        "rows": rows,
        "tokens": len(out_vocab),
        "padding_rows": int(is_pad.sum()),
        "pad_to_multiple_of": tcfg.pad_to_multiple_of,
        "added": [t for t in tokens if t is not None and t not in base_vocab],
        "models": fills,
    }
    chat_template = resolve_chat_template(config.chat_template, toks, refs)
    if chat_template is not None:
        out_tok.chat_template = chat_template
    plan = VocabPlan(out_tok, rows, tokens, gathers, mean_rows, identity, report, chat_template)
    for ref in refs:
        plan.vocab_tensors |= vocab_tensor_names(checkpoints[ref])
    return plan

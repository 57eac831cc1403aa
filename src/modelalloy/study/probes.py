"""What the study measures by running a model beside its scores (which `evaluate.score` gives,
with the predictive entropy): greedy continuations; hidden states for CKA. And the ensemble, a
model made of k experts.

`Ensemble` is a causal LM whose next-token distribution is the mean of its experts' (logits = log
of the mean probability, so cross-entropy on them is −log of the mean). Experts that share their
bottom layers with each other bit for bit (fine-tunes of the top layers) run those layers once
per batch, as `evaluate.shared` does across models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import numpy as np
import torch

from modelalloy.evaluate.shared import EMBED, SharedBottom, model_hashes, shared_depth, states_after, top_only
from modelalloy.study.measures import distinct_n, repeated_ngram_share


class Ensemble(torch.nn.Module):
    """k causal LMs of one vocabulary, scored as the mean of their next-token probabilities."""

    def __init__(self, experts: Sequence[torch.nn.Module]):
        super().__init__()
        self.experts = torch.nn.ModuleList(experts)
        self.config = experts[0].config
        self.shared_depth = _common_bottom(experts)
        self._checked = False

    def forward(self, input_ids=None, attention_mask=None, **kw):
        return SimpleNamespace(logits=mean_of_probabilities(self.expert_logprobs(input_ids, attention_mask)))

    def expert_logprobs(self, input_ids, attention_mask, *, batch: int | None = None, bottom: SharedBottom | None = None) -> list[torch.Tensor]:
        """Each expert's next-token log-probabilities (float32), their shared bottom run once: or
        not at all, when `bottom` (states kept per batch of one set, at this depth) has them."""
        return [torch.log_softmax(logits.float(), -1) for logits in self._expert_logits(input_ids, attention_mask, batch, bottom)]

    def _expert_logits(self, input_ids, attention_mask, batch, bottom):
        depth = self.shared_depth
        if not depth:
            return [e(input_ids=input_ids, attention_mask=attention_mask).logits for e in self.experts]
        reuse = bottom is not None and batch is not None and bottom.depth == depth and (bottom.run is None or bottom.run.enabled)
        states = bottom.get(batch, input_ids) if reuse else None
        if states is None:
            states = states_after(self.experts[0], depth, input_ids, attention_mask)
            if reuse:
                bottom.put(batch, input_ids, states)
        out = []
        for e in self.experts:
            with top_only(e, depth):
                out.append(e(inputs_embeds=states, attention_mask=attention_mask).logits)
        if not self._checked:
            # Once: the shortcut must give what the expert's own forward gives (as evaluate.shared checks).
            self._checked = True
            full = self.experts[0](input_ids=input_ids, attention_mask=attention_mask).logits
            if not torch.allclose(full, out[0], rtol=1e-4, atol=1e-4):
                self.shared_depth = 0
                return self._expert_logits(input_ids, attention_mask, batch, bottom)
        return out


def mean_of_probabilities(logprobs: Sequence[torch.Tensor]) -> torch.Tensor:
    """log mean_i p_i = logsumexp_i(log p_i) − log k: the ensemble's logits (already normalized)."""
    return torch.logsumexp(torch.stack(list(logprobs)), 0) - math.log(len(logprobs))


class EnsembleFamily:
    """The ensembles of several subsets of the same experts, scored together by
    `evaluate.scoring.perplexities`: each batch runs every expert once (and their shared bottom
    once, or reuses it from `bottom`), then forms each subset's mean of probabilities. On the
    demo's study (five subsets of four experts) this is a quarter of scoring each ensemble alone."""

    def __init__(self, experts: Mapping[str, torch.nn.Module], subsets: Sequence[Sequence[str]]):
        self.names = list(experts)
        self.ensemble = Ensemble(list(experts.values()))
        self.subsets = [tuple(s) for s in subsets]

    def logits_of(self, bottom: SharedBottom | None = None):
        """The `logits_of` of `perplexities`: (subset, its ensemble's logits) for each subset."""

        def run(input_ids, attention_mask, batch):
            logprobs = dict(zip(self.names, self.ensemble.expert_logprobs(input_ids, attention_mask, batch=batch, bottom=bottom)))
            for subset in self.subsets:
                yield subset, mean_of_probabilities([logprobs[n] for n in subset])

        return run


def _common_bottom(experts: Sequence[torch.nn.Module]) -> int:
    """How many decoder layers, from the bottom, all experts share bit for bit (0: none, or another layout)."""
    hashes = [model_hashes(e) for e in experts]
    if len(experts) < 2 or any(h is None for h in hashes):
        return 0
    n_layers = sum(1 for k in hashes[0] if k != EMBED)
    return min(min(shared_depth(hashes[0], h) for h in hashes[1:]), n_layers - 1)


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied head counted once)."""
    return sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values())


def prompts_from(tokenizer, texts: Sequence[str], *, n: int, tokens: int) -> list[list[int]]:
    """`n` prompts of `tokens` tokens, cut at even steps through the concatenated texts."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise ValueError(f"the prompt text has {len(ids)} tokens, fewer than one prompt of {tokens}")
    starts = np.linspace(0, len(ids) - tokens, n).astype(int)  # even steps; overlapping only if the text is short
    return [ids[s : s + tokens] for s in starts]


@torch.inference_mode()
def greedy_continuations(model, prompts: Sequence[Sequence[int]], new_tokens: int, *, batch_size: int = 32) -> list[list[int]]:
    """The greedy continuation (`new_tokens` tokens, no early stop) of each prompt.

    Prompts are of equal length here (`prompts_from`), so no padding is needed; the model's own
    KV cache is used (`generate` with do_sample off). A step of a small batch costs about what
    reading the weights costs, so the study's 32 prompts run as one batch (on the demo's 135M
    model 8 s for 32 × 64 tokens, against 12 s in batches of 16).
    """
    out: list[list[int]] = []
    model.eval()
    for b in range(0, len(prompts), batch_size):
        ids = torch.tensor([list(p) for p in prompts[b : b + batch_size]], dtype=torch.long)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
        out += gen[:, ids.shape[1] :].tolist()
    return out


def repetition(continuations: Sequence[Sequence[int]]) -> dict:
    """Mean distinct-2 and mean share of repeated 4-grams over the continuations."""
    d2 = [v for c in continuations if (v := distinct_n(c, 2)) is not None]
    r4 = [v for c in continuations if (v := repeated_ngram_share(c, 4)) is not None]
    return {"distinct_2": float(np.mean(d2)) if d2 else None, "repeated_4gram": float(np.mean(r4)) if r4 else None, "n_continuations": len(continuations)}


@torch.inference_mode()
def hidden_states(model, ids: Sequence[int], *, window: int = 512) -> list[np.ndarray]:
    """Per layer (after each block), the hidden state of every token: [layers][tokens, hidden]."""
    model.eval()
    chunks = []
    for start in range(0, len(ids), window):
        piece = torch.tensor([list(ids[start : start + window])], dtype=torch.long)
        states = model(input_ids=piece, output_hidden_states=True).hidden_states[1:]  # [0] is the embedding
        chunks.append([h[0].double().numpy() for h in states])
    return [np.concatenate([c[layer] for c in chunks]) for layer in range(len(chunks[0]))]

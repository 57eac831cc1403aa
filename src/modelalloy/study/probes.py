"""What the study measures by running a model: beside its scores, predictive entropy; greedy
continuations; hidden states for CKA. And the ensemble, a model made of k experts.

`EntropyTap` wraps a causal LM so that scoring it (`evaluate.score`) also keeps the entropy of
every next-token distribution it computes; `take(spans)` averages it over exactly the positions
that predicted a scored token, so entropy costs no second pass. `Ensemble` is a causal LM whose next-token distribution is the mean of its experts'
(logits = log of the mean probability, so cross-entropy on them is −log of the mean).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import torch

from modelalloy.study.measures import distinct_n, entropy, repeated_ngram_share


class EntropyTap(torch.nn.Module):
    """`model`, keeping the predictive entropy (nats) of every real position of every row it runs."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model
        self.config = model.config
        self.rows: list[np.ndarray] = []

    def forward(self, input_ids=None, attention_mask=None, **kw):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, **kw)
        lengths = attention_mask.sum(-1).tolist() if attention_mask is not None else [input_ids.shape[1]] * input_ids.shape[0]
        h = entropy(out.logits).cpu().numpy()  # [batch, width]
        self.rows += [h[i, :n] for i, n in enumerate(lengths)]  # right padding: a row's real positions come first
        return out

    def take(self, spans: Sequence[tuple[int, int, int]] | None = None) -> float | None:
        """The mean entropy over the positions that predict a scored token, and a fresh start.

        `spans` are the scorer's windows in the order it ran them (`evaluate.scoring.windows`):
        row i's scored targets [first, end) are predicted at positions first − start − 1 to
        end − start − 2. Without spans: every position but each row's last.
        """
        rows, self.rows = self.rows, []
        if spans is None:
            picked = [r[:-1] for r in rows]
        else:
            if len(spans) != len(rows):
                raise ValueError(f"{len(rows)} rows ran but {len(spans)} windows were given")
            picked = [r[first - start - 1 : end - start - 1] for r, (start, first, end) in zip(rows, spans)]
        values = np.concatenate(picked) if picked else np.zeros(0)
        return float(values.mean()) if values.size else None


class Ensemble(torch.nn.Module):
    """k causal LMs of one vocabulary, scored as the mean of their next-token probabilities."""

    def __init__(self, experts: Sequence[torch.nn.Module]):
        super().__init__()
        self.experts = torch.nn.ModuleList(experts)
        self.config = experts[0].config

    def forward(self, input_ids=None, attention_mask=None, **kw):
        # log mean_i p_i = logsumexp_i(log p_i) − log k; one forward pass per expert.
        logps = torch.stack([torch.log_softmax(e(input_ids=input_ids, attention_mask=attention_mask).logits.float(), -1) for e in self.experts])
        return SimpleNamespace(logits=torch.logsumexp(logps, 0) - math.log(len(self.experts)))


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
def greedy_continuations(model, prompts: Sequence[Sequence[int]], new_tokens: int, *, batch_size: int = 16) -> list[list[int]]:
    """The greedy continuation (`new_tokens` tokens, no early stop) of each prompt.

    Prompts are of equal length here (`prompts_from`), so no padding is needed; the model's own
    KV cache is used (`generate` with do_sample off).
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

"""Tiny real specialists for studies: a tiny Llama base and three specialists, each trained for a
few CPU steps on its own synthetic "domain" of text, saved after a short and a longer training
(two strengths), with a character-level tokenizer beside each."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

WORDS = {
    "prose": "the cat sat on a mat and the dog ran to the old barn near a tree".split(),
    "digits": "12 34 56 78 90 13 57 24 68 11 22 33".split(),
    "shout": "HEY YOU STOP THAT NOW GO AWAY FAST LOUD BIG".split(),
    "mixed": "x1 y2 z3 q? w! e# r$ t% a^ b& c*".split(),
}
DOMAINS = ("prose", "digits", "shout")


def domain_text(domain: str, n: int, seed: int) -> str:
    rng = random.Random(f"{domain}/{seed}")
    return " ".join(rng.choice(WORDS[domain]) for _ in range(n)) + "\n"


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    chars = ["</s>", "<unk>", "\n"] + [chr(i) for i in range(32, 127)]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", bos_token="</s>")


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                                      vocab_size=128, max_position_embeddings=128, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def train(model, tok, text: str, steps: int, *, seed: int, lr: float = 3e-3) -> None:
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 48, (4,), generator=g)
        batch = torch.stack([ids[s : s + 48] for s in starts])
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(scope="session")
def study_models(tmp_path_factory) -> dict:
    """{"base": dir, "specialists": {domain: [dir after 15 steps, dir after 40]}, "held": {domain: [texts]}}."""
    root = tmp_path_factory.mktemp("study")
    torch.set_num_threads(1)
    tok = char_tokenizer()
    base = tiny_llama()
    # A base that knows a little of everything, so specialists start from a shared model.
    train(base, tok, "".join(domain_text(d, 400, 1) for d in WORDS), 30, seed=1)
    paths = {"base": root / "base", "specialists": {}, "held": {}}
    base.save_pretrained(paths["base"])
    tok.save_pretrained(paths["base"])
    for i, d in enumerate(DOMAINS):
        model = tiny_llama()
        model.load_state_dict(base.state_dict())
        dirs = []
        for steps, name in ((15, "s1"), (25, "s2")):
            train(model, tok, domain_text(d, 600, 2), steps, seed=10 + i)
            out = root / f"{d}-{name}"
            model.save_pretrained(out)
            tok.save_pretrained(out)
            dirs.append(out)
        paths["specialists"][d] = dirs
    paths["held"] = {d: [domain_text(d, 120, 100 + j) for j in range(12)] for d in (*DOMAINS, "mixed")}
    return paths


@pytest.fixture(scope="session")
def study_yaml(study_models, tmp_path_factory) -> Path:
    import yaml

    root = tmp_path_factory.mktemp("spec")
    sets = []
    for d, texts in study_models["held"].items():
        (root / f"{d}.jsonl").write_text("".join(__import__("json").dumps({"text": t}) + "\n" for t in texts))
        sets.append({"name": d, "path": f"{d}.jsonl", "max_tokens": 1200, "window": 64, "batch_size": 8} | ({"expert": d} if d in DOMAINS else {}))
    spec = {
        "base": str(study_models["base"]),
        "specialists": [{"name": d, "checkpoints": [str(p) for p in study_models["specialists"][d]]} for d in DOMAINS],
        "strengths": ["short", "long"],
        "sets": sets,
        "methods": ["linear", "task_arithmetic", {"method": "ties", "parameters": {"density": 0.5}}],
        "coherence": {"prompts": 6, "prompt_tokens": 8, "new_tokens": 16},
        "divergence": {"tokens": 128},
        "bootstrap": {"resamples": 200},
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

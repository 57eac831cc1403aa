"""Scoring models and measuring merges: perplexity, multiple choice, the merge-rate table."""

from modelalloy.evaluate.bootstrap import Bootstrap
from modelalloy.evaluate.rate import MergeRate, SetInfo, merge_rate, nai, normalized_score
from modelalloy.evaluate.runner import EvalResult, RateResult, evaluate, load_model, method_variant, rate, score
from modelalloy.evaluate.scoring import multiple_choice, perplexity
from modelalloy.evaluate.sets import EvalError, EvalSet, load_evals

__all__ = [
    "Bootstrap",
    "EvalError",
    "EvalResult",
    "EvalSet",
    "MergeRate",
    "RateResult",
    "SetInfo",
    "evaluate",
    "load_evals",
    "load_model",
    "merge_rate",
    "method_variant",
    "multiple_choice",
    "nai",
    "normalized_score",
    "perplexity",
    "rate",
    "score",
]

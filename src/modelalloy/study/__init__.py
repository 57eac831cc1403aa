"""Studies of merging: sweeps of merges over methods, expert subsets and specialist strength,
side by side with fusion baselines (MoE, ensemble, oracle routing); coherence and divergence
measures; and which pre-evaluation diagnostic predicts a failed merge (`alloy study`)."""

from modelalloy.study.predict import predict
from modelalloy.study.run import run_study
from modelalloy.study.spec import StudyError, StudySpec, load_study, parse_study

__all__ = ["StudyError", "StudySpec", "load_study", "parse_study", "predict", "run_study"]

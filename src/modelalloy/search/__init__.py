"""Searching merge parameters against a measured objective (optuna), optionally on Ray."""

from modelalloy.search.run import SearchResult, TrialReport, run_search
from modelalloy.search.space import SearchSpec, build_config, load_spec

__all__ = ["SearchResult", "SearchSpec", "TrialReport", "build_config", "load_spec", "run_search"]

"""Diagnostics straight from weights: task-vector norms, agreement, sign conflicts, concentration."""

from modelalloy.analyze.weights import AnalyzeResult, analyze, concentration, sign_conflicts, subspace_overlap, tensor_stats, top_subspace

__all__ = ["AnalyzeResult", "analyze", "concentration", "sign_conflicts", "subspace_overlap", "tensor_stats", "top_subspace"]

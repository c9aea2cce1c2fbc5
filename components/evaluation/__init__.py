"""Scoring answers and retrieval on held-out questions (used by the retraining gate and `tandem eval`).

``run_evaluation`` measures base model, base + retrieval, adapter and adapter + retrieval through the gateway;
``format_table`` renders its report for a terminal. Both are imported lazily so that ``scoring`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from components.evaluation.report import format_table
    from components.evaluation.results import EvalReport
    from components.evaluation.run import run_evaluation

__all__ = ["EvalReport", "format_table", "run_evaluation"]


def __getattr__(name: str) -> Any:
    if name == "run_evaluation":
        from components.evaluation.run import run_evaluation

        return run_evaluation
    if name == "format_table":
        from components.evaluation.report import format_table

        return format_table
    if name == "EvalReport":
        from components.evaluation.results import EvalReport

        return EvalReport
    raise AttributeError(name)

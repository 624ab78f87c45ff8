"""Quality against bandwidth for every generation method (``fastblt eval``): tasks and the harness."""

from fastblt.evaluation.harness import METHOD_SETTINGS, evaluate, parse_settings, plan
from fastblt.evaluation.tasks import (
    Example,
    Task,
    code_completion,
    function_examples,
    humaneval,
    pass_at_1,
    translation,
)

__all__ = [
    "METHOD_SETTINGS",
    "Example",
    "Task",
    "code_completion",
    "evaluate",
    "function_examples",
    "humaneval",
    "pass_at_1",
    "parse_settings",
    "plan",
    "translation",
]

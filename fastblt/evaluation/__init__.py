"""Quality against bandwidth for every generation method (``fastblt eval``): tasks and the harness.

Modules: ``tasks`` (the prompts and their metrics), ``harness`` (runs the methods, writes the
results), ``sandbox`` (runs completions for pass@1), ``command`` (``fastblt eval``).

Names below load on first access, so ``import fastblt.evaluation.command`` (which ``fastblt --help``
does) imports neither NumPy nor sacrebleu.
"""

from __future__ import annotations

from fastblt.lazy_exports import lazy_exports

_EXPORTS = {
    "METHOD_SETTINGS": "harness",
    "evaluate": "harness",
    "parse_settings": "harness",
    "plan": "harness",
    "Example": "tasks",
    "Task": "tasks",
    "code_completion": "tasks",
    "function_examples": "tasks",
    "humaneval": "tasks",
    "pass_at_1": "tasks",
    "translation": "tasks",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

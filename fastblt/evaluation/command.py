"""``fastblt eval``: quality against bandwidth of every generation method over a task (harness.py, tasks.py).

Imported while ``fastblt --help`` builds its parser, so the harness, its tasks and JAX load inside the
handler.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastblt.errors import UsageError
from fastblt.sampler.rules import RULES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``fastblt eval`` to the ``fastblt`` parser."""
    parser = subparsers.add_parser(
        "eval",
        help="quality against bandwidth: every method and setting over a task",
        description="Runs ar and each --method over the task's prompts (each --setting's values, "
        "as a grid) and writes results.jsonl, results.md and quality_vs_bandwidth.png to --out; a "
        "finished method/setting in --out is read back, not recomputed.",
    )
    parser.add_argument("--checkpoint", required=True, help="a training workdir (latest step) or an export")
    parser.add_argument("--task", required=True, choices=["code_completion", "translation", "humaneval"])
    parser.add_argument("--method", nargs="+", default=["ar"], help="ar, blt_s, blt_d, blt_dv")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="generation settings (draft, block_size, anchor, and the unmasking rules "
        f"{', '.join(RULES)}: each rule value its own run); repeatable, a grid over the rest",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="evaluate the first N prompts (code_completion: N functions taken in turn from each module)",
    )
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        help="bytes generated per prompt (default 512 for humaneval, as the paper; 128 otherwise)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument(
        "--max-prompt-bytes",
        type=int,
        default=None,
        help="a prompt's last N bytes are kept (default: as many as model.max_bytes leaves; a model "
        "trained on shorter rows does best with prompts within its training length)",
    )
    parser.add_argument(
        "--compile-workers",
        type=int,
        default=4,
        help="generation programs compiled side by side before the first run (1: one at a time)",
    )
    parser.add_argument("--out", default=None, help="results directory (resumable)")
    parser.add_argument(
        "--judge", default=None, help="checkpoint that scores the generations (default: the model)"
    )
    parser.add_argument(
        "--corpus-config",
        default="base",
        help="code_completion: the experiment whose data section is the corpus (its held-out split)",
    )
    parser.add_argument("--data", default=None, help="translation: a JSON Lines file of pairs")
    parser.add_argument("--source-field", default="source")
    parser.add_argument("--target-field", default="target")
    parser.add_argument("--shots", type=int, default=3, help="translation: few-shot pairs in every prompt")
    parser.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> None:
    from fastblt.config import load_config
    from fastblt.evaluation.harness import evaluate, parse_settings, plan
    from fastblt.evaluation.tasks import code_completion, humaneval, translation
    from fastblt.io.loading import load_model

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit {args.limit}: must be >= 1")
    if args.max_bytes is None:
        args.max_bytes = 512 if args.task == "humaneval" else 128
    if args.max_bytes < 1 or args.batch_size < 1 or args.compile_workers < 1:
        raise UsageError("--max-bytes, --batch-size and --compile-workers must be >= 1")
    settings = parse_settings(args.setting)
    plan(args.method, settings)  # a bad method fails before anything loads
    config, params = load_model(args.checkpoint)
    max_prompt = config.max_bytes - args.max_bytes - 2  # BOS, and one byte of room
    if max_prompt < 1:
        raise UsageError(f"--max-bytes {args.max_bytes} leaves no room for a prompt in model.max_bytes")
    if args.max_prompt_bytes is not None:
        if not 1 <= args.max_prompt_bytes <= max_prompt:
            raise UsageError(
                f"--max-prompt-bytes {args.max_prompt_bytes}: must be in [1, {max_prompt}] "
                f"(model.max_bytes {config.max_bytes} less --max-bytes {args.max_bytes} and 2)"
            )
        max_prompt = args.max_prompt_bytes
    if args.task == "code_completion":
        task = code_completion(load_config(args.corpus_config).data, args.limit, max_prompt)
    elif args.task == "humaneval":
        task = humaneval(args.limit, max_prompt)
    else:
        if not args.data:
            raise UsageError("--task translation needs --data FILE (JSON Lines with source/target fields)")
        task = translation(
            args.data, args.limit, max_prompt, args.source_field, args.target_field, args.shots
        )
    judge = load_model(args.judge) if args.judge else None
    evaluate(
        params,
        config,
        task,
        args.method,
        settings,
        max_bytes=args.max_bytes,
        batch_size=args.batch_size,
        out=args.out,
        judge=judge,
        compile_workers=args.compile_workers,
    )
    if args.out:
        print(Path(args.out, "results.md").read_text())

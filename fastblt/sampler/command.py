"""``fastblt sample``: generate bytes from a checkpoint with one of the sampler's methods (api.py).

Imported while ``fastblt --help`` builds its parser, so JAX and the sampler load inside the handler.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastblt.config import ATTENTION_IMPLS
from fastblt.errors import UsageError
from fastblt.sampler.rules import ANCHORS, RULES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``fastblt sample`` to the ``fastblt`` parser."""
    parser = subparsers.add_parser(
        "sample",
        help="generate bytes from a checkpoint (a training workdir or an export)",
        description="Generates from --prompt with the chosen method; prints the text, or one JSON "
        "object with the text and the work counters (--json).",
    )
    parser.add_argument("--checkpoint", required=True, help="a training workdir (latest step) or an export")
    parser.add_argument(
        "--method",
        default="ar",
        help="ar (cached autoregressive), blt_s (self-speculation), blt_d (diffusion blocks; a BLT-D "
        "checkpoint) or blt_dv (diffusion draft + verification; a BLT-D checkpoint)",
    )
    prompts = parser.add_argument_group("prompts (at least one; --prompt and --prompt-file may be mixed)")
    prompts.add_argument("--prompt", action="append", default=[], help="a UTF-8 prompt; repeat for a batch")
    prompts.add_argument(
        "--prompt-file",
        action="append",
        default=[],
        metavar="PATH",
        help="a prompt read as raw bytes (any bytes, not only UTF-8); '-' reads standard input; repeatable",
    )
    parser.add_argument("--max-bytes", type=int, default=256, help="bytes to generate per prompt")
    parser.add_argument(
        "--buffer-bytes",
        type=int,
        default=None,
        help="byte buffer per row, prompt + generation (default: the longest prompt plus --max-bytes, "
        "at most the model's max_bytes)",
    )
    parser.add_argument("--draft", type=int, default=8, help="blt_s: bytes drafted per verification")
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="blt_d/blt_dv: bytes per diffusion block (default: the block size the checkpoint was "
        "trained with, else 4)",
    )
    group = parser.add_mutually_exclusive_group()  # the unmasking rules (fastblt.sampler.rules)
    for rule in RULES.values():
        flag = "--" + rule.name.replace("_", "-")
        default = f" (the default, {rule.default})" if rule.default is not None else ""
        if rule.takes_value:
            group.add_argument(
                flag, type=float, metavar=rule.metavar, help=f"blt_d/blt_dv: {rule.help}{default}"
            )
        else:
            group.add_argument(flag, action="store_true", help=f"blt_d/blt_dv: {rule.help}")
    parser.add_argument(
        "--anchor",
        choices=ANCHORS,
        default="forced",
        help="blt_d/blt_dv: where a block starts: 'forced' (the paper: where the last one ended, closing the "
        "open patch there) or 'patch' (at the open patch's start, as in training)",
    )
    parser.add_argument(
        "--exact",
        action="store_true",
        help="ar/blt_s/blt_dv: every step at --exact-width columns, so greedy blt_s and blt_dv are "
        "byte-identical to greedy ar in any dtype (same --exact-width, batch and buffer)",
    )
    parser.add_argument(
        "--exact-width",
        type=int,
        default=None,
        help="--exact: the step width (>= draft + 1, >= block size; default 16)",
    )
    parser.add_argument(
        "--attention-impl",
        choices=ATTENTION_IMPLS,
        default=None,
        help="model.attention_impl for this run (default: the checkpoint's; 'auto' gives the fused kernels "
        "to a checkpoint saved with 'xla', the default before 2026-12-07)",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument(
        "--compilation-cache",
        metavar="DIR",
        default=None,
        help="keep compiled programs here (default: JAX_COMPILATION_CACHE_DIR, else "
        "$FASTBLT_COMPILATION_CACHE, else $XDG_CACHE_HOME/fastblt/jax or ~/.cache/fastblt/jax)",
    )
    cache.add_argument(
        "--no-compilation-cache", action="store_true", help="do not turn the persistent compilation cache on"
    )
    parser.set_defaults(run=_run_sample)


def _run_sample(args: argparse.Namespace) -> None:
    from fastblt.io.loading import load_model, trained_block_size
    from fastblt.sampler import generate
    from fastblt.sampler.methods import REGISTRY

    if args.method not in REGISTRY:
        raise UsageError(f"--method {args.method!r} is not available; choose one of {', '.join(REGISTRY)}")
    prompts = _read_prompts(args)
    config, params = load_model(args.checkpoint)
    if args.attention_impl:
        config = config.replace(attention_impl=args.attention_impl)
    block_size = args.block_size or trained_block_size(args.checkpoint) or 4
    try:
        result = generate(
            params,
            config,
            prompts,
            method=args.method,
            max_bytes=args.max_bytes,
            buffer_bytes=args.buffer_bytes,
            draft=args.draft,
            block_size=block_size,
            **{name: getattr(args, name) for name in RULES},
            anchor=args.anchor,
            exact=args.exact,
            **({} if args.exact_width is None else {"exact_width": args.exact_width}),
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            compilation_cache=False if args.no_compilation_cache else (args.compilation_cache or True),
        )
    except ValueError as e:
        message = str(e).replace("raise buffer_bytes", "raise --buffer-bytes")
        raise UsageError(message.replace("exact_width=", "--exact-width ")) from None
    if args.json:
        decode = lambda b: b.decode("utf-8", errors="replace")  # noqa: E731
        record = {
            "method": result.method,
            "prompts": [decode(p) for p in prompts],
            "texts": [decode(t) for t in result.texts],
            "bytes_per_second": result.bytes_per_second,
            "seconds": result.seconds,
            "counters": result.counters.summary(),
        }
        print(json.dumps(record, allow_nan=False))  # strict JSON: undefined values are null
    else:
        out = sys.stdout.buffer
        for prompt, text in zip(prompts, result.texts, strict=True):
            out.write(prompt + text + b"\n")  # raw bytes: a non-UTF-8 prompt comes back as it was
        out.flush()


def _read_prompts(args: argparse.Namespace) -> list[bytes]:
    """The prompts of --prompt (UTF-8) and --prompt-file (raw bytes; '-' is standard input)."""
    prompts = [p.encode("utf-8", errors="surrogateescape") for p in args.prompt]
    for path in args.prompt_file:
        if path == "-":
            prompts.append(sys.stdin.buffer.read())
            continue
        try:
            prompts.append(Path(path).expanduser().read_bytes())
        except OSError as e:
            raise UsageError(f"--prompt-file {path}: {e.strerror or e}") from None
    if not prompts:
        raise UsageError("no prompt: pass --prompt TEXT or --prompt-file PATH (- for standard input)")
    return prompts

"""The ``fastblt`` command.

Each subcommand is one function decorated with :func:`subcommand` that adds its parser to the
subparsers and sets ``run`` (the handler, called with the parsed arguments). Handlers import what they
need (JAX, the model) inside, so that ``fastblt --help`` starts instantly. A new command is::

    @subcommand
    def _train(subparsers):
        parser = subparsers.add_parser("train", help="...")
        add_config_arguments(parser)
        parser.set_defaults(run=_run_train)

Errors in user input (a missing path, a bad config key, a malformed corpus file) print
``fastblt: error: ...`` and exit with status 2 (``--debug`` or ``FASTBLT_DEBUG=1``: with the
traceback); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fastblt import __version__
from fastblt.config import DTYPES, ConfigError
from fastblt.errors import CheckpointError, DataError, NonFiniteLossError

if TYPE_CHECKING:
    import ml_collections

DEBUG_ENV = "FASTBLT_DEBUG"
Register = Callable[[argparse._SubParsersAction], None]
_COMMANDS: list[Register] = []

# Exceptions that mean "the input is wrong", reported in one line without a traceback. ConfigError
# covers fastblt.export.ExportError, which subclasses it; CheckpointError a workdir whose
# checkpoints do not fit the config or cannot be read.
_USER_ERRORS = (
    ConfigError,
    CheckpointError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    NonFiniteLossError,  # the run diverged; the message names the step and the last good checkpoint
    DataError,  # a corpus file's content (also when a grain worker reads it: grain re-raises it)
)


class UsageError(Exception):
    """Raised by handlers for bad command-line input; printed as ``fastblt: error: ...``."""


def subcommand(register: Register) -> Register:
    """Registers a function that adds one subcommand's parser (see the module docstring)."""
    _COMMANDS.append(register)
    return register


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config SPEC`` and repeatable ``--set KEY=VALUE``, shared by every command that reads a config."""
    parser.add_argument(
        "--config",
        required=True,
        metavar="SPEC",
        help="experiment: a name in experiments/ (tiny, blt_1b) or a .py path, optionally NAME:ARG",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.encoder.n_heads=4; the ml-collections "
        "spelling --config.optimizer.lr=3e-4 works too",
    )


def load_config_from_args(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The config named by ``--config`` with the ``--set`` overrides applied and validated."""
    from fastblt.configs import load_config

    return load_config(args.config, args.overrides)


def _existing_dir(path: str, flag: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UsageError(f"{flag} {path}: no such directory")
    return p


def _writable_dst(path: str, overwrite: bool) -> Path:
    # Checked before converting, which can take minutes, rather than only when writing.
    p = Path(path).expanduser()
    if p.exists() and (not p.is_dir() or any(p.iterdir())) and not overwrite:
        raise UsageError(f"--dst {path} exists and is not empty; pass --overwrite to replace it")
    return p


# ---------------------------------------------------------------------------------------------------------
# fastblt config
# ---------------------------------------------------------------------------------------------------------


@subcommand
def _config(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config",
        help="print an experiment config after overrides and validation",
        description="Loads --config with its --set overrides, validates it and prints it.",
    )
    add_config_arguments(parser)
    parser.set_defaults(run=_run_config)


def _run_config(args: argparse.Namespace) -> None:
    print(load_config_from_args(args))


# ---------------------------------------------------------------------------------------------------------
# fastblt convert
# ---------------------------------------------------------------------------------------------------------


@subcommand
def _convert(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert between Hugging Face checkpoints and fastblt exports",
        description="Converts model weights between Hugging Face (BltForCausalLM) and fastblt exports.",
    )
    directions = parser.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    to_orbax = directions.add_parser(
        "hf-to-orbax",
        help="Hugging Face checkpoint directory -> fastblt export",
        description="Reads a Hugging Face BLT checkpoint (config.json + safetensors) and writes a fastblt export.",
    )
    to_orbax.add_argument("--src", required=True, metavar="DIR", help="Hugging Face checkpoint directory")
    to_orbax.add_argument("--dst", required=True, metavar="DIR", help="export directory to write")
    to_orbax.add_argument("--dtype", choices=DTYPES, help="cast floating-point weights (default: keep)")
    to_orbax.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    to_orbax.set_defaults(run=_run_hf_to_orbax)

    to_hf = directions.add_parser(
        "orbax-to-hf",
        help="fastblt export -> Hugging Face checkpoint directory",
        description="Reads a fastblt export and writes a Hugging Face BLT checkpoint directory.",
    )
    to_hf.add_argument("--src", required=True, metavar="DIR", help="fastblt export directory")
    to_hf.add_argument("--dst", required=True, metavar="DIR", help="Hugging Face directory to write")
    to_hf.add_argument("--overwrite", action="store_true", help="write into a non-empty --dst")
    to_hf.set_defaults(run=_run_orbax_to_hf)


def _run_hf_to_orbax(args: argparse.Namespace) -> None:
    src = _existing_dir(args.src, "--src")
    _writable_dst(args.dst, args.overwrite)
    from fastblt import convert
    from fastblt.export import param_count, save_export

    config, params = convert.from_hf(src)
    dst = save_export(args.dst, config, params, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {dst} ({param_count(params):,} parameters)")


def _run_orbax_to_hf(args: argparse.Namespace) -> None:
    src = _existing_dir(args.src, "--src")
    dst = _writable_dst(args.dst, args.overwrite)
    from fastblt import convert
    from fastblt.export import param_count
    from fastblt.loading import load_model

    config, params = load_model(src)
    convert.to_hf(config, params, dst)
    print(f"wrote {dst} ({param_count(params):,} parameters)")


@subcommand
def _train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train from an experiment config; resumes from the latest checkpoint in --workdir",
        description="Trains the config's model. An entropy-patched BLT trains its entropy model first "
        "(stage 1, in WORKDIR/entropy) unless entropy_stage.checkpoint names one, then BLT (WORKDIR/blt).",
    )
    add_config_arguments(parser)
    parser.add_argument("--workdir", required=True, help="checkpoints, TensorBoard events and logs go here")
    parser.add_argument(
        "--coordinator", help="multi-process: HOST:PORT of process 0 (or FASTBLT_COORDINATOR)"
    )
    parser.add_argument("--num-processes", type=int, help="multi-process: number of processes")
    parser.add_argument("--process-id", type=int, help="multi-process: this process's id")
    parser.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    config = load_config_from_args(args)
    from fastblt import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from fastblt.checkpoint import PREEMPTED_EXIT
    from fastblt.train import run

    result = run(config, str(Path(args.workdir).expanduser()))
    if "preempted_at_step" in result:
        raise SystemExit(PREEMPTED_EXIT)  # saved and unfinished: a scheduler requeues, not fails


@subcommand
def _preprocess(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "preprocess",
        help="write a config's corpus as a tensorstore (zarr) corpus for random access at scale",
    )
    add_config_arguments(parser)
    parser.add_argument("--dst", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing corpus at --dst")
    parser.add_argument(
        "--entropy-workdir",
        help="also store next-byte entropies from the entropy model trained in this workdir",
    )
    parser.set_defaults(run=_run_preprocess)


def _run_preprocess(args: argparse.Namespace) -> None:
    config = load_config_from_args(args)
    from fastblt.data.preprocess import preprocess

    entropy_fn = None
    if args.entropy_workdir:
        from fastblt.train import entropy_function

        entropy_fn = entropy_function(config, str(_existing_dir(args.entropy_workdir, "--entropy-workdir")))
    preprocess(config.data, args.dst, entropy_fn=entropy_fn, overwrite=args.overwrite)


@subcommand
def _export(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write an inference export (params + config.json, Orbax) from a training workdir",
    )
    parser.add_argument("--workdir", required=True, help="a BLT training workdir (or a two-stage run's root)")
    parser.add_argument("--step", type=int, help="the checkpoint step (default: the latest)")
    parser.add_argument("--dst", required=True, help="the export directory to write")
    parser.add_argument("--dtype", choices=DTYPES, help="cast floating-point parameters (e.g. bfloat16)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    parser.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    src = _existing_dir(args.workdir, "--workdir")
    _writable_dst(args.dst, args.overwrite)
    from fastblt.export import param_count, save_export
    from fastblt.loading import load_model

    config, params = load_model(src, step=args.step)
    dst = save_export(args.dst, config, params, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {dst} ({param_count(params):,} parameters)")


@subcommand
def _sample(subparsers: argparse._SubParsersAction) -> None:
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
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--alpha", type=float, help="blt_d/blt_dv: reveal cells with confidence >= A (0.7)")
    rule.add_argument("--gamma", type=float, help="blt_d: reveal cells while summed entropy <= G (nats)")
    rule.add_argument("--one-step", action="store_true", help="blt_d/blt_dv: reveal the block at once")
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
    import json

    from fastblt.loading import load_model, trained_block_size
    from fastblt.sampler import METHODS, generate

    if args.method not in METHODS:
        raise UsageError(f"--method {args.method!r} is not available; choose one of {', '.join(METHODS)}")
    prompts = _read_prompts(args)
    config, params = load_model(args.checkpoint)
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
            alpha=args.alpha,
            gamma=args.gamma,
            one_step=args.one_step,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            compilation_cache=False if args.no_compilation_cache else (args.compilation_cache or True),
        )
    except ValueError as e:
        raise UsageError(str(e).replace("raise buffer_bytes", "raise --buffer-bytes")) from None
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


@subcommand
def _eval(subparsers: argparse._SubParsersAction) -> None:
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
        help="generation settings (draft, block_size, alpha, gamma, one_step); repeatable, a grid",
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N prompts")
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        help="bytes generated per prompt (default 512 for humaneval, as the paper; 128 otherwise)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
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
    from fastblt.configs import load_config
    from fastblt.evaluation import code_completion, evaluate, humaneval, parse_settings, plan, translation
    from fastblt.loading import load_model

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit {args.limit}: must be >= 1")
    if args.max_bytes is None:
        args.max_bytes = 512 if args.task == "humaneval" else 128
    if args.max_bytes < 1 or args.batch_size < 1:
        raise UsageError("--max-bytes and --batch-size must be >= 1")
    settings = parse_settings(args.setting)
    plan(args.method, settings)  # a bad method fails before anything loads
    config, params = load_model(args.checkpoint)
    max_prompt = config.max_bytes - args.max_bytes - 2  # BOS, and one byte of room
    if max_prompt < 1:
        raise UsageError(f"--max-bytes {args.max_bytes} leaves no room for a prompt in model.max_bytes")
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
    )
    if args.out:
        print(Path(args.out, "results.md").read_text())


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


# ---------------------------------------------------------------------------------------------------------
# fastblt launch / sweep / compile: scaling out (fastblt/launch/, fastblt/sweep.py, fastblt/aot.py)
# ---------------------------------------------------------------------------------------------------------

_LAUNCH_TARGETS = {
    "tpu": "a Cloud TPU VM slice through gcloud (queued resources, install, preemption restarts)",
    "xpk": "a GKE TPU cluster through xpk (xpk workload create)",
    "slurm": "a SLURM GPU cluster: render launch/slurm.sbatch (one task per GPU) and sbatch it",
}


def _launch_failed(e: Exception) -> SystemExit:
    """A launch that ran and failed: its report on stderr, exit status 1."""
    return SystemExit(f"fastblt: error: {e}")


@subcommand
def _launch(subparsers: argparse._SubParsersAction) -> None:
    from fastblt.launch import options

    parser = subparsers.add_parser(
        "launch",
        help="run `fastblt train` on every host of a TPU slice (gcloud), GKE (xpk) or SLURM",
        description="Starts the same `fastblt train` on every host through the cluster's own tools; "
        "jax.distributed connects them. --dry-run prints the exact commands instead.",
    )
    targets = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    adders = {
        "tpu": options.add_tpu_arguments,
        "xpk": options.add_xpk_arguments,
        "slurm": options.add_slurm_arguments,
    }
    for name, help_text in _LAUNCH_TARGETS.items():
        p = targets.add_parser(name, help=help_text, description=f"Trains on {help_text}.")
        add_config_arguments(p)
        p.add_argument("--workdir", required=True, help="shared by every host and kept across restarts")
        p.add_argument("--dry-run", action="store_true", help="print the commands; run and write nothing")
        adders[name](p)
        if name == "slurm":
            p.add_argument("--script", help="where to write the batch script (default: ./<job-name>.sbatch)")
        p.set_defaults(run=_run_launch)


def _run_launch(args: argparse.Namespace) -> None:
    from fastblt.launch import options
    from fastblt.launch.common import LaunchError, Runner, TrainJob, repo_root

    job = TrainJob(args.config, args.workdir, tuple(args.overrides))
    runner = Runner(args.dry_run)
    try:
        root = repo_root()
        if args.target == "tpu":
            from fastblt.launch.tpu import launch_tpu

            launch_tpu(job, options.tpu_options(args), runner, root)
        elif args.target == "xpk":
            from fastblt.launch.xpk import launch_xpk

            launch_xpk(job, options.xpk_options(args), runner, root)
        else:
            from fastblt.launch.slurm import launch_slurm

            script = args.script or f"{args.job_name}.sbatch"
            launch_slurm(job, options.slurm_options(args), runner, root, script)
    except ValueError as e:
        raise UsageError(str(e)) from None
    except LaunchError as e:
        raise _launch_failed(e) from None


@subcommand
def _sweep(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="train every run of an experiment's get_sweep() and tabulate the results",
        description="Expands the experiment's get_sweep() (fastblt/sweep.py), trains each run in "
        "WORKDIR/<run name> (finished runs are skipped, unfinished ones resume) and prints a table of "
        "overrides and final metrics. Launcher options (tpu, slurm) follow `--`, as for `fastblt launch`.",
    )
    add_config_arguments(parser)
    parser.add_argument("--workdir", required=True, help="the sweep's root: one subdirectory per run")
    parser.add_argument("--launcher", choices=["local", "tpu", "slurm"], default="local")
    parser.add_argument("--parallel", type=int, default=1, help="local: runs trained at once (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands; train nothing")
    parser.add_argument(
        "launcher_args",
        nargs=argparse.REMAINDER,
        metavar="-- LAUNCHER OPTIONS",
        help="tpu: --tpu --zone --accelerator ...; slurm: --nodes --gpus-per-node ... (see fastblt launch)",
    )
    parser.set_defaults(run=_run_sweep)


def _sweep_remote(args: argparse.Namespace, runs: list, root_dir: str) -> None:
    """Runs a sweep's runs one by one through the TPU launcher, or submits one SLURM job each."""
    import os
    import re

    from fastblt.launch import options
    from fastblt.launch.common import LaunchError, Runner, TrainJob, repo_root
    from fastblt.launch.slurm import launch_slurm
    from fastblt.launch.tpu import launch_tpu

    extra = list(args.launcher_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    sub = argparse.ArgumentParser(prog=f"fastblt sweep --launcher {args.launcher} --")
    if args.launcher == "tpu":
        options.add_tpu_arguments(sub)
    else:
        options.add_slurm_arguments(sub)
    largs = sub.parse_args(extra)
    runner = Runner(args.dry_run)
    try:
        root = repo_root()
        for run in runs:
            job = TrainJob(args.config, run.workdir, (*args.overrides, *run.override_args()))
            print(f"[sweep] {run.name}: {run.workdir}", flush=True)
            try:
                if args.launcher == "tpu":
                    launch_tpu(job, options.tpu_options(largs), runner, root)
                    run.status = "dry-run" if args.dry_run else "done"
                else:
                    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{largs.job_name}-{run.name}")
                    script = os.path.join(run.workdir, "slurm", "job.sbatch")
                    launch_slurm(job, options.slurm_options(largs, job_name=name), runner, root, script)
                    run.status = "dry-run" if args.dry_run else "submitted"
            except LaunchError as e:
                run.status, run.detail = "failed", str(e)
                print(f"[sweep] {run.name}: FAILED: {e}", flush=True)
    except ValueError as e:
        raise UsageError(str(e)) from None
    except LaunchError as e:
        raise _launch_failed(e) from None


def _run_sweep(args: argparse.Namespace) -> None:
    import os

    from fastblt import sweep

    is_local_root = "://" not in args.workdir
    root_dir = os.path.abspath(os.path.expanduser(args.workdir)) if is_local_root else args.workdir
    runs = sweep.expand(args.config, root_dir, args.overrides)
    print(f"[sweep] {len(runs)} runs of {args.config} under {root_dir}", flush=True)
    if args.launcher == "local":
        if args.launcher_args:
            raise UsageError(f"the local launcher takes no options after --: {' '.join(args.launcher_args)}")
        try:
            sweep.run_local(args.config, runs, args.overrides, parallel=args.parallel, dry_run=args.dry_run)
        except ValueError as e:
            raise UsageError(str(e)) from None
    else:
        if args.parallel != 1:
            raise UsageError(
                "--parallel is for the local launcher: TPU runs share one slice and SLURM runs are separate jobs"
            )
        _sweep_remote(args, runs, root_dir)
    print(sweep.table(runs))
    if is_local_root and not args.dry_run:
        print(f"[sweep] results: {sweep.write_summary(root_dir, runs)}")
    failed = [r.name for r in runs if r.status == "failed"]
    if failed:
        raise SystemExit(f"fastblt: error: {len(failed)} run(s) failed: {', '.join(failed)}")


@subcommand
def _compile(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compile",
        help="compile the sharded train step for a TPU topology (no TPU needed) and report memory per chip",
        description="Builds the train step of `fastblt train` over the topology's devices, compiles it "
        "ahead of time and prints XLA's memory analysis per device. TPU topologies (v5p-128, v4-32, "
        "v5litepod-16, v6e-256, v5p:4x4x8) need the libtpu package; cpu:N compiles for local CPU devices.",
    )
    add_config_arguments(parser)
    parser.add_argument("--topology", required=True, help="e.g. v5p-128 or cpu:8")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=_run_compile)


def _run_compile(args: argparse.Namespace) -> None:
    import dataclasses
    import json
    import re

    config = load_config_from_args(args)
    cpu = re.fullmatch(r"cpu:(\d+)", args.topology.strip().lower())
    if cpu:
        import jax

        try:  # give this process the CPU devices asked for (only possible before JAX starts)
            jax.config.update("jax_num_cpu_devices", int(cpu.group(1)))
        except RuntimeError:
            pass
    from fastblt.aot import compile_train_step

    report = compile_train_step(config, args.topology)
    if args.json:
        print(json.dumps(dict(dataclasses.asdict(report), total_bytes=report.total_bytes)))
    else:
        print("\n".join(report.lines()))


# ---------------------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``fastblt`` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="fastblt", description="Train and serve Byte Latent Transformers.")
    parser.add_argument("--version", action="version", version=f"fastblt {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback of input errors too (or set {DEBUG_ENV}=1)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _COMMANDS:
        register(subparsers)
    return parser


def config_flag_overrides(argv: Sequence[str]) -> list[str]:
    """Rewrites ml-collections style ``--config.a.b=v`` / ``--config.a.b v`` into ``--set a.b=v``."""
    out: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--config.") and len(item) > len("--config."):
            key, eq, value = item[len("--config.") :].partition("=")
            if not eq:
                if i + 1 >= len(items):
                    raise SystemExit(f"fastblt: error: {item} needs a value (--config.{key}=VALUE)")
                i += 1
                value = items[i]
            out += ["--set", f"{key}={value}"]
        else:
            out.append(item)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command in ``argv`` (default: ``sys.argv[1:]``); returns 0, or exits 2 on bad input."""
    parser = build_parser()
    args = parser.parse_args(config_flag_overrides(sys.argv[1:] if argv is None else argv))
    try:
        args.run(args)
    except (UsageError, *_USER_ERRORS) as e:
        if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        parser.exit(2, f"fastblt: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

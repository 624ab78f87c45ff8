"""Sweeps: the grid helpers, stable run names, and a real local sweep of two tiny runs that is run
again to check that finished runs are skipped and an interrupted one resumes."""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from pathlib import Path

import pytest
from train_utils import SMALL_MODEL

from fastblt import cli
from fastblt.config import ConfigError
from fastblt.launch import sweep

REPO = Path(__file__).resolve().parent.parent


def test_product_zip_and_sweep():
    lrs = sweep.sweep("optimizer.lr", [1e-3, 3e-3])
    seeds = sweep.sweep("seed", [0, 1, 2])
    assert lrs == [{"optimizer.lr": 1e-3}, {"optimizer.lr": 3e-3}]
    assert sweep.product(lrs, seeds) == [
        {"optimizer.lr": lr, "seed": s} for lr in (1e-3, 3e-3) for s in (0, 1, 2)
    ]
    steps = sweep.sweep("train.steps", [10, 20])
    assert sweep.zip(lrs, steps) == [
        {"optimizer.lr": 1e-3, "train.steps": 10},
        {"optimizer.lr": 3e-3, "train.steps": 20},
    ]
    # Nesting: zipped pairs crossed with seeds.
    assert len(sweep.product(sweep.zip(lrs, steps), seeds)) == 6


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: sweep.zip(sweep.sweep("a", [1, 2]), sweep.sweep("b", [1])), "one length"),
        (lambda: sweep.product(sweep.sweep("a", [1]), sweep.sweep("a", [2])), "set twice"),
        (lambda: sweep.sweep("a", []), "non-empty"),
        (lambda: sweep.product({"a": 1}), "lists of override dicts"),
    ],
)
def test_sweep_helpers_reject_bad_grids(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_run_names_are_stable_and_unambiguous():
    assert sweep.run_name({"optimizer.lr": 0.001, "seed": 0}) == "lr=0.001,seed=0"
    assert sweep.run_name({"optimizer.lr": 3e-05}) == "lr=3e-05"
    keys = ["model.encoder.dim", "model.decoder.dim"]
    assert sweep.run_name({"model.encoder.dim": 64, "model.decoder.dim": 32}, keys) == (
        "model.encoder.dim=64,model.decoder.dim=32"
    )
    assert sweep.run_name({"data.paths": "/a b/*.txt"}) == "paths=_a_b__.txt"
    long = {f"k{i}": "x" * 20 for i in range(10)}
    name = sweep.run_name(long)
    assert len(name) == 111 and name == sweep.run_name(dict(long))


def test_tiny_sweep_expands_to_lr_times_seed(tmp_path):
    runs = sweep.expand("tiny_sweep", str(tmp_path))
    assert [r.name for r in runs] == [
        "lr=0.001,seed=0",
        "lr=0.001,seed=1",
        "lr=0.003,seed=0",
        "lr=0.003,seed=1",
    ]
    assert runs[2].workdir == str(tmp_path / "lr=0.003,seed=0")
    assert runs[2].override_args() == ["optimizer.lr=0.003", "seed=0"]


def _experiment(tmp_path, grid: str) -> str:
    path = tmp_path / "sweep_exp.py"
    path.write_text(
        textwrap.dedent(
            f"""\
            from experiments import tiny
            from fastblt.launch.sweep import product, sweep

            def get_config():
                return tiny.get_config("patching=static")

            def get_sweep():
                return {grid}
            """
        )
    )
    return str(path)


def test_a_bad_run_fails_before_anything_trains(tmp_path):
    spec = _experiment(tmp_path, 'sweep("optimizer.lr", [1e-3]) + sweep("optimizer.nope", [1])')
    with pytest.raises(ConfigError, match=r"sweep run nope=1: unknown config key optimizer.nope"):
        sweep.expand(spec, str(tmp_path / "root"))
    assert not (tmp_path / "root").exists()


def test_read_metrics_keeps_the_last_value_of_each_scalar(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 2, "loss": 3.0}\n{"step": 4, "loss": 2.5}\n{"step": 4, "eval_loss": 2.7}\n{"st')
    assert sweep.read_metrics(f) == {"step": 4, "loss": 2.5, "eval_loss": 2.7}
    assert sweep.read_metrics(tmp_path / "missing.jsonl") == {}


SWEEP_SETTINGS = [
    *(o for o in SMALL_MODEL if not o.startswith("model.entropy_model")),
    "train.steps=4",
    "checkpoint.save_every=2",
    "train.sample_bytes=0",
]


def _sweep_cli(spec: str, root: Path, *extra: str) -> list[str]:
    args = ["sweep", "--config", spec, "--workdir", str(root), *extra]
    for o in SWEEP_SETTINGS:
        args += ["--set", o]
    assert cli.main(args) == 0
    return args


@pytest.mark.slow
def test_local_sweep_trains_skips_finished_and_resumes_unfinished(tmp_path, capsys):
    spec = _experiment(tmp_path, 'sweep("optimizer.lr", [1e-3, 3e-3])')
    root = tmp_path / "root"
    _sweep_cli(spec, root, "--parallel", "2")
    out = capsys.readouterr().out
    a, b = root / "lr=0.001", root / "lr=0.003"
    for run in (a, b):
        assert (run / "checkpoints" / "4").is_dir(), (run / "train.log").read_text()[-3000:]
    summary = {r["name"]: r for r in json.loads((root / "sweep.json").read_text())}
    assert {r["status"] for r in summary.values()} == {"done"}
    for name, run in (("lr=0.001", a), ("lr=0.003", b)):
        lines = [json.loads(x) for x in (run / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
        last = [x for x in lines if "loss" in x][-1]
        assert summary[name]["metrics"]["loss"] == last["loss"] and last["step"] == 4
        assert math.isfinite(last["loss"])
    table = out[out.index("run ") :].splitlines()
    assert table[0].split() == [
        "run",
        "optimizer.lr",
        "status",
        "step",
        "loss",
        "bits_per_byte",
        "eval_bits_per_byte",
    ]
    assert table[2].split()[:4] == ["lr=0.001", "0.001", "done", "4"]
    assert table[3].split()[:4] == ["lr=0.003", "0.003", "done", "4"]
    # Different learning rates trained different models.
    assert summary["lr=0.001"]["metrics"]["loss"] != summary["lr=0.003"]["metrics"]["loss"]

    # Interrupt run b after step 2: its last checkpoint is gone. Run the sweep again.
    shutil.rmtree(b / "checkpoints" / "4")
    log_a = (a / "train.log").read_text()
    _sweep_cli(spec, root)
    out = capsys.readouterr().out
    assert "[sweep] lr=0.001: finished before, skipping" in out
    assert (a / "train.log").read_text() == log_a  # not trained again
    assert "resumed blt from step 2" in (b / "train.log").read_text()
    assert (b / "checkpoints" / "4").is_dir()
    summary = {r["name"]: r for r in json.loads((root / "sweep.json").read_text())}
    assert summary["lr=0.001"]["status"] == "skipped" and summary["lr=0.003"]["status"] == "done"


def test_a_failing_run_is_reported_with_its_log(tmp_path, capsys):
    spec = _experiment(tmp_path, 'sweep("data.source", ["text"])')
    with pytest.raises(SystemExit) as exc:
        _sweep_cli(spec, tmp_path / "root", "--set", "data.paths='/nonexistent/*.txt'")
    assert "1 run(s) failed: source=text" in str(exc.value.code)
    out = capsys.readouterr().out
    assert "[sweep] source=text: FAILED with exit status 2" in out
    assert "/nonexistent" in out  # the tail of the run's log says why


def test_sweep_dry_runs_print_each_runs_commands(tmp_path, capsys):
    root = tmp_path / "root"
    assert cli.main(["sweep", "--config", "tiny_sweep", "--workdir", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("$ ")]
    assert len(commands) == 4
    assert commands[1].endswith(
        f"-m fastblt.cli train --config tiny_sweep --workdir {root}/lr=0.001,seed=1 --set optimizer.lr=0.001 "
        f"--set seed=1 >> {root}/lr=0.001,seed=1/train.log 2>&1"
    )
    assert not root.exists()

    argv = ["sweep", "--config", "tiny_sweep", "--workdir", "/shared/sw", "--launcher", "slurm", "--dry-run"]
    assert cli.main([*argv, "--", "--nodes", "2", "--venv", ""]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("$ sbatch")] == [
        f"$ sbatch /shared/sw/{name}/slurm/job.sbatch"
        for name in ("lr=0.001,seed=0", "lr=0.001,seed=1", "lr=0.003,seed=0", "lr=0.003,seed=1")
    ]
    assert "#SBATCH --job-name=fastblt-lr_0.003_seed_1" in out
    assert "--set optimizer.lr=0.003 --set seed=1" in out

    with pytest.raises(SystemExit) as exc:
        cli.main([*argv[:-3], "--launcher", "tpu", "--parallel", "2"])
    assert exc.value.code == 2

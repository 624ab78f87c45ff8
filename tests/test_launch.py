"""Launchers: exact dry-run commands, the worker wrapper, the SLURM script and the TPU restart loop.

Nothing here touches the network: dry runs print, and the "real" runs find fake ``gcloud``, ``tar``,
``srun``, ``scontrol`` and ``fastblt`` executables first on PATH, which record their arguments and
act out a scenario (a preempted slice, a failing worker).
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastblt import cli
from fastblt.config import ConfigError
from fastblt.launch import accelerators
from fastblt.launch.common import (
    LaunchError,
    Runner,
    TrainJob,
    parse_worker_exits,
    repo_root,
    worker_report,
)
from fastblt.launch.slurm import SlurmOptions, render
from fastblt.launch.tpu import TpuOptions, launch_tpu

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "launch" / "worker.sh"
TAR = (
    f"tar -czf /tmp/fastblt-src.tar.gz --exclude=.git --exclude=.venv --exclude=venv --exclude=.jax_cache "
    f"--exclude=__pycache__ '--exclude=*.egg-info' --exclude=.pytest_cache -C {REPO} ."
)


def _dry(capsys, *argv: str) -> list[str]:
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out.splitlines()


# ---------------------------------------------------------------------------------------------------------
# Slice names. Oracle: Cloud TPU's published slice facts (v5p-128 = 64 chips on 16 VMs, 4x4x4).
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, chips, hosts, topology, wrap, runtime",
    [
        ("v5p-128", 64, 16, "v5p:4x4x4", (True, True, True), "v2-alpha-tpuv5"),
        ("v5p-8", 4, 1, "v5p:2x2x1", (False, False, False), "v2-alpha-tpuv5"),
        ("v4-32", 16, 4, "v4:2x2x4", (False, False, False), "tpu-ubuntu2204-base"),
        ("v4-256", 128, 32, "v4:4x4x8", (True, True, True), "tpu-ubuntu2204-base"),
        ("v5litepod-8", 8, 1, "v5e:2x4", (False, False, False), "v2-alpha-tpuv5-lite"),
        ("v5litepod-16", 16, 4, "v5e:4x4", (False, False, False), "v2-alpha-tpuv5-lite"),
        ("v6e-256", 256, 64, "v6e:16x16", (True, True, False), "v2-alpha-tpuv6e"),
        ("v5p:4x4x12", 192, 48, "v5p:4x4x12", (True, True, True), "v2-alpha-tpuv5"),
    ],
)
def test_tpu_slice_names(name, chips, hosts, topology, wrap, runtime):
    s = accelerators.parse_tpu(name)
    assert (s.chips, s.hosts, s.topology, s.wrap, s.runtime_version) == (
        chips,
        hosts,
        topology,
        wrap,
        runtime,
    )


@pytest.mark.parametrize("bad", ["v5p-7", "v5p-96", "v9-8", "tpu", "v5p:4x4"])
def test_tpu_slice_names_reject_bad_input(bad):
    with pytest.raises(ValueError, match=r"v5p|generation|standard|form|dimensions"):
        accelerators.parse_tpu(bad)


# ---------------------------------------------------------------------------------------------------------
# Dry runs: the exact commands for a sample config.
# ---------------------------------------------------------------------------------------------------------


def test_tpu_dry_run_prints_the_exact_commands(capsys):
    out = _dry(
        capsys,
        *("launch", "tpu", "--config", "tiny", "--set", "optimizer.lr=0.001", "--workdir", "gs://bkt/run"),
        *(
            "--tpu",
            "pod",
            "--zone",
            "us-east5-a",
            "--accelerator",
            "v5p-16",
            "--project",
            "proj",
            "--dry-run",
        ),
    )
    scope = "--zone=us-east5-a --project=proj"
    train = (
        "cd ~/fastblt/src && FASTBLT_DISTRIBUTED=auto bash launch/worker.sh ~/fastblt/logs -- "
        "~/fastblt/venv/bin/fastblt train --config tiny --workdir gs://bkt/run --set optimizer.lr=0.001"
    )
    install = (
        "set -e && rm -rf ~/fastblt/src && mkdir -p ~/fastblt/src && tar -xzf ~/fastblt-src.tar.gz -C "
        "~/fastblt/src && (test -x ~/fastblt/venv/bin/python || python3 -m venv ~/fastblt/venv) && "
        '~/fastblt/venv/bin/pip install -q -e ~/fastblt/src "jax[tpu]" "gcsfs"'
    )
    status = (
        "cd ~/fastblt/src && ~/fastblt/venv/bin/python -m fastblt.launch.status --config tiny "
        "--workdir gs://bkt/run --set optimizer.lr=0.001"
    )
    commands = [line[2:] for line in out if line.startswith("$ ")]
    assert commands == [
        f"gcloud compute tpus tpu-vm describe pod '--format=value(state,acceleratorType)' {scope}",
        f"gcloud compute tpus tpu-vm create pod --accelerator-type=v5p-16 --version=v2-alpha-tpuv5 {scope}",
        TAR,
        f"gcloud compute tpus tpu-vm scp /tmp/fastblt-src.tar.gz 'pod:~/fastblt-src.tar.gz' --worker=all {scope}",
        f"gcloud compute tpus tpu-vm ssh pod --worker=all '--command={install}' {scope}",
        f"gcloud compute tpus tpu-vm ssh pod --worker=all '--command={train}' {scope}",
        f"gcloud compute tpus tpu-vm ssh pod --worker=0 '--command={status}' {scope}",
    ]
    assert out[0] == "# v5p-16: 8 chips on 2 host(s), topology v5p:2x2x2"


def test_tpu_dry_run_queued_resource_and_spot(capsys):
    out = _dry(
        capsys,
        *("launch", "tpu", "--config", "tiny", "--workdir", "gs://bkt/run", "--tpu", "pod", "--zone", "z"),
        *("--accelerator", "v4-8", "--queued", "--spot", "--dry-run"),
    )
    commands = [line[2:] for line in out if line.startswith("$ ")]
    assert commands[:2] == [
        "gcloud compute tpus queued-resources describe pod '--format=value(state.state)' --zone=z",
        "gcloud compute tpus queued-resources create pod --node-id=pod --accelerator-type=v4-8 "
        "--runtime-version=tpu-ubuntu2204-base --zone=z --spot",
    ]
    assert "tpu-vm create" not in "\n".join(commands)


def test_xpk_dry_run_prints_the_exact_commands(capsys):
    out = _dry(
        capsys,
        *("launch", "xpk", "--config", "blt_1b", "--workdir", "gs://bkt/blt1b", "--cluster", "c1"),
        *("--workload", "blt1b", "--tpu-type", "v5p-128", "--zone", "us-east5-a", "--project", "proj"),
        *("--set", "data.batch_size=64", "--dry-run"),
    )
    scope = "--cluster=c1 --project=proj --zone=us-east5-a"
    command = (
        'pip install -q -e . "jax[tpu]" "gcsfs" && FASTBLT_DISTRIBUTED=auto bash launch/worker.sh /tmp/fastblt-logs '
        "-- fastblt train --config blt_1b --workdir gs://bkt/blt1b --set data.batch_size=64"
    )
    assert out == [
        f"$ xpk workload create {scope} --workload=blt1b --tpu-type=v5p-128 --num-slices=1 --max-restarts=20 "
        f"--script-dir={REPO} '--command={command}'",
        f"$ xpk workload list {scope} --wait-for-job-completion=blt1b",
    ]


def test_xpk_multislice_numbers_workers_across_slices(capsys):
    out = _dry(
        capsys,
        *("launch", "xpk", "--config", "tiny", "--workdir", "gs://b/r", "--cluster", "c", "--workload", "w"),
        *("--tpu-type", "v5p-16", "--num-slices", "2", "--docker-image", "gcr.io/p/fastblt:1", "--dry-run"),
    )
    assert (
        "'--command=FASTBLT_WORKER_ID=$((${MEGASCALE_SLICE_ID:-0} * 2 + ${TPU_WORKER_ID:-0})) "
        "FASTBLT_DISTRIBUTED=auto bash launch/worker.sh /tmp/fastblt-logs -- fastblt train --config tiny "
        "--workdir gs://b/r'" in out[0]
    )
    assert "--docker-image=gcr.io/p/fastblt:1" in out[0] and "--script-dir" not in out[0]


def test_slurm_dry_run_renders_the_script_and_sbatch(capsys):
    out = _dry(
        capsys,
        *("launch", "slurm", "--config", "tiny", "--workdir", "/shared/run", "--nodes", "2"),
        *(
            "--gpus-per-node",
            "4",
            "--partition",
            "gpu",
            "--venv",
            "/opt/venv",
            "--script",
            "/shared/job.sbatch",
        ),
        "--dry-run",
    )
    text = "\n".join(out)
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --output=/shared/run/slurm/%x-%j.out",
        "#SBATCH --requeue",
        f"cd {REPO}",
        "source /opt/venv/bin/activate",
        "export FASTBLT_DISTRIBUTED=auto",
        'srun --kill-on-bad-exit=1 --cpus-per-task=8 bash launch/worker.sh "$LOGDIR" -- fastblt train '
        "--config tiny --workdir /shared/run",
        "if ! python -m fastblt.launch.status --config tiny --workdir /shared/run; then",
    ]:
        assert line in out, line
    assert "{{" not in text
    assert out[-2:] == ["$ mkdir -p /shared/run/slurm", "$ sbatch /shared/job.sbatch"]
    assert not Path("/shared/job.sbatch").exists()


def test_slurm_explicit_coordinator_from_first_node():
    job = TrainJob("tiny", "/shared/run")
    text = render(job, SlurmOptions(coordinator_port=12345, venv=""), REPO)
    assert (
        'export FASTBLT_COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):12345"'
        in text
    )
    assert 'export FASTBLT_NUM_PROCESSES="$SLURM_NTASKS"' in text
    assert "export FASTBLT_PROCESS_ID=$SLURM_PROCID CUDA_VISIBLE_DEVICES=$SLURM_LOCALID" in text
    assert "FASTBLT_DISTRIBUTED" not in text.split("set -uo pipefail")[1]


def test_launchers_check_input_before_running_anything(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(
            ["launch", "tpu", "--config", "tiny", "--set", "optimizer.nope=1", "--workdir", "gs://b/r"]
            + ["--tpu", "t", "--zone", "z", "--accelerator", "v5p-8", "--dry-run"]
        )
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "optimizer.nope" in captured.err and "$ " not in captured.out
    with pytest.raises(SystemExit) as exc:
        cli.main(
            ["launch", "tpu", "--config", "tiny", "--workdir", "runs/x", "--tpu", "t", "--zone", "z"]
            + ["--accelerator", "v5p-8", "--dry-run"]
        )
    # SystemExit with a message: Python prints it to stderr and exits with status 1.
    assert "gs://BUCKET/PATH" in str(exc.value.code) and "$ " not in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(
            ["launch", "tpu", "--config", "tiny", "--workdir", "gs://b/r", "--tpu", "t", "--zone", "z"]
            + ["--accelerator", "v5p-9", "--dry-run"]
        )
    assert exc.value.code == 2 and "v5p-9" in capsys.readouterr().err
    with pytest.raises(LaunchError, match="outside the checkout"):
        TrainJob("/elsewhere/exp.py", "gs://b/r").train_argv(repo_root())


# ---------------------------------------------------------------------------------------------------------
# The worker wrapper (launch/worker.sh), run for real.
# ---------------------------------------------------------------------------------------------------------


def _worker(tmp_path, worker_id: str | None, *command: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_PROCID", "TPU_WORKER_ID")}
    env["PATH"] = "/usr/bin:/bin"
    if worker_id is not None:
        env["FASTBLT_WORKER_ID"] = worker_id
    return subprocess.run(
        ["bash", str(WORKER), str(tmp_path / "logs"), "--", *command],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_worker_wrapper_streams_worker_zero_and_reports_exit(tmp_path):
    p = _worker(tmp_path, "0", "sh", "-c", "echo step 1; echo step 2")
    assert p.returncode == 0
    assert p.stdout.splitlines()[:2] == ["step 1", "step 2"]
    assert p.stdout.splitlines()[-1].startswith("FASTBLT_WORKER_EXIT worker=0 host=")
    assert p.stdout.splitlines()[-1].endswith(" rc=0")
    assert (tmp_path / "logs" / "worker-0.rc").read_text().strip() == "0"
    assert "step 2" in (tmp_path / "logs" / "worker-0.log").read_text()


def test_worker_wrapper_names_a_failing_worker_with_its_log_tail(tmp_path):
    p = _worker(tmp_path, "3", "sh", "-c", "echo quiet; echo boom >&2; exit 7")
    assert p.returncode == 7
    lines = p.stdout.splitlines()
    # Not streamed (only worker 0 streams), but the tail of its log is shown.
    assert lines[0].startswith("[worker 3] == ") and lines[1:3] == ["[worker 3] quiet", "[worker 3] boom"]
    exits = parse_worker_exits(lines)
    assert list(exits) == ["3"] and exits["3"][1] == 7
    assert (tmp_path / "logs" / "worker-3.rc").read_text().strip() == "7"
    report = worker_report(exits, 4)
    assert report[0].startswith("worker 3 (") and report[0].endswith("exited with status 7")
    assert [r.split(" reported")[0] for r in report[1:]] == ["worker 0", "worker 1", "worker 2"]


def test_worker_wrapper_id_from_slurm_and_usage(tmp_path):
    env = dict(os.environ, SLURM_PROCID="5", PATH="/usr/bin:/bin")
    env.pop("FASTBLT_WORKER_ID", None)
    p = subprocess.run(
        ["bash", str(WORKER), str(tmp_path), "--", "true"], capture_output=True, text=True, env=env
    )
    assert "FASTBLT_WORKER_EXIT worker=5 " in p.stdout
    p = subprocess.run(["bash", str(WORKER), str(tmp_path), "true"], capture_output=True, text=True)
    assert p.returncode == 2 and "usage" in p.stderr


# ---------------------------------------------------------------------------------------------------------
# The rendered SLURM script, run with fake srun / scontrol / fastblt.
# ---------------------------------------------------------------------------------------------------------


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run_slurm_script(tmp_path, fail_rank: int | None, ntasks: int = 3) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    # srun: run the tasks one after another with their SLURM rank, like srun runs them side by side.
    _executable(
        bin_dir / "srun",
        f'#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nrc=0\n'
        f'for ((i = 0; i < {ntasks}; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" || rc=1; done\nexit $rc\n',
    )
    _executable(bin_dir / "scontrol", f'#!/bin/bash\necho "scontrol $*" >> {calls}\n')
    fail = (
        f'[ "$SLURM_PROCID" = "{fail_rank}" ] && {{ echo "nan loss" >&2; exit 3; }}\n'
        if fail_rank is not None
        else ""
    )
    _executable(bin_dir / "fastblt", f"#!/bin/bash\n{fail}echo trained $SLURM_PROCID\n")
    workdir = tmp_path / "run"
    script = render(TrainJob("tiny", str(workdir), ("train.steps=4",)), SlurmOptions(venv=""), REPO)
    (tmp_path / "job.sbatch").write_text(script)
    env = dict(
        os.environ,
        PATH=os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), "/usr/bin", "/bin"]),
        PYTHONPATH=str(REPO),
        SLURM_JOB_ID="77",
        SLURM_NTASKS=str(ntasks),
        SLURM_JOB_NODELIST="node[1-3]",
    )
    env.pop("FASTBLT_WORKER_ID", None)
    return subprocess.run(
        ["bash", str(tmp_path / "job.sbatch")], capture_output=True, text=True, env=env, timeout=120
    )


def test_slurm_script_names_the_failed_rank(tmp_path):
    p = _run_slurm_script(tmp_path, fail_rank=1)
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"fastblt: worker 1 exited with status 3; log: {tmp_path}/run/slurm/77/worker-1.log" in p.stdout
    assert "worker 0 exited" not in p.stdout and "worker 2 exited" not in p.stdout
    assert "nan loss" in (tmp_path / "run" / "slurm" / "77" / "worker-1.log").read_text()
    assert not (tmp_path / "calls").exists()  # a failed run is not requeued


def test_slurm_script_requeues_an_unfinished_run(tmp_path):
    p = _run_slurm_script(tmp_path, fail_rank=None)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "trained 0" in p.stdout and "trained 1" not in p.stdout  # only rank 0 streams
    assert "not finished" in p.stdout
    assert (tmp_path / "calls").read_text() == "scontrol requeue 77\n"


# ---------------------------------------------------------------------------------------------------------
# The TPU launcher's loop, run for real against a fake gcloud.
# ---------------------------------------------------------------------------------------------------------

FAKE_GCLOUD = textwrap.dedent(
    """\
    #!{python}
    # A stand-in for gcloud: records each call and plays the scenario in $FAKE_STATE.
    import json, os, sys
    path = os.environ["FAKE_STATE"]
    state = json.load(open(path))
    args = sys.argv[1:]
    state["calls"].append(" ".join(args))
    rc = 0
    if args[:3] == ["compute", "tpus", "tpu-vm"]:
        verb = args[3]
        if verb == "describe":
            if state["vm"] is None:
                rc = 1
            else:
                print(state["vm"] + "\\t" + state["type"])
        elif verb == "create":
            state["vm"] = "READY"
        elif verb == "delete":
            state["vm"] = None
        elif verb == "ssh":
            command = [a for a in args if a.startswith("--command=")][0]
            if "fastblt.launch.status" in command:
                rc = 0 if state["finished"] else 1
            elif "worker.sh" in command:
                attempt = state["attempts"].pop(0)
                for worker, code in enumerate(attempt["rcs"]):
                    if code is not None:
                        print(f"FASTBLT_WORKER_EXIT worker={{worker}} host=t1v-w-{{worker}} rc={{code}}")
                if attempt.get("then"):
                    state["vm"] = attempt["then"]
                state["finished"] = attempt.get("finished", False)
                rc = 255 if None in attempt["rcs"] else max(attempt["rcs"])
    json.dump(state, open(path, "w"))
    sys.exit(rc)
    """
)


def _fake_cloud(tmp_path, monkeypatch, scenario: dict) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
    _executable(bin_dir / "tar", "#!/bin/sh\nexit 0\n")
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"calls": [], "type": "v5p-16", "finished": False, **scenario}))
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), os.environ["PATH"]]))
    monkeypatch.setenv("FAKE_STATE", str(state))
    return state


def _opts() -> TpuOptions:
    return TpuOptions(name="pod", zone="z", slice=accelerators.parse_tpu("v5p-16"), poll_seconds=0)


def test_tpu_launcher_restarts_after_preemption(tmp_path, monkeypatch):
    state = _fake_cloud(
        tmp_path,
        monkeypatch,
        {
            "vm": None,
            "attempts": [
                {"rcs": [0, None], "then": "PREEMPTED"},  # worker 1's VM went away mid-run
                {"rcs": [0, 0], "finished": True},
            ],
        },
    )
    out = io.StringIO()
    launch_tpu(TrainJob("tiny", "gs://b/r"), _opts(), Runner(False, out=out), REPO)
    verbs = [
        " ".join(c.split()[3:5]) if c.startswith("compute") else c
        for c in json.loads(state.read_text())["calls"]
    ]
    assert verbs == [
        "describe pod",
        "create pod",
        "scp /tmp/fastblt-src.tar.gz",
        "ssh pod",  # provision + install
        "ssh pod",  # attempt 1: preempted
        "describe pod",  # PREEMPTED: not alive
        "describe pod",
        "delete pod",
        "create pod",
        "scp /tmp/fastblt-src.tar.gz",
        "ssh pod",  # again
        "ssh pod",  # attempt 2
        "ssh pod",  # status on worker 0: finished
    ]
    text = out.getvalue()
    assert "worker 1 reported no exit status" in text and "finished: gs://b/r" in text


def test_tpu_launcher_reports_the_failed_worker_and_stops(tmp_path, monkeypatch):
    state = _fake_cloud(tmp_path, monkeypatch, {"vm": "READY", "attempts": [{"rcs": [0, 1]}]})
    with pytest.raises(LaunchError) as exc:
        launch_tpu(TrainJob("tiny", "gs://b/r"), _opts(), Runner(False, out=io.StringIO()), REPO)
    assert "worker 1 (t1v-w-1) exited with status 1" in str(exc.value)
    assert "worker 0" not in str(exc.value)
    calls = json.loads(state.read_text())["calls"]
    assert sum("worker.sh" in c for c in calls) == 1  # no retry of a genuine failure
    assert not any(" create " in f" {c} " for c in calls)


def test_tpu_launcher_refuses_a_vm_of_another_type(tmp_path, monkeypatch):
    _fake_cloud(tmp_path, monkeypatch, {"vm": "READY", "type": "v5p-64", "attempts": []})
    with pytest.raises(LaunchError, match="exists as v5p-64, not v5p-16"):
        launch_tpu(TrainJob("tiny", "gs://b/r"), _opts(), Runner(False, out=io.StringIO()), REPO)


def test_train_job_rewrites_config_paths_relative_to_the_checkout():
    job = TrainJob(str(REPO / "experiments" / "tiny.py") + ":patching=static", "gs://b/r")
    assert job.train_argv(REPO)[:4] == ["fastblt", "train", "--config", "experiments/tiny.py:patching=static"]
    with pytest.raises(ConfigError):
        TrainJob("tiny", "gs://b/r", ("train.nope=1",)).validate()

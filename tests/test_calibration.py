"""Stage 2's patching from the entropy model (fastblt/train/calibration.py) and the overflow warnings of a run."""

from __future__ import annotations

import shutil

import numpy as np
from shared_runs import TWO_STAGE_ARGS, two_stage_run
from train_utils import small_config

from fastblt.config import PatcherConfig
from fastblt.io.loading import load_model
from fastblt.train import calibration
from fastblt.train.loop import run


def test_sized_buffer_hand_worked():
    needed = np.array([10, 47, 30])
    assert calibration.sized_buffer(needed, None, 500) is None  # seq_len + 1 slots never overflow
    assert calibration.sized_buffer(needed, 64, 500) == 64  # 47 * 1.25 = 58.75 fits
    assert calibration.sized_buffer(needed, 50, 500) == 64  # 59 rounded up to 64 slots
    assert calibration.sized_buffer(np.array([400]), 128, 420) == 421  # capped at seq_len + 1


def test_patches_needed_counts_patches_past_the_buffer():
    # Entropies above 1.0 open a patch at the next byte; BOS opens the first.
    tokens = np.array([[1, 10, 11, 12, 13, 14, 15, 16]], np.int32)
    ent = np.array([[0.0, 2.0, 2.0, 0.0, 2.0, 0.0, 0.0, 2.0]], np.float32)
    patcher = PatcherConfig(mode="entropy", threshold=1.0)
    values, batches = [ent], [{"inputs": tokens}]
    from fastblt.model.patcher import patch

    full = patch(tokens, ent, patcher, max_patches=9)  # cannot overflow: the reference count
    assert calibration.patches_needed(values, batches, patcher).tolist() == [int(full.count[0])]
    small = patch(tokens, ent, patcher, max_patches=2)
    assert bool(small.overflow[0]) and int(small.needed[0]) == int(full.count[0]) > 2


def test_stage_two_raises_a_patch_buffer_that_rows_would_overflow(tmp_path):
    # The session's two-stage run starts with 8 slots (shared_runs.TWO_STAGE_ARGS), about half the
    # ~17 patches a 64-byte row needs at 4 bytes per patch; it also serves tests/test_train.py.
    shared, logs, last = two_stage_run()
    assert "model.patcher.max_patches=8" in TWO_STAGE_ARGS
    raised = [line for line in logs if "max_patches raised from 8 to" in line]
    assert raised, logs
    config, _ = load_model(shared)  # the checkpoint keeps the raised buffer
    assert config.patcher.max_patches > 8
    assert last["patch_overflow"] == 0.0
    assert not any(line.startswith("WARNING step") for line in logs)
    # Resuming keeps the buffer its checkpoints were written with (no second sizing, no mismatch).
    workdir = shutil.copytree(shared, tmp_path / "run")  # the shared run stays as it was
    logs = []
    more = run(small_config(*TWO_STAGE_ARGS, steps=4, patching="entropy"), str(workdir), log=logs.append)
    assert any("resumed blt from step 3" in line for line in logs) and not any(
        "raised from" in line for line in logs
    )
    assert load_model(workdir)[0].patcher.max_patches == config.patcher.max_patches
    assert more["patch_overflow"] == 0.0


def test_a_run_whose_rows_overflow_says_so_every_log(tmp_path):
    cfg = small_config("model.patcher.max_patches=4", steps=2)  # BOS + 16 static 4-byte patches per row
    logs: list[str] = []
    last = run(cfg, str(tmp_path), log=logs.append)
    warnings = [line for line in logs if line.startswith("WARNING step")]
    assert len(warnings) == 2, logs  # log_every=1
    assert "100.0% of rows" in warnings[0] and "4 slots" in warnings[0] and "up to 17" in warnings[0]
    assert last["patch_overflow"] == 1.0 and last["patches_needed_max"] == 17.0

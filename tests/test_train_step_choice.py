"""Trainer.step_for: which jitted train step the loop runs for a batch (host check of documents)."""

from __future__ import annotations

import numpy as np
from train_utils import small_config

from fastblt import sharding
from fastblt.model.attention import MAX_SEGMENTS
from fastblt.train.loop import Trainer


def test_step_for_picks_the_packed_step_only_when_every_row_fits():
    trainer = Trainer(small_config(), sharding.make_mesh({"data": -1}))
    rows = np.full((8, 64), 65)
    # On CPU the XLA attention has no per-layer check: one program for every batch.
    assert trainer.step_for(rows) is trainer.train_step
    trainer._packed_differs = True  # as on a GPU with fused attention
    assert trainer.step_for(rows) is trainer.packed_train_step
    fits = rows.copy()
    fits[3, 1:MAX_SEGMENTS] = 2  # MAX_SEGMENTS documents in one row
    assert trainer.step_for(fits) is trainer.packed_train_step
    over = rows.copy()
    over[5, 1 : MAX_SEGMENTS + 1] = 2  # one more: the per-layer checked step
    assert trainer.step_for(over) is trainer.train_step

"""Trainer.step_for: which jitted train step the loop runs for a batch (host check of documents)."""

from __future__ import annotations

import numpy as np
from train_utils import small_config

from fastblt import sharding
from fastblt.model.attention import MAX_SEGMENTS, SEGMENT_TIERS, segment_tier, segments_needed
from fastblt.train.loop import Trainer


def test_segments_needed_and_the_tier_a_batch_takes():
    rows = np.full((3, 40), 65)
    assert segments_needed(rows) == 1 and segment_tier(rows) == SEGMENT_TIERS[0] == 4
    rows[1, [5, 9, 30]] = 2  # 3 EOS: 4 documents (the last may open one more in the patch slots)
    assert segments_needed(rows) == 4 and segment_tier(rows) == 4
    rows[2, [1, 2, 3, 4]] = 2  # 4 EOS: 5
    assert segments_needed(rows) == 5 and segment_tier(rows) == MAX_SEGMENTS == 8
    rows[0, 10:18] = 2  # 8 EOS: 9, more than any tier
    assert segments_needed(rows) == 9 and segment_tier(rows) is None


def test_step_for_picks_the_smallest_packed_step_every_row_fits():
    trainer = Trainer(small_config(), sharding.make_mesh({"data": -1}))
    assert sorted(trainer.packed_train_steps) == list(SEGMENT_TIERS)
    rows = np.full((8, 64), 65)
    # On CPU the XLA attention has no per-layer check: one program for every batch.
    assert trainer.step_for(rows) is trainer.train_step
    trainer._packed_differs = True  # as on a GPU with fused attention
    assert trainer.step_for(rows) is trainer.packed_train_steps[4]
    four = rows.copy()
    four[3, 1:4] = 2  # 4 documents in one row
    assert trainer.step_for(four) is trainer.packed_train_steps[4]
    fits = rows.copy()
    fits[3, 1:MAX_SEGMENTS] = 2  # MAX_SEGMENTS documents in one row
    assert trainer.step_for(fits) is trainer.packed_train_steps[MAX_SEGMENTS]
    over = rows.copy()
    over[5, 1 : MAX_SEGMENTS + 1] = 2  # one more: the per-layer checked step
    assert trainer.step_for(over) is trainer.train_step

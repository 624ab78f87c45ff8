"""BLT-D at the 1b size: blt_1b.py trained with next-byte + block-wise masked diffusion
(fastblt/train/blt_d.py), so the decoder can fill a block of B bytes in a few parallel passes.

    fastblt train --config blt_d_1b:block=8 --workdir /tmp/blt-d-1b-8

Argument: ``block=4|8|16`` (default 4), the diffusion block size B. The decoder sees
N + (max_patches - 1) * B rows per training row.
"""

from __future__ import annotations

import ml_collections

from experiments import base, blt_1b
from fastblt.config import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """BLT-D with blocks of ``block`` bytes."""
    args = parse_arg(arg, block=4)
    return base.blt_d(blt_1b.get_config(), int(args.block))

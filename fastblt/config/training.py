"""The training sections: ``objective``, ``optimizer``, ``train``, ``checkpoint``, ``mesh`` and
``entropy_stage``; each default is written here once (experiments/base.py copies them)."""

from __future__ import annotations

import dataclasses

from fastblt.config.schema import join, require, setting

OBJECTIVE_KINDS = ("next_byte", "blt_d")
NORMALIZATIONS = ("sum", "mean")
MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """The ``objective`` section of a BLT experiment (entropy-model runs have none).

    kind: "next_byte" (plain BLT) or "blt_d" (next-byte + block diffusion, fastblt/train/blt_d.py;
      needs model.mask_embedding).
    block_size: B, bytes per diffusion block (the paper trains 4, 8, 16); <= model.decoder.window.
    noise_eps: t ~ U(noise_eps, 1): keeps the 1/t weight finite (0 < noise_eps < 1).
    diffusion_weight, next_byte_weight: w_d, w_nb >= 0 (the paper: 1 and 1).
    normalization: "sum" (the paper's ratio of summed terms, scaled by 1 / clean targets) or "mean".
    """

    kind: str = setting("next_byte", choices=OBJECTIVE_KINDS)
    block_size: int = setting(4, ge=1)
    noise_eps: float = setting(1e-3, gt=0, lt=1)
    diffusion_weight: float = setting(1.0, ge=0)
    next_byte_weight: float = setting(1.0, ge=0)
    normalization: str = setting("sum", choices=NORMALIZATIONS)

    def check(self, key: str) -> None:
        if self.kind == "blt_d":
            require(
                self.diffusion_weight > 0 or self.next_byte_weight > 0,
                join(key, "diffusion_weight"),
                f"is 0 and so is {join(key, 'next_byte_weight')}: nothing to train",
            )


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW on all parameters (as the reference), linear warmup then cosine decay to
    ``min_lr_ratio * lr``, global-norm gradient clipping (fastblt/train/optimizer.py)."""

    lr: float = setting(3e-4, gt=0)  # peak; a negative rate would ascend the loss
    warmup_steps: int = setting(2000, ge=0)
    min_lr_ratio: float = setting(0.1, ge=0)
    b1: float = setting(0.9, ge=0, lt=1)
    b2: float = setting(0.95, ge=0, lt=1)
    eps: float = setting(1e-8, gt=0)
    weight_decay: float = setting(0.1, ge=0)
    grad_clip: float = setting(1.0, gt=0)  # global norm


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop (fastblt/train/loop.py): how long, how often to log and evaluate, what a non-finite
    step does."""

    steps: int = setting(100_000, ge=1)
    log_every: int = setting(10, ge=1)
    eval_every: int = setting(1000, ge=1)
    grad_accum: int = setting(1, ge=1)  # micro-batches per step (data.batch_size must divide by it)
    sample_bytes: int = setting(0, ge=0)  # > 0: print a greedy sample of this many bytes at each evaluation
    sample_prompt: str = "def "
    # A step with a NaN/inf loss or gradient norm: "stop" the run (saving nothing of it), or "skip"
    # its update and go on (at most max_nonfinite_skips steps in a row).
    on_nonfinite: str = setting("stop", choices=("stop", "skip"))
    max_nonfinite_skips: int = setting(10, ge=0)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in ``WORKDIR/checkpoints`` (fastblt/io/checkpoint.py)."""

    save_every: int = setting(1000, ge=1)
    keep: int = setting(3, ge=1)  # most recent checkpoints kept
    keep_every: int = setting(0, ge=0)  # also keep every N-th step forever (0: none)
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: data x fsdp x tensor; one axis may be -1 (all remaining devices). The device
    count is checked where the mesh is built (fastblt/sharding.py): a config may be written for
    other machines."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def check(self, key: str) -> None:
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        for axis, size in sizes.items():
            require(
                size >= 1 or size == -1,
                join(key, axis),
                f"must be a positive int or -1 (all remaining devices), got {size}",
            )
        require(list(sizes.values()).count(-1) <= 1, key, f"at most one axis may be -1, got {sizes}")

    @property
    def data_ways(self) -> int | None:
        """Rows of a batch are split over data x fsdp devices; None when one of them is -1."""
        return None if -1 in (self.data, self.fsdp) else self.data * self.fsdp


@dataclasses.dataclass(frozen=True)
class EntropyStageConfig:
    """Stage 1 of an entropy-patched BLT run: train ``model.entropy_model`` on the same data first.

    ``checkpoint``: a trained entropy model's workdir to use instead (skips stage 1).
    ``target_patch_len``: if > 0, set ``model.patcher.threshold`` to the entropy quantile that gives
    this many bytes per patch on the training rows (a new entropy model's scale is its own).
    """

    checkpoint: str = ""
    steps: int = setting(100_000, ge=1)
    lr: float = setting(4e-4, gt=0)
    warmup_steps: int = setting(2000, ge=0)
    target_patch_len: float = setting(0.0, ge=0)

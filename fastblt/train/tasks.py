"""What is trained: BLT patched by a frozen entropy model, or the entropy model itself.

A task knows its module, how to initialise trainable parameters and its loss; the train loop
(loop.py) is the same for all of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastblt.config import EntropyModelConfig, Experiment, ModelConfig, ObjectiveConfig, experiment_config
from fastblt.model import BLT, EntropyModel
from fastblt.model import patcher as patching
from fastblt.train.objectives import next_byte_loss


@dataclasses.dataclass(frozen=True)
class EntropyTask:
    """Train the entropy model: a plain next-byte LM."""

    config: EntropyModelConfig
    init_std_factor: str = "current_depth"

    name = "entropy"

    @property
    def module(self) -> EntropyModel:
        return EntropyModel(self.config, self.init_std_factor)

    def init_params(self, rng: jax.Array, seq_len: int) -> Any:
        """Boxed (logically annotated) parameters."""
        return self.module.init(rng, jnp.ones((1, seq_len), jnp.int32))["params"]

    def loss(
        self, params: Any, frozen: Any, batch: dict, rng: jax.Array | None = None
    ) -> tuple[jax.Array, dict]:
        del frozen, rng
        logits = self.module.apply({"params": params}, batch["inputs"])
        return next_byte_loss(logits, batch["targets"], batch["mask"])

    eval_loss = loss


@dataclasses.dataclass(frozen=True)
class BLTTask:
    """Train BLT; rows are patched in the step by the frozen entropy model (``frozen``), exactly
    as generation patches them (include_next_token: the entropy of the last byte decides whether
    the target after it opens a patch)."""

    config: ModelConfig

    name = "blt"

    @property
    def module(self) -> BLT:
        return BLT(self.config)

    def init_params(self, rng: jax.Array, seq_len: int) -> Any:
        tokens = jnp.ones((1, seq_len), jnp.int32)
        lengths = jnp.zeros((1, seq_len + 1), jnp.int32).at[0, :2].set(jnp.array([1, seq_len]))
        params = self.module.init(rng, tokens, lengths)["params"]
        # The entropy model is trained separately and held frozen: not a trainable parameter.
        return {k: v for k, v in params.items() if k != "entropy_model"}

    def patch(self, frozen: Any, tokens: jax.Array) -> patching.Patching:
        """Patch lengths of training rows: int32[batch, max_patches] (+ count, overflow)."""
        pc = self.config.patcher
        entropies = None
        if pc.mode == "entropy":
            model = EntropyModel(self.config.entropy_model, attention_impl=self.config.attention_impl)
            logits = model.apply({"params": frozen}, tokens)
            entropies = patching.entropy(jax.lax.stop_gradient(logits))
        max_patches = pc.max_patches or tokens.shape[1] + 1
        return patching.patch(tokens, entropies, pc, max_patches, include_next_token=True)

    def loss(
        self, params: Any, frozen: Any, batch: dict, rng: jax.Array | None = None
    ) -> tuple[jax.Array, dict]:
        del rng
        tokens = batch["inputs"]
        p = self.patch(frozen, tokens)
        logits = self.module.apply({"params": params}, tokens, p.lengths)
        loss, metrics = next_byte_loss(logits, batch["targets"], batch["mask"])
        return loss, {**metrics, **patch_metrics(p, tokens.shape[1])}

    eval_loss = loss


def patch_metrics(p: patching.Patching, n: int) -> dict[str, jax.Array]:
    """Patches per row, mean patch length, the fraction of rows that overflowed the buffer and the
    most patches a row needed (more than the buffer's slots where rows overflowed)."""
    count = p.count.astype(jnp.float32)
    return {
        "patches_per_row": count.mean(),
        "avg_patch_len": ((n + 1) / count).mean(),
        "patch_overflow": p.overflow.astype(jnp.float32).mean(),
        "patches_needed_max": p.needed.max().astype(jnp.float32),
    }


@dataclasses.dataclass(frozen=True)
class BLTDTask(BLTTask):
    """BLT-D: next-byte loss plus the block-wise masked-diffusion loss (fastblt/train/blt_d.py).
    Evaluation reports the plain next-byte loss (``eval_loss``), comparable with BLT's."""

    objective: ObjectiveConfig | None = None

    name = "blt_d"

    def loss(
        self, params: Any, frozen: Any, batch: dict, rng: jax.Array | None = None
    ) -> tuple[jax.Array, dict]:
        from fastblt.train import blt_d

        tokens = batch["inputs"]
        p = self.patch(frozen, tokens)
        loss, metrics = blt_d.blt_d_loss(
            params, self.config, self.objective, tokens, batch["targets"], batch["mask"], p.lengths, rng
        )
        return loss, {**metrics, **patch_metrics(p, tokens.shape[1])}

    def eval_loss(self, params: Any, frozen: Any, batch: dict) -> tuple[jax.Array, dict]:
        """Held-out metrics: ``loss`` is the plain next-byte loss (comparable with BLT's); the
        masked-cell accuracy and NLL come with it, under a fixed noise key (same cells every eval)."""
        _, metrics = self.loss(params, frozen, batch, jax.random.key(0))
        return metrics["next_byte_loss"], {**metrics, "loss": metrics["next_byte_loss"]}


def frozen_template(task: BLTTask | EntropyTask) -> Any:
    """Abstract frozen parameters a task's checkpoints carry: the entropy model's, or none."""
    if isinstance(task, BLTTask) and task.config.patcher.mode == "entropy":  # BLT-D too
        model = EntropyModel(task.config.entropy_model)
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"])
        return nn.meta.unbox(boxed)
    return {}


def make_task(cfg: Experiment | Any) -> BLTTask | BLTDTask | EntropyTask:
    """The task an experiment (an Experiment or its ConfigDict) trains: the entropy model (no ``model``
    section), BLT, or BLT-D."""
    experiment = experiment_config(cfg)
    if experiment.model is None:
        assert experiment.entropy_model is not None  # experiment_config checks that one is there
        return EntropyTask(experiment.entropy_model)
    if experiment.objective is not None and experiment.objective.kind == "blt_d":
        return BLTDTask(experiment.model, experiment.objective)
    return BLTTask(experiment.model)

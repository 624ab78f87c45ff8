"""Logical axis rules: the spec a logical name gets (worked by hand from DEFAULT_RULES), and that the
train step's activations carry sharding constraints on its mesh while the same model applied
without one carries none."""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import PartitionSpec as P
from train_utils import small_config

from fastblt import sharding
from fastblt.data import make_train_iterator
from fastblt.model import BLT
from fastblt.train.loop import Trainer, make_task


def test_logical_names_map_to_mesh_axes():
    rules = sharding.DEFAULT_RULES
    # A parameter: embed over fsdp, mlp over tensor.
    assert sharding.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
    # An activation: batch takes data and fsdp first, so embed (fsdp) stays unsharded.
    assert sharding.logical_to_spec(("batch", "bytes", "embed"), rules) == P(("data", "fsdp"), None, None)
    assert sharding.logical_to_spec(("batch", "bytes", "vocab"), rules) == P(("data", "fsdp"), None, "tensor")
    assert sharding.logical_to_spec((None, "norm"), rules) == P(None, None)


def _constraints(text: str) -> list[str]:
    return re.findall(r"sharding_constraint %\S+ <@\w+, (\[[^>]*\])>", text)


def test_train_step_constrains_activations_on_its_mesh_only():
    cfg = small_config()
    batch = next(make_train_iterator(cfg.data))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    trainer = Trainer(cfg, mesh)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=trainer.batch_sharding),
        batch,
    )
    specs = _constraints(trainer.train_step.lower(trainer.abstract_state, trainer.frozen, abstract).as_text())
    # Every encoder/global/decoder layer's output and the logits, forward and backward.
    assert len(specs) >= 10
    assert all(s.startswith('[{"data", "fsdp"}') for s in specs), specs
    assert any('{"tensor"}' in s for s in specs)  # the logits' vocab axis

    # The same model outside the train step (as the sampler runs it): no mesh, no constraint.
    model = BLT(make_task(cfg).config)
    params = trainer.init_state(0).params
    tokens = np.asarray(batch["inputs"])[:2]
    text = jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(params, tokens).as_text()
    assert _constraints(text) == []

"""Two real JAX processes on localhost (CPU, gloo collectives) train a few steps; their losses
equal a single-process run fed the same global batches (each host's shard, concatenated)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
from train_utils import small_config

from fastblt import sharding
from fastblt.data import make_train_iterator
from fastblt.train.loop import Trainer

HERE = os.path.dirname(__file__)


def test_two_process_training_matches_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    outs = [tmp_path / f"losses{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "multiprocess_train_worker.py"),
                str(i),
                str(port),
                str(outs[i]),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0].decode(errors="replace"))
        finally:
            p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-3000:]}"
    multi = [json.loads(o.read_text()) for o in outs]
    assert multi[0] == multi[1]  # every process sees the same global loss

    cfg = small_config()
    mesh = sharding.make_mesh({"data": 2}, jax.devices()[:2])
    trainer = Trainer(cfg, mesh)
    state = trainer.init_state(0)
    shards = [make_train_iterator(cfg.data, i, 2) for i in range(2)]
    single = []
    for _ in range(3):
        local = [next(it) for it in shards]
        batch = {k: np.concatenate([b[k] for b in local]) for k in local[0]}
        state, m = trainer.train_step(
            state, trainer.frozen, sharding.global_batch(batch, trainer.batch_sharding)
        )
        single.append(float(m["loss"]))
    np.testing.assert_allclose(multi[0], single, rtol=1e-5)

"""One process of the two-process training test (run by tests/test_multiprocess.py).

argv: process_id port out_json. Trains 3 steps of the small config on a 2-process data mesh, each
process feeding its own shard of the data, and writes the global losses.
"""

import json
import os
import re
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
# One device per process; the rest of the tests' flags (tests/conftest.py: LLVM at -O0, the older
# fusion code generator) stay, so the two processes compile as fast as the test's own reference.
_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=1".strip()

pid, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sys.path.insert(0, os.path.dirname(__file__))

from fastblt import distributed  # noqa: E402

distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)

import jax  # noqa: E402
from train_utils import small_config  # noqa: E402

from fastblt import sharding  # noqa: E402
from fastblt.data import make_train_iterator  # noqa: E402
from fastblt.train.loop import Trainer  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 2
cfg = small_config()
trainer = Trainer(cfg, sharding.make_mesh(cfg.mesh))
state = trainer.init_state(0)
it = make_train_iterator(cfg.data, jax.process_index(), jax.process_count())
losses = []
for _ in range(3):
    batch = sharding.global_batch(next(it), trainer.batch_sharding)
    state, m = trainer.train_step(state, trainer.frozen, batch)
    losses.append(float(m["loss"]))
with open(out, "w") as f:
    json.dump(losses, f)

"""``import fastblt`` stays light: no JAX at import, so the CLI and ``--help`` start at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

_PROBE = """
import json, sys, time
start = time.perf_counter()
import {module}
elapsed = time.perf_counter() - start
print(json.dumps({{"seconds": elapsed, "jax": "jax" in sys.modules, "flax": "flax" in sys.modules}}))
"""


def _import_in_fresh_process(module: str) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", _PROBE.format(module=module)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["fastblt", "fastblt.cli"])
def test_import_is_fast_and_does_not_load_jax(module):
    probe = _import_in_fresh_process(module)
    assert not probe["jax"], f"import {module} imported jax; import it inside the functions that need it"
    assert not probe["flax"], f"import {module} imported flax"
    assert probe["seconds"] < 3.0, f"import {module} took {probe['seconds']:.2f} s"


def test_submodules_load_on_attribute_access():
    import fastblt

    assert fastblt.config.ModelConfig is not None
    assert "model" in dir(fastblt)
    with pytest.raises(AttributeError, match="no_such_submodule"):
        fastblt.no_such_submodule  # noqa: B018

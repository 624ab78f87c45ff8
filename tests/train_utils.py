"""Small configs shared by the training tests."""

from __future__ import annotations

from fastblt.config import load_config

SMALL_MODEL = [
    "model.encoder.dim=32",
    "model.encoder.n_heads=2",
    "model.encoder.window=32",
    "model.global_model.dim=64",
    "model.global_model.n_layers=1",
    "model.global_model.n_heads=2",
    "model.decoder.dim=32",
    "model.decoder.n_layers=1",
    "model.decoder.n_heads=2",
    "model.decoder.window=32",
    "model.entropy_model.dim=32",
    "model.entropy_model.n_layers=1",
    "model.entropy_model.n_heads=2",
    "model.hash.vocab=257",
    "model.patcher.max_patches=40",
    "data.seq_len=64",
    "data.batch_size=8",
    "data.eval_batches=1",
    "train.log_every=1",
    "train.eval_every=1000",
    # No greedy sample at the final evaluation: no test reads it, and each new model config compiled
    # a sampler for it (~7 s on CPU per config and process). test_train's two-stage run turns it on
    # and checks the line.
    "train.sample_bytes=0",
    "optimizer.warmup_steps=2",
    "checkpoint.async_save=False",
]


def small_config_args(*overrides: str, steps: int = 6, patching: str = "static") -> tuple[str, list[str]]:
    """(experiment spec, overrides) of :func:`small_config`, for ``fastblt train --config --set``."""
    spec = "tiny" if patching == "entropy" else f"tiny:patching={patching}"
    extra = [o for o in SMALL_MODEL if patching == "entropy" or not o.startswith("model.entropy_model")]
    return spec, [*extra, f"train.steps={steps}", "checkpoint.save_every=3", *overrides]


def small_config(*overrides: str, steps: int = 6, patching: str = "static"):
    """The tiny experiment shrunk further; static patching unless ``patching='entropy'``."""
    return load_config(*small_config_args(*overrides, steps=steps, patching=patching))

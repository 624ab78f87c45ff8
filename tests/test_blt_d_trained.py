"""A tiny BLT-D trained for real (static patching, B = 4), then checked where random weights say
nothing:

* masked-byte accuracy in the inference layout (the prefix alone, one block appended after it, no
  clean twin of the block) is far above chance and matches the training layout's on the same cells;
* generation: ``blt_dv`` and ``blt_s`` are byte-identical to greedy ``ar`` on held-out prompts and
  accept drafts; ``fastblt sample`` runs every method on the workdir (block size read from the
  checkpoint) and refuses BLT-D methods on a plain BLT.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from shared_runs import built_once, train_subprocess
from train_utils import small_config, small_config_args

from fastblt import cli
from fastblt.config import objective_config
from fastblt.data.pipeline import make_eval_batches
from fastblt.io.loading import load_model, trained_block_size
from fastblt.model import BLT
from fastblt.model.blt import blt_d_logits
from fastblt.sampler import generate
from fastblt.train import blt_d as objective

BLOCK = 4
# 150 steps (measured 2026-12-05): masked accuracy 0.24 in both layouts (chance 1/256, the test's floor
# 20/256; layouts agree on all 347 cells, floor 0.98), acceptance 0.16 for blt_dv and 0.98 for blt_s
# (floor 0.05). 300 steps read 0.55 and cost CI ~80 more seconds.
# Read again after the inference layout became one batched forward (2026-12-05): the same, 0.2392
# in both layouts, 347 of 347 cells agree; acceptance 0.165 (blt_dv, alpha and one-step), 0.983.
# 100 steps on one device (2026-12-06, shared_runs.train_subprocess): masked accuracy 0.2392 in both
# layouts, 347 of 347 cells agree, acceptance 0.190 (blt_dv, alpha and one-step) and 0.983 (blt_s):
# every margin as wide as at 150 steps, for ~15 s less setup (150 steps on one device read as on 8).
# 50 steps (2026-12-06, a faster 2-core machine): masked accuracy 0.2392 in both layouts again, 347 of
# 347 cells agree, acceptance 0.88 (blt_dv, alpha and one-step) and 1.0 (blt_s): every floor still met
# with the same or a wider margin, for ~33 s less setup under a loaded suite (70 steps: 0.2392, 0.57,
# 1.0). blt_s's rejections are checked on random weights (test_sampler_speculative.py: both
# accepted and rejected drafts, asserted).
STEPS = 50


TRAINED = (
    "model.mask_embedding=True",
    "model.patcher.max_patch_length=8",
    "objective.kind=blt_d",
    f"objective.block_size={BLOCK}",
    "model.decoder.dim=64",
    "model.decoder.n_layers=2",
    "model.decoder.n_heads=4",
    "model.encoder.dim=64",
    "model.encoder.n_heads=4",
    "data.seq_len=128",
    "model.patcher.max_patches=64",
    "optimizer.lr=3e-3",
    "optimizer.warmup_steps=10",
    "train.log_every=50",
    "checkpoint.save_every=1000",
)


@pytest.fixture(scope="module")
def trained():
    """(workdir, experiment config, model config, params) of a tiny BLT-D after STEPS steps, trained
    once per session (shared_runs.py: a subprocess at XLA's default level on one device, ~40 s on 2
    idle cores; at 150 steps on 8 devices it was ~140 s on a slower machine)."""
    workdir = built_once(
        "blt_d_trained",
        lambda path: train_subprocess(path, *small_config_args(*TRAINED, steps=STEPS)),
    )
    config, params = load_model(workdir)
    return workdir, small_config(*TRAINED, steps=STEPS), config, params


def _inference_layout_logits(config, params, rows, lengths, items):
    """Block logits [len(items), B, V]: per item (r, q, cells, valid, masked), those of block ``q``
    of row ``r`` with the row cut at the block start: bytes from the start on are padding, the
    patches are the row's patches before the block plus one patch for the rest, and the block is the
    only block. All items run as one batch (rows are independent): one forward, not one per block."""
    n, p = rows.shape[1], lengths.shape[1]
    prefix = np.zeros((len(items), n), np.int32)
    cut = np.zeros((len(items), p), np.int32)
    starts = np.zeros(len(items), np.int32)
    for i, (r, q, *_) in enumerate(items):
        start = starts[i] = int(np.sum(lengths[r, : q + 1]))  # block q opens patch slot q + 1
        prefix[i] = np.where(np.arange(n) < start, rows[r], 0)
        cut[i, : q + 1] = lengths[r, : q + 1]
        cut[i, q + 1] = n + 1 - start
    cells, valid, masked = (jnp.asarray(np.stack([it[k] for it in items]))[:, None] for k in (2, 3, 4))
    layout = objective.BlockLayout(
        starts=jnp.asarray(starts)[:, None],
        positions=(jnp.asarray(starts)[:, None] + jnp.arange(BLOCK, dtype=jnp.int32))[:, None],
        read_patch=jnp.asarray([it[1] for it in items], jnp.int32)[:, None],
        in_row=valid,
    )
    blocks = objective.decoder_blocks(config, layout, jnp.asarray(prefix), cells, valid, masked)
    return _block_forward(config)(params, jnp.asarray(prefix), jnp.asarray(cut), blocks)[:, 0]


_FORWARDS: dict = {}


def _block_forward(config):
    if config not in _FORWARDS:
        _FORWARDS[config] = jax.jit(
            lambda params, tokens, lengths, blocks: blt_d_logits(params, config, tokens, lengths, blocks)[1]
        )
    return _FORWARDS[config]


def test_masked_accuracy_in_inference_layout_matches_training_layout(trained):
    _, cfg, config, params = trained
    obj = objective_config(cfg)
    batch = make_eval_batches(cfg.data)[0]
    tokens, targets, mask = (jnp.asarray(batch[k]) for k in ("inputs", "targets", "mask"))
    lengths = jax.jit(functools.partial(BLT(config).apply, method=BLT.patch))(
        {"params": params}, tokens
    ).lengths

    # Training layout: every block of the row at once, the clean row beside them.
    layout = objective.block_layout(lengths, tokens.shape[1], obj.block_size)
    cells, valid = objective.block_cells(layout, tokens, targets, mask, config.document_masking)
    _, masked = objective.sample_noise(jax.random.key(3), valid, obj.noise_eps)
    blocks = objective.decoder_blocks(config, layout, tokens, cells, valid, masked)
    train_pred = np.asarray(jnp.argmax(_block_forward(config)(params, tokens, lengths, blocks), -1))

    cells, valid, masked, lengths = (np.asarray(x) for x in (cells, valid, masked, lengths))
    rows = np.asarray(tokens)
    items = [
        (r, q, cells[r, q], valid[r, q], masked[r, q])
        for r in range(rows.shape[0])
        for q in range(cells.shape[1])
        if masked[r, q].any()
    ]
    infer_pred = np.asarray(jnp.argmax(_inference_layout_logits(config, params, rows, lengths, items), -1))
    agree = right_train = right_infer = count = 0
    for (r, q, cell, _, m), pred in zip(items, infer_pred, strict=True):
        agree += int((pred[m] == train_pred[r, q][m]).sum())
        right_train += int((train_pred[r, q][m] == cell[m]).sum())
        right_infer += int((pred[m] == cell[m]).sum())
        count += int(m.sum())
    assert count > 100
    train_acc, infer_acc = right_train / count, right_infer / count
    assert infer_acc > 20 / 256, f"masked accuracy {infer_acc:.3f} is near chance (1/256)"
    assert abs(infer_acc - train_acc) < 0.02, (infer_acc, train_acc)
    assert agree / count > 0.98


def _held_out_prompts(cfg, lengths):
    row = np.asarray(make_eval_batches(cfg.data)[0]["inputs"])[0]
    text = bytes(int(t) - 4 for t in row[1:] if t >= 4)
    return [text[i * 7 : i * 7 + n] for i, n in enumerate(lengths)]


def _same_as_rows_alone(params, config, prompts, batch, **kw):
    """Each row of ``batch`` (the prompts generated together) equals the row generated alone: bytes
    and work counters (drafts, acceptance, passes). Verification would hide a drafter that mixes rows
    up (the output stays right, only acceptance drops), so the counters are compared."""
    fields = ("generated", "decoder_passes", "eg_passes", "drafted", "accepted", "rounds")
    for row, prompt in enumerate(prompts):
        alone = generate(params, config, [prompt], **kw)
        np.testing.assert_array_equal(batch.ids[row], alone.ids[0], err_msg=f"{kw} row {row}")
        for f in fields:
            got, want = getattr(batch.counters, f)[row], getattr(alone.counters, f)[0]
            assert got == want, (kw, f, row, got, want)


def _sample_json(*argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["sample", *argv, "--json"]) == 0
    return json.loads(buf.getvalue())


# max_bytes and buffer_bytes of every generation below: the API's calls and the CLI's (--max-bytes,
# --buffer-bytes) run at the same shapes, so a program one compiles, the other finds compiled.
GEN = dict(max_bytes=24, buffer_bytes=64)


def test_verified_methods_equal_greedy_ar_and_the_cli_runs_every_method(trained, tmp_path):
    """On held-out prompts: ``blt_dv`` and ``blt_s`` are byte-identical to greedy ``ar`` and accept
    drafts, their batches equal their rows alone; ``fastblt sample`` runs every method on the workdir
    (block size read from the checkpoint) and refuses BLT-D methods on a plain BLT.

    One test, not three: each sampler program (method, batch, shapes) compiles once per process
    (fastblt.sampler.api) and xdist runs a module's tests on both workers, so the API checks and the
    CLI ran the same three-row programs (ar, blt_dv and blt_d one-step) compiled twice, and the
    batch-vs-alone checks of blt_dv and blt_s compiled the batch programs this test already runs."""
    workdir, cfg, config, params = trained
    prompts = _held_out_prompts(cfg, [5, 12, 20])
    ar = generate(params, config, prompts, method="ar", **GEN)
    for method, extra in [
        ("blt_dv", dict(block_size=BLOCK, alpha=0.3)),
        ("blt_dv", dict(block_size=BLOCK, one_step=True)),
        ("blt_s", dict(draft=4)),
    ]:
        out = generate(params, config, prompts, method=method, **GEN, **extra)
        for row in range(len(prompts)):
            np.testing.assert_array_equal(out.ids[row], ar.ids[row], err_msg=f"{method} {extra} row {row}")
        assert out.counters.acceptance_rate > 0.05, (method, extra, out.counters.acceptance_rate)
        if "one_step" not in extra:  # one-step rows alone: blt_d's, in test_a_batch_generates_...
            _same_as_rows_alone(params, config, prompts, out, method=method, **GEN, **extra)
    d = generate(params, config, prompts, method="blt_d", block_size=BLOCK, one_step=True, **GEN)
    np.testing.assert_array_equal(d.counters.decoder_passes, d.counters.rounds)  # one pass per block

    # The CLI on the same prompts and shapes (the prompts are bytes: --prompt takes them back with
    # surrogateescape, as the CLI encodes).
    assert trained_block_size(workdir) == BLOCK
    common = ["--checkpoint", str(workdir), "--max-bytes", str(GEN["max_bytes"])]
    common += ["--buffer-bytes", str(GEN["buffer_bytes"])]
    for prompt in prompts:
        common.append("--prompt=" + prompt.decode("utf-8", errors="surrogateescape"))
    ar = _sample_json(*common)
    assert ar["prompts"] == [p.decode("utf-8", errors="replace") for p in prompts]
    dv = _sample_json(*common, "--method", "blt_dv", "--one-step")
    assert dv["texts"] == ar["texts"]
    one = _sample_json(*common, "--method", "blt_d", "--one-step")
    c = one["counters"]
    assert c["decoder_passes"] == pytest.approx(c["generated"] / BLOCK)  # block size from the checkpoint
    gamma = _sample_json(*common, "--method", "blt_d", "--gamma", "0.5", "--block-size", "2")
    assert gamma["counters"]["decoder_passes"] >= gamma["counters"]["generated"] / 2
    # Blocks anchored at patch starts write at most B new bytes each (fewer after a mid-patch end).
    patch = _sample_json(*common, "--method", "blt_d", "--one-step", "--anchor", "patch")["counters"]
    assert patch["generated"] == c["generated"] and patch["decoder_passes"] >= c["decoder_passes"]
    assert _sample_json(*common, "--method", "blt_dv", "--anchor", "patch")["texts"] == ar["texts"]

    from fastblt.io.export import save_export

    plain = config.replace(mask_embedding=False)
    plain_params = dict(params)
    plain_params["local_decoder"] = {
        k: v for k, v in params["local_decoder"].items() if k != "mask_embedding"
    }
    save_export(tmp_path / "plain", plain, plain_params)
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        cli.main(["sample", "--checkpoint", str(tmp_path / "plain"), "--prompt", "x", "--method", "blt_d"])
    assert "mask_embedding" in err.getvalue() and "not trained with BLT-D" in err.getvalue()


# blt_dv (alpha) and blt_s are checked row by row in the test above, on the batches it generates.
@pytest.mark.parametrize(
    "method,extra",
    [
        ("blt_d", dict(block_size=BLOCK, alpha=0.7)),
        ("blt_d", dict(block_size=BLOCK, one_step=True, anchor="patch")),
    ],
)
def test_a_batch_generates_and_counts_as_its_rows_alone(trained, method, extra):
    """Rows of different lengths batched together: each row's bytes and work counters equal those
    of the row generated alone (_same_as_rows_alone)."""
    _, cfg, config, params = trained
    prompts = _held_out_prompts(cfg, [5, 12, 20])
    kw = dict(**GEN, method=method, **extra)
    _same_as_rows_alone(params, config, prompts, generate(params, config, prompts, **kw), **kw)

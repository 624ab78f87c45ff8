"""Patch slots sized from the prompts' patches (fastblt.sampler.patch_slots): the count is the
prefill's, slots by hand, the same bytes as with one slot per buffer byte, a prompt that outruns its
slots generates nothing, and the caches' memory at BLT-1B's shapes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:
    from test_sampler_support import model, random_prompts
    from test_sampler_unmasking import d_model
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.test_sampler_support import model, random_prompts
    from tests.test_sampler_unmasking import d_model

from fastblt.model import BLT
from fastblt.sampler import api, encode_prompts, generate, methods, patch_slots, prepare
from fastblt.sampler.state import init_state


@pytest.fixture
def counting(monkeypatch):
    """Prompts' patches counted however small the slots (the tiny models' never reach 4 GiB)."""
    monkeypatch.setattr(patch_slots, "COUNT_FROM_BYTES", 0)


def _spy_compiled(monkeypatch) -> list:
    """Records (generation function, arguments) of every program prepare compiles."""
    seen = []
    real = api._compiled

    def spy(key, fn, args):
        seen.append((fn, args))
        return real(key, fn, args)

    monkeypatch.setattr(api, "_compiled", spy)
    return seen


def test_prompt_patches_are_what_the_prefill_completes(monkeypatch):
    """Entropy patching (the tiny model's median threshold, float32): the count, from the entropy model
    run over the whole prompts, equals ``completed`` after the sampler's chunked, cached prefill."""
    config, params = model("base")
    prompts = random_prompts(5, [3, 40, 130, 61])
    seen = _spy_compiled(monkeypatch)
    prepare(params, config, prompts, max_bytes=8, prefill_chunk=16)
    fn, args = seen[-1]
    completed = np.asarray(jax.jit(fn.start)(*args).st.completed)
    counts = patch_slots.prompt_patches(params, config, encode_prompts(prompts))
    np.testing.assert_array_equal(counts, completed)
    assert 20 < counts[2] < 131  # a real mix of patch lengths, not one per byte


def test_the_count_in_row_chunks_is_the_whole_batch_count(monkeypatch):
    """Five prompts counted two rows (128 bytes) at a time, the last chunk half empty: the counts equal
    the patches of the entropy model run over all rows at once, un-jitted (the chunks change only how
    many rows one pass holds)."""
    config, params = model("base")
    ids = encode_prompts(random_prompts(9, [3, 40, 110, 61, 17]))
    monkeypatch.setattr(patch_slots, "COUNT_CHUNK_BYTES", 2 * 128)
    shapes, real = [], patch_slots._prompt_patches

    def spy(config, params, tokens, length):
        shapes.append(tokens.shape)
        return real(config, params, tokens, length)

    monkeypatch.setattr(patch_slots, "_prompt_patches", spy)
    counts = patch_slots.prompt_patches(params, config, ids)
    assert shapes == [(3, 2, 128)]  # three chunks of two rows, one program
    tokens = np.zeros((len(ids), 128), np.int32)
    for i, x in enumerate(ids):
        tokens[i, : len(x)] = x
    length = jnp.asarray([len(x) for x in ids], jnp.int32)
    ent = BLT(config).apply({"params": params}, jnp.asarray(tokens), method=BLT.entropies)
    whole = patch_slots.committed_patches(config, jnp.asarray(tokens), ent, length)[2]
    np.testing.assert_array_equal(counts, np.asarray(whole))
    assert len(set(counts.tolist())) > 3  # the rows differ, so a mixed-up row would show


def test_static_patches_and_slots_by_hand(counting, monkeypatch):
    """4-byte static patches: BOS is patch 0, then patches start at bytes 1, 5, 9, ...; a 601-id prompt
    completes the patches starting at 1, 5, ..., 597 (150) plus BOS's: 151, and its next byte (601)
    opens a new one. Slots: 151 + 16 generated + 1 open + margin 32 + 601 // 32 = 218 -> 256, against
    one per byte of the 640-byte buffer (641) before."""
    config, params = model("base")
    pc = dataclasses.replace(config.patcher, mode="static", patch_size=4)
    config = config.replace(patcher=pc, max_bytes=1024)  # no weights depend on it
    ids = encode_prompts([b"a" * 600, b"b" * 10])
    assert patch_slots.prompt_patches(params, config, ids).tolist() == [151, 3]
    assert patch_slots.slots_needed(np.array([151, 3]), 601, 16) == 256
    program = prepare(params, config, [b"a" * 600, b"b" * 10], max_bytes=16)
    assert program.patch_slots == 256
    # Where one slot per byte is small, they are not counted (no program to compile for it).
    monkeypatch.setattr(patch_slots, "COUNT_FROM_BYTES", 4 * 2**30)
    assert prepare(params, config, [b"a" * 600, b"b" * 10], max_bytes=16).patch_slots == 641
    # An explicit max_patches is taken as given.
    assert prepare(params, config, [b"a" * 600], max_bytes=16, max_patches=700).patch_slots == 700


@pytest.mark.parametrize("method", ["ar", "blt_s", "blt_d"])
def test_counted_slots_give_the_bytes_of_one_slot_per_byte(method, counting):
    """A 300-byte prompt and a short one: the counted slots are far fewer than the buffer's bytes, and
    greedy bytes (float32) are those of the program with one slot per buffer byte (the old default)."""
    config, params = d_model("base") if method == "blt_d" else model("base")
    prompts = random_prompts(11, [300, 20])
    # A boundary after ~1 byte in 5 of the long prompt (entropies above their 80th percentile).
    ids = jax.numpy.asarray(encode_prompts(prompts)[0])[None]
    ent = np.asarray(BLT(config).apply({"params": params}, ids, method=BLT.entropies))[0, 1:]
    pc = dataclasses.replace(config.patcher, threshold=float(np.quantile(ent, 0.8)))
    config = config.replace(patcher=pc, max_bytes=1024)  # no weights depend on max_bytes
    kw = dict(method=method, max_bytes=24, prefill_chunk=64)
    counted = prepare(params, config, prompts, **kw)
    buffer = 384  # 301 + 24 rounded up to 64
    assert counted.patch_slots <= 2 * buffer // 3
    full = prepare(params, config, prompts, max_patches=buffer + 1, **kw)
    a, b = api.run_program(counted), api.run_program(full)
    for row in range(len(prompts)):
        assert len(a.ids[row]) == 24
        np.testing.assert_array_equal(a.ids[row], b.ids[row], err_msg=f"row {row}")


@pytest.mark.parametrize(
    "method,static,room",
    [
        ("ar", dict(record_logits=False), 0),  # its step stores the prefill's byte, then stops
        ("blt_s", dict(draft=4), 5),  # a verification chunk may complete draft + 1 patches
        ("blt_d", dict(block_size=4, rule="alpha", anchor="forced"), 4),  # its first block
    ],
)
def test_a_prompt_that_outruns_its_slots_generates_nothing(monkeypatch, method, static, room):
    """A program whose slots leave the long prompt no room for one round (as a count outrun by the
    prefill's rounding would leave it: one slot short of completed + the round's patches): that row
    generates no byte, instead of bytes read from unwritten slots (read as the last, clipped); the
    short row generates what it generates with one slot per byte."""
    config, params = d_model("base") if method == "blt_d" else model("base")
    prompts = random_prompts(3, [200, 9])
    seen = _spy_compiled(monkeypatch)
    kw = dict(block_size=4) if method == "blt_d" else dict(draft=4)
    good = generate(params, config, prompts, method=method, max_bytes=12, prefill_chunk=32, **kw)
    _, args = seen[-1]
    counts = patch_slots.prompt_patches(params, config, encode_prompts(prompts))
    n_patches = int(counts[0]) + room - 1  # one short: ar stores its first byte at completed == slots
    assert counts[1] + room + 12 < n_patches
    run = methods.get(method).build(
        config, n_bytes=256, n_patches=n_patches, prefill_chunk=32, greedy=True, exact_width=None, **static
    )
    out = jax.jit(run)(*args)
    assert out["generated"].tolist()[0] == 0
    lengths = [len(x) for x in encode_prompts(prompts)]
    got = np.asarray(out["tokens"])[1, lengths[1] : int(out["length"][1])]
    np.testing.assert_array_equal(got, good.ids[1])


def test_with_budget_stays_within_the_slots_it_was_sized_for():
    config, params = model("base")
    program = prepare(params, config, [b"hello"], max_bytes=8)
    assert program.with_budget(1).args[1].budget.tolist() == [1]
    with pytest.raises(ValueError, match="sized for at most 8 bytes per row; prepare it again"):
        program.with_budget(9)


def test_patch_slot_memory_at_blt_1b():
    """BLT-1B's shapes, batch 128, 4 000-byte prompts, 128 bytes to generate, 4-byte patches: 1 001
    patches a prompt, so 1 001 + 128 + 1 + 32 + 4 001 // 32 = 1 287 -> 1 344 slots instead of 4 225.
    The global model's keys and values (25 layers x 2 x 2 048 x 2 bytes) and the decoder's
    cross-attention slots (9 layers x 2 x k = 2 x 1 024 x 2 bytes) per row and slot, by hand:
    150.6 GB -> 47.9 GB at batch 128."""
    from experiments.blt_1b import BLT_1B

    config = BLT_1B.replace(patcher=dataclasses.replace(BLT_1B.patcher, mode="static", patch_size=4))
    counts = patch_slots.prompt_patches(None, config, [np.ones(4001, np.int32)] * 128)
    assert counts.tolist() == [1001] * 128
    slots = patch_slots.slots_needed(counts, 4001, 128)
    assert slots == 1344
    per_slot = (25 * 2 * 2048 * 2 + 9 * 2 * 2 * 1024 * 2) * 128

    def patch_bytes(n_patches):
        st = jax.eval_shape(lambda: init_state(config, 128, 4224, n_patches, ring_rows=256))
        arrays = (st.glob_k, st.glob_v, st.dec_ck, st.dec_cv)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(arrays))

    assert patch_bytes(4225) == per_slot * 4225  # 150.6 GB
    assert patch_bytes(slots) == per_slot * slots  # 47.9 GB
    # Counted at batch 128 (150.6 GB), not at batch 1 (1.2 GB: under COUNT_FROM_BYTES).
    assert patch_slots.slot_bytes(config, 1, 4225) == (per_slot // 128 + 1) * 4225  # + the EOS flags
    assert patch_slots.worth_counting(config, 128, 4224) and not patch_slots.worth_counting(config, 1, 4224)

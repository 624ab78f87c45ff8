"""The decode-step attention kernel (fastblt.model.decode_attention) in Pallas interpret mode against
a naive loop and the XLA reference path, its Triton lowering for CUDA, and its dispatch."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:
    from gpu_paths import cuda_text
    from test_attention import naive
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.gpu_paths import cuda_text
    from tests.test_attention import naive

from fastblt.model import attention as attn_lib
from fastblt.model import decode_attention as decode_lib
from fastblt.model.attention import attention, causal_mask
from fastblt.model.decode_attention import block_keys, decode_attention, key_splits, visible_range


def _case(b, t, n, h, kv, d=16, window=None, seed=0):
    """Queries at the buffer's last t positions of rows of different lengths, causal (and windowed)
    over a cache of n slots, one query with no visible key."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, n, kv, d)).astype(np.float32) for _ in range(2))
    lengths = np.linspace(t, n, b).astype(np.int32)  # row r holds lengths[r] bytes
    qpos = lengths[:, None] - t + np.arange(t, dtype=np.int32)[None]
    kpos = np.broadcast_to(np.arange(n, dtype=np.int32), (b, n))
    mask = np.array(causal_mask(jnp.asarray(qpos), jnp.asarray(kpos), window))
    mask[0, 0] = False
    return q, k, v, mask


@pytest.mark.parametrize(
    "b,t,n,h,kv,window,splits",
    [
        (2, 1, 37, 4, 4, None, 1),  # one query, keys not a whole block (the direct layout)
        (2, 2, 70, 3, 3, 16, 1),  # two queries of one head each, a window (the direct layout)
        (3, 1, 90, 8, 2, None, 1),  # one query's group of 4 heads (the direct layout)
        (2, 3, 200, 4, 2, 24, 1),  # grouped heads, a window: blocks before it are skipped
        (3, 2, 300, 2, 1, None, 3),  # key splits combined outside the kernel
        (2, 1, 1100, 2, 2, 40, None),  # the splits' own choice, some splits see nothing
        (2, 1, 1500, 2, 2, None, 4),  # a long causal prefix shared out among 4 splits
        (3, 2, 1000, 4, 2, 100, 3),  # a window shared out among 3 splits, its start within a block
    ],
)
def test_kernel_matches_naive_and_xla_path(b, t, n, h, kv, window, splits):
    q, k, v, mask = _case(b, t, n, h, kv, window=window)
    run = jax.jit(
        functools.partial(decode_attention, block_k=32, splits=splits, direct_rows=4, interpret=True)
    )
    out = np.asarray(run(q, k, v, jnp.asarray(mask)))
    np.testing.assert_allclose(out, naive(q, k, v, mask), atol=2e-5)
    np.testing.assert_allclose(out, np.asarray(attention(q, k, v, jnp.asarray(mask), "xla")), atol=2e-5)
    assert np.all(out[0, 0] == 0)  # no visible key: exactly 0


@pytest.mark.parametrize("h,kv", [(4, 2), (4, 4)])  # 16 zero-padded rows; the direct layout
def test_bf16_within_rounding_of_the_xla_path(h, kv):
    q, k, v, mask = (jnp.asarray(x) for x in _case(2, 2, 150, h, kv, d=64, window=64))
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = decode_attention(q, k, v, mask, direct_rows=4, interpret=True)
    assert out.dtype == jnp.bfloat16
    ref = attention(q, k, v, mask, "xla")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=3e-2)


def test_visible_range_and_block_keys_hand_worked():
    mask = np.zeros((3, 2, 10), bool)
    mask[0, 0, 2:5] = True
    mask[0, 1, 7] = True  # the row's range spans both queries: keys 2..7
    mask[2, 1, 9] = True
    lo, hi = visible_range(jnp.asarray(mask))
    assert lo.tolist() == [2, 0, 9] and hi.tolist() == [8, 0, 10]  # row 1 sees nothing: empty
    # 32 KB blocks of keys: 128 keys of bf16 x 64 or 128; 64 of float32 x 128 or of bf16 x 256.
    assert [block_keys(64, jnp.bfloat16), block_keys(128, jnp.bfloat16)] == [128, 128]
    assert [block_keys(128, jnp.float32), block_keys(256, jnp.bfloat16)] == [64, 64]


@pytest.mark.parametrize("splits,write", [(1, False), (3, False), (1, True), (3, True)])
def test_a_window_around_the_end_of_a_ring_cache(splits, write):
    """A ring cache's window runs past its last slot into its first: row 0 sees slots 250..299 and
    0..39 of 300, row 1 slots 45..299 and 0..39 (the two runs meet inside one block of 32 keys: it
    is read twice and must not count twice), row 2 nothing; split or not, and with the cache write;
    against the naive loop."""
    from fastblt.model.decode_attention import decode_attention_write
    from fastblt.sampler.state import scatter_rows

    rng = np.random.default_rng(3)
    b, t, n, h, d = 3, 2, 300, 2, 16
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, n, h, d)).astype(np.float32) for _ in range(2))
    mask = np.zeros((b, t, n), bool)
    mask[0, :, 250:] = mask[0, :, :40] = True
    mask[0, 0, 39] = False  # the queries' windows differ by one key
    mask[1, :, 45:] = mask[1, :, :40] = True
    lo, hi = visible_range(jnp.asarray(mask))
    assert lo.tolist() == [250, 45, 0] and hi.tolist() == [340, 340, 0]
    if write:
        cols = np.array([[38, 39], [168, 169], [0, 1]], np.int32)
        k_new, v_new = (rng.normal(size=(b, t, h, d)).astype(np.float32) for _ in range(2))
        run = functools.partial(
            decode_attention_write, block_k=32, splits=splits, direct_rows=4, interpret=True
        )
        out, kc, _ = jax.jit(run)(q, k_new, v_new, jnp.asarray(cols), k, v, jnp.asarray(mask))
        k = np.asarray(scatter_rows(jnp.asarray(k), jnp.asarray(cols), jnp.asarray(k_new)))
        v = np.asarray(scatter_rows(jnp.asarray(v), jnp.asarray(cols), jnp.asarray(v_new)))
        np.testing.assert_array_equal(np.asarray(kc), k)
    else:
        run = functools.partial(decode_attention, block_k=32, splits=splits, direct_rows=4, interpret=True)
        out = jax.jit(run)(q, k, v, jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out), naive(q, k, v, mask), atol=2e-5)
    assert np.all(np.asarray(out)[2] == 0)


@pytest.mark.parametrize("h,kv,ring", [(2, 2, False), (4, 2, False), (2, 2, True)])
def test_extra_keys_are_read_with_the_cache_and_nothing_is_written(h, kv, ring):
    """BLT-D's block over the decoder's cache: 4 queries see their cache window (on a ring, one that
    wraps past the last slot, read from its first key) and the extra keys ``extra_mask`` gives them;
    against the naive loop over the cache and the extra keys concatenated (their mask beside the
    cache's). Row 1 sees no cache key (its extra keys only), row 2's query 3 sees nothing (0); the
    caches are inputs only (the call returns no cache)."""
    from fastblt.model.decode_attention import decode_attention_extra

    rng = np.random.default_rng(8)
    b, t, n, d = 3, 4, 100, 16
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, n, kv, d)).astype(np.float32) for _ in range(2))
    ke, ve = (rng.normal(size=(b, t, kv, d)).astype(np.float32) for _ in range(2))
    mask = np.zeros((b, t, n), bool)
    first = None
    if ring:  # the window: slots 80..99, then 0..9
        mask[0, :, 80:] = mask[0, :, :10] = True
        mask[2, :, 85:] = mask[2, :, :5] = True
        first = jnp.array([80, 0, 85], jnp.int32)
    else:
        mask[0, :, 30:61] = True
        mask[2, :, 50:90] = True
    extra = np.tril(np.ones((t, t), bool))[None].repeat(b, 0)
    extra[1] = True  # row 1: every extra key, no cache key
    mask[2, 3] = extra[2, 3] = False  # row 2, query 3: nothing
    run = functools.partial(
        decode_attention_extra, block_k=32, direct_rows=4, interpret=True, first_key=first
    )
    out = np.asarray(jax.jit(run)(q, k, v, jnp.asarray(mask), ke, ve, jnp.asarray(extra)))
    cat = [np.concatenate([x, y], axis=1) for x, y in ((k, ke), (v, ve))]
    want = naive(q, *cat, np.concatenate([mask, extra], axis=2))
    np.testing.assert_allclose(out, want, atol=2e-5)
    assert np.all(out[2, 3] == 0)


def test_a_ring_read_from_its_first_key_sums_each_query_in_position_order():
    """Given the ring's first key, a query's output does not depend on what the other queries see:
    query 0's window (slots 50..63, 0..9 of 64) gives the same bits whether query 1 sees its own
    window or every slot (which leaves no key that opens a visible run), in float32 and bf16."""
    rng = np.random.default_rng(5)
    b, t, n, h, d = 1, 2, 64, 2, 16
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, n, h, d)).astype(np.float32) for _ in range(2))
    own = np.zeros((b, t, n), bool)
    own[0, 0, 50:] = own[0, 0, :10] = True
    own[0, 1, 51:] = own[0, 1, :11] = True
    every = own.copy()
    every[0, 1] = True
    first = jnp.array([50], jnp.int32)
    for dtype in (jnp.float32, jnp.bfloat16):
        run = functools.partial(decode_attention, block_k=16, direct_rows=4, interpret=True, first_key=first)
        a, c = (
            np.asarray(run(*(jnp.asarray(x, dtype) for x in (q, k, v)), jnp.asarray(m))) for m in (own, every)
        )
        np.testing.assert_array_equal(a[0, 0], c[0, 0])


def test_key_splits_hand_worked():
    # Batch 1, 16 kv heads, the global buffer of a 16 000-byte prompt: 8 splits of 2 048 keys.
    assert key_splits(16, 16193) == 8
    # Enough programs already (batch 32), or too few keys to split: one.
    assert key_splits(512, 16193) == 1
    assert key_splits(16, 320) == 1
    # 1 000 keys may split once (>= 512 per split): 2 splits of 512 (whole blocks of 128).
    assert key_splits(1, 1000) == 1 and key_splits(1, 1024) == 2
    # Sized for the keys a row can see: BLT-1B's entropy model at batch 1 (12 kv heads) over a
    # 4 224-byte buffer takes 7 splits (of 640 keys), but under its 512-byte window (one query) one.
    assert key_splits(12, 4224) == 7 and key_splits(12, 4224, visible_keys=512) == 1
    assert key_splits(1, 4224, visible_keys=2048) == 4 and key_splits(1, 300, visible_keys=2048) == 1


@pytest.mark.parametrize("splits,direct_rows", [(1, 4), (1, 0), (4, 4)])
def test_lowers_to_triton_for_cuda(splits, direct_rows):
    """The kernel lowers through Pallas' Triton backend for a GPU (every load a power of two, every
    op one Triton has), here on a CPU: BLT-1B's local layer shape in bf16, two queries."""
    q = jax.ShapeDtypeStruct((2, 2, 16, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 2100, 16, 64), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((2, 2, 2100), jnp.bool_)
    run = functools.partial(decode_attention, splits=splits, direct_rows=direct_rows, interpret=False)
    text = cuda_text(run, q, kv, kv, mask)
    assert text.count("xla.gpu.triton") == 1
    # The direct layout (one split, few rows): no query transposed or padded to 16 rows around it.
    wrapped = splits > 1 or direct_rows < 2
    assert ("stablehlo.pad" in text) == wrapped and ("stablehlo.transpose" in text) == wrapped


def test_the_sampler_program_lowers_for_cuda_with_one_kernel_per_attention(monkeypatch):
    """The whole ar program traced for a GPU with the kernel on lowers through Triton, one kernel per
    cached attention: 2 entropy-model layers, 1 encoder layer, its cross-attention, 2 global layers,
    2 decoder layers (the decoder's cross-attention gathers its own keys and stays on XLA)."""
    from test_sampler_support import model, random_prompts

    from fastblt.sampler import api, generate

    class Lowered(Exception):
        pass

    texts = []

    def lower_only(key, fn, args):
        texts.append(cuda_text(fn, *args))
        raise Lowered

    monkeypatch.setattr(attn_lib, "GPU_DECODE_KERNEL", "decode")
    monkeypatch.setattr(attn_lib, "decode_attention", functools.partial(decode_attention, interpret=False))
    write = functools.partial(decode_lib.decode_attention_write, interpret=False)
    monkeypatch.setattr(decode_lib, "decode_attention_write", write)  # on by default (WRITE_CACHE)
    monkeypatch.setattr(api, "_compiled", lower_only)
    config, params = model("heads16")
    with pytest.raises(Lowered):
        generate(
            params,
            config.replace(attention_impl="auto"),
            random_prompts(3, [5]),
            max_bytes=8,
            buffer_bytes=64,
        )
    assert _kernel_launches(texts[0]) == 8


def _kernel_launches(text: str) -> int:
    """Triton kernels a lowered module runs: each function's kernels times the times it is called,
    counted through nested private functions from main (a kernel of one shape is lowered once and
    called per layer, possibly from inside another private function)."""
    funcs = re.split(r"(?=^\s*func\.func )", text, flags=re.M)
    per_func = {}
    for f in funcs:
        name = re.match(r"\s*func\.func (?:public |private )?@([\w.$-]+)", f)
        if name:
            per_func[name.group(1)] = f

    @functools.cache
    def runs(name: str) -> int:  # how many times a function runs per call of main
        if name == "main":
            return 1
        call = re.compile(rf"call @{re.escape(name)}\(")
        sites = {caller: len(call.findall(body)) for caller, body in per_func.items() if caller != name}
        return sum(n * runs(caller) for caller, n in sites.items() if n)

    return sum(body.count("xla.gpu.triton") * runs(name) for name, body in per_func.items())


def test_auto_picks_the_kernel_for_gpu_decode_steps_only(monkeypatch):
    q = jnp.zeros((2, 1, 4, 16), jnp.bfloat16)
    k = jnp.zeros((2, 9, 2, 16), jnp.bfloat16)
    mask = jnp.ones((2, 1, 9), bool)
    monkeypatch.setattr(attn_lib, "GPU_DECODE_KERNEL", "decode")
    with attn_lib.target_platform("gpu"):
        assert attn_lib.resolve_impl("auto", q, kv_heads=2) == "decode"
        assert attn_lib.resolve_impl("auto", q) == "xla"  # no kv heads given: not considered
        # A LocalMask takes its own paths (a short one reaches the kernel as a dense mask).
        assert attn_lib.resolve_impl("auto", q, local=True, kv_heads=2) == "xla"
        assert attn_lib.resolve_impl("xla", q, kv_heads=2) == "xla"
        assert attn_lib.resolve_impl("auto", q[..., :12], kv_heads=2) == "xla"  # head dim 12
        assert attn_lib.resolve_impl("auto", jnp.zeros((2, 20, 16, 16)), kv_heads=2) == "xla"  # 160 rows
        jaxpr = str(jax.make_jaxpr(lambda *a: attention(*a, mask, "auto"))(q, k, k))
    assert "pallas_call" in jaxpr
    assert attn_lib.resolve_impl("auto", q, kv_heads=2) == "xla"  # CPU
    monkeypatch.setattr(attn_lib, "GPU_DECODE_KERNEL", "xla")
    with attn_lib.target_platform("gpu"):
        assert attn_lib.resolve_impl("auto", q, kv_heads=2) == "xla"


def test_gradient_through_the_kernel_is_the_xla_paths(monkeypatch):
    """A differentiated call that "auto" sends to the kernel gets the XLA path's gradient."""
    q, k, v, mask = (jnp.asarray(x) for x in _case(2, 2, 40, 4, 2, window=9))
    monkeypatch.setattr(attn_lib, "GPU_DECODE_KERNEL", "decode")

    def loss(impl, q, k, v):
        return jnp.sum(jnp.sin(attention(q, k, v, mask, impl)))

    with attn_lib.target_platform("gpu"):
        assert "pallas_call" in str(jax.make_jaxpr(functools.partial(loss, "auto"))(q, k, v))
        got = jax.grad(functools.partial(loss, "auto"), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["no_writes", "cache_write", "default", "default_blt_s", "split_keys"])
def test_greedy_ar_with_the_kernel_matches_naive(monkeypatch, variant):
    """The sampler traced for a GPU with decode steps on the kernel (interpreted here): every stack's
    cached attention, windowed reads included, gives the naive oracle's greedy bytes and logits: with
    XLA's scatters writing the caches, with the kernel writing them in its dot layout, and as by
    default (the arrays' own layouts, q, k and v read in place), where BLT-S's drafts and verification
    (scratch writes past the length) also give ar's greedy bytes. With splits down to 32 keys
    ("split_keys"), the global model's calls split its causal prefix, while the windowed local
    models' (windows of 12 and 16 bytes) stay one split and keep writing their caches (blocks of 16
    keys, so that the global model's 77 patch slots can split)."""
    from naive_sampler import naive_generate
    from test_sampler_support import model, random_prompts

    from fastblt.sampler import encode_prompts, generate

    monkeypatch.setattr(attn_lib, "GPU_DECODE_KERNEL", "decode")
    writes, kernel_starts = [], []
    real_once = decode_lib._attend_once

    calls, visible = [], []  # (splits, visible_keys, whether the kernel writes the cache) per call
    real_attend = decode_lib._attend

    def spy_attend(*args):
        visible.append(args[9])  # the static bound on the keys a row sees (None: the whole cache)
        return real_attend(*args)

    def spy_once(*args):
        kernel_starts.append(args[9])  # where q, k and v start in their arrays
        calls.append((args[6], visible.pop(), args[4] is not None))
        return real_once(*args)

    monkeypatch.setattr(decode_lib, "_attend", spy_attend)

    monkeypatch.setattr(decode_lib, "_attend_once", spy_once)
    if variant == "no_writes":
        monkeypatch.setattr(decode_lib, "MAX_DIRECT_ROWS", 0)
        monkeypatch.setattr(decode_lib, "WRITE_CACHE", False)
    if variant == "cache_write":
        monkeypatch.setattr(decode_lib, "MAX_DIRECT_ROWS", 0)
        monkeypatch.setattr(decode_lib, "WRITE_CACHE", True)
    if variant == "split_keys":
        monkeypatch.setattr(decode_lib, "MIN_SPLIT_KEYS", 32)
        monkeypatch.setattr(decode_lib, "BLOCK_K", 16)
        real_once.clear_cache()  # the kernel's traces of other tests were sized by the defaults
    real_write = decode_lib.decode_attention_write
    monkeypatch.setattr(
        decode_lib, "decode_attention_write", lambda *a, **k: writes.append(1) or real_write(*a, **k)
    )
    prompts = random_prompts(3, [5, 12])
    config, params = model("heads16")
    config = config.replace(attention_impl="auto")  # what a GPU run uses; "xla" pins the reference path
    # A buffer no other test compiles, so the program is traced here, for a GPU (and with the patched
    # split size, which the sampler's program cache does not key on).
    pad = 76 if variant == "split_keys" else 72
    with attn_lib.target_platform("gpu"):
        jaxpr_calls = []
        real = attn_lib.decode_attention
        monkeypatch.setattr(
            attn_lib, "decode_attention", lambda *a, **k: jaxpr_calls.append(1) or real(*a, **k)
        )
        method = {"method": "blt_s", "draft": 4} if variant.endswith("blt_s") else {"record_logits": True}
        result = generate(params, config, prompts, max_bytes=30, buffer_bytes=pad, prefill_chunk=4, **method)
    assert jaxpr_calls  # the kernel was traced
    assert bool(writes) == (variant != "no_writes")  # and the cache-writing one where it is on
    # The direct layout's writes read q, k and v in place (views of the layers' products) somewhere.
    assert any(starts != (0, 0, 0) for starts in kernel_starts) == (
        variant not in ("no_writes", "cache_write")
    )
    if variant == "split_keys":
        # The global model's calls split, and write their caches (the first split does).
        assert any(splits > 1 and wrote for splits, visible, wrote in calls if visible is None)
        windowed = [(splits, wrote) for splits, visible, wrote in calls if visible is not None]
        assert windowed and all(splits == 1 for splits, _ in windowed) and any(w for _, w in windowed)
    ids, logits = naive_generate(params, config, encode_prompts(prompts), 30, pad_to=pad)
    for row in range(len(prompts)):
        np.testing.assert_array_equal(result.ids[row], ids[row], err_msg=f"row {row}")
        if "record_logits" in method:
            np.testing.assert_allclose(
                result.logits[row], logits[row], atol=1e-4, rtol=0, err_msg=f"row {row}"
            )


@pytest.mark.parametrize(
    "t,h,kv,direct_rows,views,splits",
    [
        (1, 4, 4, 4, False, 1),  # one query of one head per kv head: the direct layout
        (2, 2, 2, 4, False, 1),  # two queries, the second column inert (written nowhere, seen by no one)
        (2, 4, 2, 0, False, 1),  # grouped heads in 16 zero-padded rows (Triton dots)
        (1, 4, 4, 4, True, 1),  # q, k and v as heads of one q|k|v array, read in place
        (2, 2, 2, 4, True, 1),
        (2, 4, 2, 4, True, 1),  # grouped heads: not read in place, cut out first
        (2, 2, 2, 4, False, 3),  # key splits: the first writes and counts the new keys
        (1, 4, 4, 4, True, 2),  # key splits given views: cut out (the direct layout is one split's)
    ],
)
def test_kernel_writes_the_cache_as_a_scatter_then_attends(t, h, kv, direct_rows, views, splits):
    """decode_attention_write equals scatter_rows of the new keys and values (the sampler's write)
    followed by the naive loop over the written caches, and leaves every other cache entry alone;
    also given q, k and v as HeadViews of one array (the sampler's layer product), and over key splits
    (rows 1 and 2: the new keys lie in the last split's blocks, not in the first, which writes them)."""
    from fastblt.model.decode_attention import HeadView, decode_attention_write
    from fastblt.sampler.state import scatter_rows

    b, n, d = 3, 70, 16
    rng = np.random.default_rng(1)
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k_new, v_new = (rng.normal(size=(b, t, kv, d)).astype(np.float32) for _ in range(2))
    k_cache, v_cache = (rng.normal(size=(b, n, kv, d)).astype(np.float32) for _ in range(2))
    lengths = np.array([t, 40, n])  # row r's new bytes end at lengths[r]; the cache holds earlier ones
    cols = lengths[:, None] - t + np.arange(t)[None]
    if t == 2:
        cols[1, 1] = n + 5  # an inert column: out of range, its key and value garbage
        k_new[1, 1], v_new[1, 1] = np.nan, np.nan
    qpos = np.where(cols < n, cols, cols[:, :1])
    mask = np.array(causal_mask(jnp.asarray(qpos), jnp.asarray(np.broadcast_to(np.arange(n), (b, n))), 24))
    mask[0, 0] = False  # a query that sees nothing, its own new key included
    write = functools.partial(
        decode_attention_write, block_k=16, splits=splits, direct_rows=direct_rows, interpret=True
    )
    if views:  # q and k as heads of one array, v of another behind a spare head (the sampler's way)
        spare = rng.normal(size=(b, t, 1, d)).astype(np.float32)
        qk, vs = np.concatenate([q, k_new, spare], axis=2), np.concatenate([spare, v_new], axis=2)

        def run(qk, vs, *rest):
            return write(HeadView(qk, 0, h), HeadView(qk, h, kv), HeadView(vs, 1, kv), *rest)

        first = (qk, vs)
    else:
        run, first = write, (q, k_new, v_new)
    out, kc, vc = (
        np.asarray(x) for x in jax.jit(run)(*first, jnp.asarray(cols, jnp.int32), k_cache, v_cache, mask)
    )
    want_k = np.asarray(scatter_rows(jnp.asarray(k_cache), jnp.asarray(cols), jnp.asarray(k_new)))
    want_v = np.asarray(scatter_rows(jnp.asarray(v_cache), jnp.asarray(cols), jnp.asarray(v_new)))
    np.testing.assert_array_equal(kc, want_k)
    np.testing.assert_array_equal(vc, want_v)
    np.testing.assert_allclose(out, naive(q, want_k, want_v, mask), atol=2e-5)
    assert np.all(out[0, 0] == 0)


@pytest.mark.parametrize("direct_rows,n,d", [(4, 320, 64), (0, 320, 64), (4, 4225, 128)])
def test_the_cache_writing_kernel_lowers_to_triton_for_cuda(direct_rows, n, d):
    """decode_attention_write at BLT-1B's local layer shape, and at its global model's over a 4 225-slot
    buffer at batch 1 (8 key splits), lowers through Triton for a GPU as one kernel whose outputs
    alias the caches, with no scatter left to XLA."""
    from fastblt.model.decode_attention import decode_attention_write, key_splits

    b = 2 if n == 320 else 1
    assert (key_splits(b * 16, n) > 1) == (n > 320)
    q = jax.ShapeDtypeStruct((b, 2, 16, d), jnp.bfloat16)
    new = jax.ShapeDtypeStruct((b, 2, 16, d), jnp.bfloat16)
    cols = jax.ShapeDtypeStruct((b, 2), jnp.int32)
    cache = jax.ShapeDtypeStruct((b, n, 16, d), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((b, 2, n), jnp.bool_)
    run = functools.partial(decode_attention_write, direct_rows=direct_rows, interpret=False)
    text = cuda_text(run, q, new, new, cols, cache, cache, mask)
    assert text.count("xla.gpu.triton") == 1 and "stablehlo.scatter" not in text
    assert "output_operand_alias" in text or "output_operand_aliases" in text


def test_the_extra_keys_kernel_lowers_to_triton_for_cuda():
    """decode_attention_extra at BLT-1B's decoder shape (a block of 4 cells, batch 32) lowers through
    Triton for a GPU as one kernel that writes no cache: no output aliases a cache (which would make
    XLA copy each layer's cache before the call), no concatenation or gather left to XLA."""
    from fastblt.model.decode_attention import decode_attention_extra

    q = jax.ShapeDtypeStruct((32, 4, 16, 64), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((32, 515, 16, 64), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((32, 4, 515), jnp.bool_)
    own = jax.ShapeDtypeStruct((32, 4, 4), jnp.bool_)
    run = functools.partial(decode_attention_extra, interpret=False)
    text = cuda_text(run, q, cache, cache, mask, q, q, own)
    assert text.count("xla.gpu.triton") == 1
    assert "output_operand_alias" not in text
    assert not re.search(r"stablehlo\.(concatenate|gather)[^\n]*x64xbf16", text)  # of keys or values


def test_head_view_bounds_and_cut_out():
    """A view's heads must lie inside its array; cut out, they are the array's heads start..start+count."""
    from fastblt.model.decode_attention import HeadView, cut_out

    x = jnp.arange(2 * 1 * 5 * 2).reshape(2, 1, 5, 2)
    np.testing.assert_array_equal(cut_out(HeadView(x, 1, 3)), np.asarray(x)[:, :, 1:4])
    assert HeadView(x, 1, 3).shape == (2, 1, 3, 2)
    with pytest.raises(ValueError, match="heads 4 .. 6"):
        HeadView(x, 4, 2)


@pytest.mark.parametrize("direct_rows", [4, 0])
def test_head_views_are_read_in_place_in_the_direct_layout(direct_rows):
    """Given q, k and v as HeadViews of one q|k|v product, the cache-writing kernel lowers for a GPU
    with no slice of the product left to XLA in the direct layout (every slice is a copy kernel in
    front of a Pallas call), and cuts them out otherwise."""
    from fastblt.model.decode_attention import HeadView, decode_attention_write

    qkv = jax.ShapeDtypeStruct((2, 2, 48, 64), jnp.bfloat16)
    cols = jax.ShapeDtypeStruct((2, 2), jnp.int32)
    cache = jax.ShapeDtypeStruct((2, 320, 16, 64), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((2, 2, 320), jnp.bool_)

    def run(qkv, *rest):
        views = HeadView(qkv, 0, 16), HeadView(qkv, 16, 16), HeadView(qkv, 32, 16)
        return decode_attention_write(*views, *rest, direct_rows=direct_rows, interpret=False)

    text = cuda_text(run, qkv, cols, cache, cache, mask)
    assert text.count("xla.gpu.triton") == 1 and "stablehlo.scatter" not in text
    cuts = [
        line for line in text.splitlines() if "stablehlo.slice" in line and "tensor<2x2x48x64xbf16>" in line
    ]
    assert len(cuts) == (0 if direct_rows else 3)


def test_decode_check_script_passes_the_kernel_and_catches_a_wrong_one(monkeypatch, tmp_path):
    """experiments/benchmarks/decode_check.py (the GPU's check of the compiled kernel before a speed
    run) passes every layout here (interpreted), and flags a kernel whose row repeats come back wrong."""
    from experiments.benchmarks import decode_check
    from fastblt.model import decode_attention as decode_lib

    assert decode_check.main(["--small", "--out", str(tmp_path)]) == 0
    assert "extra" in decode_check.LAYOUTS
    assert len((tmp_path / "decode_check.jsonl").read_text().splitlines()) == 4 * 5  # shapes x layouts
    real = decode_lib._untile
    monkeypatch.setattr(
        decode_lib, "_untile", lambda x, copies: real(x, copies) * (1.01 if copies > 1 else 1.0)
    )
    decode_lib._attend_once.clear_cache()  # programs traced with the real _untile
    try:
        bad = decode_check.check_case(decode_check.SMALL[0], "write_direct_views", interpret=True)
        bad_extra = decode_check.check_case(decode_check.SMALL[0], "extra", interpret=True)
        good = decode_check.check_case(decode_check.SMALL[0], "dot", interpret=True)
    finally:
        decode_lib._attend_once.clear_cache()  # and none with the wrong one left for other tests
    assert bad["rel_error"] > 1e-3 and bad_extra["rel_error"] > 1e-3 and good["rel_error"] < 1e-5

"""BLT-D generation (Fast BLT §3.1, Algorithm 1) and BLT-DV (§3): one jitted ``lax.while_loop``.

Per block (B = ``block_size`` cells at positions ``L .. L + B - 1`` after the committed prefix of
length L):

1. the caches hold the prefix (encoder, global model, decoder clean rows): the :meth:`Runner.extend`
   that appended the previous block (the prefill for the first). Block cells read o_M, the latent of
   the prefix's last patch *closed at byte L - 1* (Algorithm 1 re-patches the whole prefix per block;
   training reads the patch that ends right before the block): where the patcher left that patch
   open, its latent is computed as scratch (one global step): by :func:`close_last_patch` for the
   first block and every BLT-DV round, and for later BLT-D blocks inside the global call of the
   extend that committed the previous block (:meth:`Runner.extend_closed`);
2. decoder passes over the block (:func:`block_logits`): a revealed cell's input is
   ``local_encoder.tok_embeddings[byte]``, a masked one ``local_decoder.mask_embedding`` (as in
   training, fastblt.model.block_rows); cells attend the cached clean decoder rows ``c < L`` within the
   decoder window (``j - c < window``) and in the document of byte ``L - 1``, plus the whole block
   (bidirectional), and cross-attend o_M. Each pass reveals masked cells by a rule (:func:`reveal`,
   fastblt.sampler.rules: confidence ``alpha``, entropy bound ``gamma``, all at once ``one_step``),
   always at least one;
3. ``blt_d``: the block is committed (cut at EOS / the byte budget / a full buffer) and appended with
   :meth:`Runner.extend_closed`. ``blt_dv`` (as the paper runs it): the AR prediction of byte L (the
   previous round's correction or free byte) is appended first (one extend), then a full block of B
   cells at ``L + 1 .. L + B`` is drafted by diffusion and verified as in BLT-S (one extend over it,
   accept to the first mismatch with the greedy next-byte prediction, plus the free byte): up to
   B + 1 bytes per round, and its greedy output is the ``ar`` greedy output.

Anchors (``anchor``): ``"forced"`` is Algorithm 1 above (every block starts where the last ended and
closes the prefix's last patch there). Training never shows the decoder such a latent: its blocks
start at natural patch starts and read the patch that the patcher closed right before them.
``"patch"`` keeps generation in that layout: where the patcher has left the prefix's last patch open
(byte L does not start a patch; the patcher decides that from the bytes before L), the block starts
at that patch's first byte s < L and reads the latent before it (already cached); the bytes
``s .. L - 1`` are revealed cells of the block, as an unmasked cell in training, and the block
writes ``B - (L - s)`` new bytes. Where the open patch already holds B bytes or more (or an EOS),
the block falls back to the forced closure. The cost: fewer bytes per block, so more blocks. For
``blt_dv`` the prefix includes the round's AR byte, so a round drafts ``B - (L + 1 - s)`` bytes.

Counters (fastblt.sampler.cost): ``blt_d``: ``decoder_passes`` = diffusion passes, ``eg_passes`` =
``rounds`` = blocks (the paper's one E/G pass per block: here the extend that commits the previous
block plus the forced closure), ``clean_passes`` = the extends' decoder passes over the committed
blocks (which the paper does not count). ``blt_dv``: per round s diffusion passes + 2 (the first
byte's extend and the verify pass); E/G passes = those two extends + the forced closure where one
was needed (the paper counts 2 per round: ``paper_eg_passes``); ``drafted`` += the drafted cells
(B with ``anchor="forced"``). With ``anchor="patch"``, ``blt_d``'s ``eg_passes`` also count the
fallback closures.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastblt.config import ModelConfig
from fastblt.model import decode_attention as decode_kernel
from fastblt.model import patcher as patching
from fastblt.model.attention import attention, document_ids, resolve_impl
from fastblt.sampler.cached import Runner
from fastblt.sampler.decoding import Call, Loop, decode
from fastblt.sampler.local_cache import context_mask, window_span, window_start
from fastblt.sampler.rules import ANCHORS, RULES
from fastblt.sampler.sampling import sample_logits, step_keys
from fastblt.sampler.speculative import commit_verified, cut_at_eos, greedy_accepted
from fastblt.sampler.state import State, cache_slots, gather_layer_rows, gather_rows, read_layer
from fastblt.tokenizer import EOS


def check_mask_embedding(config: ModelConfig) -> None:
    if not config.mask_embedding:
        raise ValueError(
            "BLT-D generation needs model.mask_embedding=True (the learned [MASK] input "
            "local_decoder.mask_embedding): this checkpoint was not trained with BLT-D"
        )


# Whether a diffusion pass on the decode kernel reads the decoder's cache in place with the block's
# own keys beside it (decode_attention_extra) instead of gathering the window's rows and concatenating
# the block's keys per layer. False: the gathered form (generate_speed.py --no-block-in-place; the
# XLA path always takes it).
BLOCK_IN_PLACE = True


def block_logits(runner: Runner, st: State, tokens, masked, start, read) -> jax.Array:
    """One decoder pass over a block of cells after each row's committed prefix.

    Args: tokens: int32[b, B] cell bytes (ignored where masked); masked: bool[b, B];
      start: int32[b] (= L, the block's first position); read: int32[b] latent the cells read.

    Returns: float32[b, B, V], cell j's logits predict its own byte (unshifted).
    """
    m = runner.config
    b, bs = tokens.shape
    n = st.tokens.shape[1]
    window = m.decoder.window
    h = runner.blt.block_inputs(tokens, masked)
    pos = start[:, None] + jnp.arange(bs, dtype=jnp.int32)[None]  # [b, B]
    # The clean rows a pass reads (R of them): on a long buffer only the decoder window before the
    # block, as the cached decode steps read it, not all N rows. Each layer concatenates them with the
    # block's own keys, and that copy of the whole cache made a pass at batch 32 and a 4 000-byte
    # prompt cost 3.15x its 64-byte pass (generate_speed.md, "BLT-D's diffusion passes read the
    # decoder window").
    # A ring cache (fastblt.sampler.state.ring_slots) holds the same rows at their slots.
    slots = cache_slots(st.dec_k)
    ring = slots < n
    span = window + bs - 1 if ring else window_span(n, bs, window)
    if ring:  # positions before 0: none, masked below
        if span > slots:
            raise ValueError(f"a block of {bs} cells does not fit the decoder's ring of {slots} slots")
        rows = (start - (window - 1))[:, None] + jnp.arange(span, dtype=jnp.int32)[None]
    elif span is None:
        rows = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))  # R = N
    else:
        rows = window_start(start, window, n, span)[:, None] + jnp.arange(span, dtype=jnp.int32)[None]
    c = rows[:, None, :]  # clean rows' positions [b, 1, R]
    ctx = (c >= 0) & (c < start[:, None, None])
    if window is not None:
        ctx &= pos[:, :, None] - c < window
    if m.document_masking:
        docs = document_ids(st.tokens)
        prefix_doc = gather_rows(docs, (start - 1)[:, None])  # [b, 1]
        row_docs = docs if span is None else gather_rows(docs, rows)  # [b, R]
        ctx &= (row_docs == prefix_doc)[:, None, :]
    mask = jnp.concatenate([ctx, jnp.ones((b, bs, bs), bool)], axis=2)  # [b, B, R + B]
    impl = m.attention_impl
    # On the decode kernel the cache is read in place, as of the prefix's end, with the block's own
    # keys beside it: no per-layer gather and concatenation (0.25 of blt_d4's 1.94 ms per pass at
    # BLT-1B, batch 32: generate_speed.md, run 22).
    visible = None if window is None else window + bs - 1
    in_place = context_mask(st.tokens, start, pos, window, m.document_masking, slots)  # [b, B, S]
    first = jnp.mod(start - (window - 1), slots) if ring else None
    own = jnp.ones((b, bs, bs), bool)

    def clean(stack, i):
        if span is None:
            return read_layer(stack, i)
        return gather_layer_rows(stack, i, jnp.mod(rows, slots) if ring else rows)

    def attend_of(i, caches):
        def attend(q, k, v):  # the cached clean rows, then the block's own cells
            kernel = BLOCK_IN_PLACE and resolve_impl(impl, q, kv_heads=k.shape[2]) == "decode"
            if (
                kernel
                and isinstance(st.dec_k, tuple)
                and decode_kernel.extra_supported(q, st.dec_k[i], visible)
            ):
                o = decode_kernel.decode_attention_extra(
                    q, st.dec_k[i], st.dec_v[i], in_place, k, v, own, visible_keys=visible, first_key=first
                )
                return o, caches
            ck, cv = clean(st.dec_k, i), clean(st.dec_v, i)
            keys = jnp.concatenate([ck, k.astype(ck.dtype)], axis=1)
            vals = jnp.concatenate([cv, v.astype(cv.dtype)], axis=1)
            return attention(q, keys, vals, mask, impl), caches

        return attend

    logits, _ = runner.decoder_layers(st, h, pos, jnp.broadcast_to(read[:, None], (b, bs)), attend_of)
    return logits


def reveal(logits, masked, rule: str, value, pred=None) -> tuple[jax.Array, jax.Array]:
    """Which masked cells to reveal and their bytes.

    Args: logits: float32[b, B, V]; masked: bool[b, B]; rule: a name of
      :data:`fastblt.sampler.rules.RULES`; value: float32[] the rule's value; pred: int32[b, B] the
      cells' bytes if sampled (None: greedy, the argmax). The rule always reads the model's own
      distribution (confidence, entropy), whatever the bytes were drawn from. At least one cell is
      revealed where a row has masked cells.

    Returns: (reveal bool[b, B], bytes int32[b, B]).
    """
    if pred is None:
        pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not one of {tuple(RULES)}")
    pick, best = RULES[rule].pick(logits, masked, value)
    if best is None:
        return pick, pred
    one = jax.nn.one_hot(best, masked.shape[1], dtype=bool) & masked
    return pick | one, pred


def close_last_patch(runner: Runner, st: State) -> tuple[State, jax.Array, jax.Array]:
    """The latent o_M that block cells read: the last patch forced closed at the prefix's end.

    As in Algorithm 1 (every block re-runs E and G over the whole prefix, so its last patch ends at
    byte L - 1) and as in training, where a block reads the latent of the patch that ends right
    before it. Where the patcher has left the last patch open (byte L does not start a patch), its
    latent over bytes ``start .. L - 1`` is computed into patch slot ``completed`` as scratch: the
    global KV and latent at that slot are overwritten when the patch really completes (the
    :meth:`Runner.latents` of a later extend), and no committed byte reads the slot before that.

    Returns: (state, read int32[b]: the patch slot block cells read, forced bool[b]: a patch was
    closed early).
    """
    byte_pid, _, completed = runner.patches(st.tokens, st.entropies, st.length)
    forced, read = runner.closed_last_patch(byte_pid, st.length, completed)
    return _close(runner, st, byte_pid, completed, forced), read, forced


def _close(runner: Runner, st: State, byte_pid, completed, forced) -> State:
    """The latent of each ``forced`` row's open last patch, closed at byte L - 1, into patch slot
    ``completed`` as scratch (one global step, skipped when no row needs it)."""
    return jax.lax.cond(
        jnp.any(forced),
        lambda s: runner.latents(s, s.tokens, byte_pid, completed, forced.astype(jnp.int32), 1),
        lambda s: s,
        st,
    )


def patch_anchor(runner: Runner, st: State, block_size: int, active: jax.Array):
    """Where the next block starts with ``anchor="patch"`` (module docstring), and its first cells.

    Returns: (state, start int32[b]: the block's first position, read int32[b]: the latent its
    cells read, tokens int32[b, B]: the known bytes ``start .. L - 1`` then 0, masked bool[b, B]:
    the cells to generate (none where the row is not ``active``), known int32[b]: L - start,
    forced bool[b]: the row fell back to closing its last patch at L (one more global step)).
    """
    n = st.tokens.shape[1]
    j = jnp.arange(block_size, dtype=jnp.int32)[None]
    byte_pid, _, completed = runner.patches(st.tokens, st.entropies, st.length)
    open_last, read = runner.closed_last_patch(byte_pid, st.length, completed)
    # the open patch's first byte: the bytes of the patches before it
    first = jnp.sum((byte_pid >= 0) & (byte_pid < read[:, None]), axis=1, dtype=jnp.int32)
    known = jnp.where(open_last, st.length - first, 0)
    cols = (st.length - known)[:, None] + j
    tokens = jnp.where(j < known[:, None], gather_rows(st.tokens, jnp.minimum(cols, n - 1)), 0)
    # A known EOS would put a document boundary inside the block, which training never shows.
    back = open_last & (known < block_size) & ~jnp.any(tokens == EOS, axis=1)
    forced = open_last & ~back & active
    known = jnp.where(back, known, 0)
    tokens = jnp.where(back[:, None], tokens, 0)
    read = jnp.where(back, patching.latent_index(read), read)
    st = _close(runner, st, byte_pid, completed, forced)
    masked = active[:, None] & (j >= known[:, None])
    return st, st.length - known, read, tokens, masked, known, forced


def _unmask(runner, st, tokens, masked, start, read, rule, value, draw=None):
    """Decoder passes until no cell is masked. ``draw(logits, passes) -> int32[b, B]`` samples the
    cells' bytes (None: greedy). Returns (tokens, passes int32[b])."""

    def cond(c):
        return jnp.any(c[1])

    def body(c):
        tokens, masked, passes = c
        lg = block_logits(runner, st, tokens, masked, start, read)
        pred = None if draw is None else draw(lg, passes)
        pick, pred = reveal(lg, masked, rule, value, pred)
        passes = passes + jnp.any(masked, axis=1)
        return jnp.where(pick, pred, tokens), masked & ~pick, passes

    passes = jnp.zeros((tokens.shape[0],), jnp.int32)
    tokens, _, passes = jax.lax.while_loop(cond, body, (tokens, masked, passes))
    return tokens, passes


def build_blt_d(
    config: ModelConfig,
    *,
    n_bytes: int,
    n_patches: int,
    prefill_chunk: int,
    block_size: int,
    rule: str,
    verify: bool = False,
    greedy: bool = True,
    exact_width: int | None = None,
    anchor: str = "forced",
):
    """The BLT-D (``verify=False``) or BLT-DV (``verify=True``, greedy only) generation function (to
    be jitted): :func:`fastblt.sampler.decoding.decode` with one block per round.

    ``run(params, prompts, rule_params, seed, temperature, top_p) -> dict``; rule_params:
    fastblt.sampler.methods.RuleParams (the rule's value, see :func:`reveal`). ``greedy=False``
    (BLT-D): revealed bytes are drawn with temperature and top-p (the paper's EB + top-p sampling
    with ``rule="gamma"``), the cell at position ``p`` in decoder pass ``s`` of its block with the
    key of :func:`fastblt.sampler.sampling.step_keys` for (row, ``p * (B + 1) + s``).
    ``exact_width`` (BLT-DV only): the exact mode's step width, at least ``block_size``.
    ``anchor``: where blocks start, one of fastblt.sampler.rules.ANCHORS (module docstring).
    """
    check_mask_embedding(config)
    if block_size < 1 or (verify and block_size < 2):
        raise ValueError(f"block_size={block_size} must be >= 1 (>= 2 for blt_dv)")
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not one of {tuple(RULES)}")
    if anchor not in ANCHORS:
        raise ValueError(f"anchor={anchor!r} is not one of {ANCHORS}")
    if verify and not greedy:
        raise ValueError("BLT-DV verifies greedily: sampling is for BLT-D (verify=False)")
    if exact_width is not None and (not verify or block_size > exact_width):
        raise ValueError(
            f"exact_width={exact_width}: the exact mode is for BLT-DV with block_size <= exact_width "
            f"(got verify={verify}, block_size={block_size})"
        )
    bs = block_size

    def init(call: Call, loop: Loop) -> Loop:
        # BLT-D: the first block's o_M here; each commit's extend closes the next one's (one global
        # call per block). BLT-DV closes at the top of each round: its verify pass may roll back.
        if anchor == "forced":
            st, read, _ = close_last_patch(call.runner, loop.st)
            return loop._replace(st=st, extra=read)
        return loop._replace(extra=jnp.zeros_like(loop.generated))  # each block finds its own

    def step(call: Call, loop: Loop) -> Loop:
        st, logits, done, generated, counters, read = loop
        runner, prompts = call.runner, call.prompts
        value = call.rule_params.value
        seed, temperature, top_p = call.seed, call.temperature, call.top_p
        b = logits.shape[0]
        active = ~done
        a = active.astype(jnp.int32)
        start = st.length
        block_start = start
        if verify:
            # The AR byte of position L (the last round's correction or free byte) is appended
            # first (the paper's second E/G pass of a round), then a full block of B cells is
            # diffused after it: a round can commit up to B + 1 bytes.
            first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            st, first_logits, _ = runner.extend(st, first[:, None], a)
        # known: bytes before the new cells that the block holds (anchor="patch"); fell_back:
        # rows whose last patch was closed early for this block (one more global step).
        known, fell_back = jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool)
        if anchor == "patch":
            st, block_start, read, tokens, masked, known, fell_back = patch_anchor(runner, st, bs, active)
        else:
            if verify:
                st, read, fell_back = close_last_patch(runner, st)
                fell_back &= active
                block_start = start + 1
            tokens = jnp.zeros((b, bs), jnp.int32)
            masked = jnp.broadcast_to(active[:, None], (b, bs))
        draw = None
        if not greedy:

            def draw(lg, passes):
                cols = block_start[:, None] + jnp.arange(bs, dtype=jnp.int32)[None]  # [b, B]
                rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, bs))
                keys = step_keys(seed, rows.reshape(-1), (cols * (bs + 1) + passes[:, None]).reshape(-1))
                flat = sample_logits(lg.reshape(b * bs, -1), keys, temperature, top_p, greedy=False)
                return flat.reshape(b, bs)

        tokens, passes = _unmask(runner, st, tokens, masked, block_start, read, rule, value, draw)
        limit = jnp.minimum(prompts.budget - generated, n_bytes - start)
        # the new bytes: the cells after the known ones (all B of them with anchor="forced")
        new = gather_rows(tokens, known[:, None] + jnp.arange(bs, dtype=jnp.int32)[None])

        if not verify:
            commit, hit = cut_at_eos(new, jnp.minimum(bs - known, limit), prompts.stop_at_eos)
            commit = jnp.where(active, commit, 0)
            if anchor == "patch":
                st, _, _ = runner.extend(st, new, commit)
            else:
                st, _, _, read = runner.extend_closed(st, new, commit)
            finish = ((commit >= limit) | hit | (st.completed + bs > n_patches)) & active
            go = (active & ~finish).astype(jnp.int32)
            counters = counters.add(
                decoder_passes=passes,
                eg_passes=go + fell_back,
                entropy_passes=a,
                rounds=a,
                clean_passes=a,  # the extend's decoder pass over the block
            )
            return Loop(st, logits, done | finish, generated + commit, counters, read)

        drafted = a * (bs - known)
        st, verify_logits, _ = runner.extend(st, new, drafted)
        # Verified as one chunk [first, d_1 .. d_r]: d_1 against the prediction after `first`.
        chunk = jnp.concatenate([first[:, None], new], axis=1)
        pred_logits = jnp.concatenate([first_logits[:, :1], verify_logits], axis=1)
        accepted = jnp.minimum(greedy_accepted(chunk, pred_logits), bs - known)
        st, next_logits, commit, finish = commit_verified(
            runner, st, chunk, pred_logits, accepted, start, limit, prompts.stop_at_eos, active, bs + 1
        )
        counters = counters.add(
            decoder_passes=passes + 2 * a,
            eg_passes=2 * a + fell_back,
            entropy_passes=2 * a,
            drafted=drafted,
            accepted=a * accepted,
            rounds=a,
        )
        logits = jnp.where(active[:, None], next_logits, logits)
        return Loop(st, logits, done | finish, generated + commit, counters, read)

    shape = dict(n_bytes=n_bytes, n_patches=n_patches, prefill_chunk=prefill_chunk, exact_width=exact_width)
    # BLT-D's first block does not read the prefill's logits: its decoder pass is not counted.
    # Ring caches (fastblt.sampler.state.ring_slots) must hold, for every query, the positions from
    # its window's start to the latest position written: appends are at most B wide (BLT-DV's AR byte
    # is its own append), and with anchor="patch" a block's cells start up to B - 1 bytes before the
    # length while BLT-DV's rejected drafts reach no further past the next block's start than B - 1.
    return decode(
        config,
        **shape,
        init=init,
        step=step,
        count_prefill_decoder=verify,
        step_rows=block_size,
        round_patches=block_size + int(verify),
    )

"""Incremental BLT: append bytes to a :class:`~fastblt.sampler.state.State` and get their logits.

:meth:`Runner.extend` appends a chunk of ``T`` bytes per row (each row at its own position) and runs
the efficient schedule of the architecture (blt-architecture.md §10, §6.3), which every component's
causality makes exact:

1. entropy model over the new bytes (its KV cache), giving their next-byte entropies;
2. the patcher (``fastblt.model.patcher.patch_start_mask``, the one place that decides boundaries)
   over the whole buffer: a byte's entropy decides whether the *following* byte opens a patch;
3. local encoder byte layers over the new bytes (KV caches; the byte states that the encoder's
   cross-attention pools and reads are kept per byte);
4. for every patch that the chunk *completed* (its last byte is known and the next byte opens a new
   patch): max-pool + cross-attention over exactly its bytes, then one global step per patch (global
   KV cache over patches). Skipped with ``lax.cond`` when no row completed a patch;
5. local decoder over the new bytes: byte ``t`` reads the latent of the last patch completed before
   byte ``t + 1`` (``fastblt.model.patcher.latent_index``, as the model's forward).

:meth:`Runner.draft_step` is the BLT-S drafter: encoder byte layers + decoder for one byte that read
a given (stale) latent; no entropy model, no patching, no global model.

Parameters are the model's own: ``BLT(config).bind(params)`` submodules (embeddings, cross-attention
projections, decoder head), and each stack's transformer layers in decode form (fastblt.sampler.fused:
q|k|v and w1|w3 fused once per generation), run by the model's own layer function
(fastblt.model.layers.transformer_layer) with the attention of :func:`cached_attend`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fastblt.config import ModelConfig
from fastblt.model import decode_attention as decode_kernel
from fastblt.model import patcher as patching
from fastblt.model.attention import Attend, attention, causal_mask, document_ids, resolve_impl
from fastblt.model.blt import BLT
from fastblt.model.layers import embed
from fastblt.sampler import fused
from fastblt.sampler.local_cache import ring_cols, ring_mask, window_rows, window_span, window_start
from fastblt.sampler.patch_slots import committed_patches
from fastblt.sampler.state import (
    Layers,
    State,
    cache_slots,
    decoder_cross_layers,
    encoder_cross_layers,
    gather_layer_rows,
    gather_rows,
    read_layer,
    replace_layer,
    scanned_stacks,
    scatter_rows,
    uses_entropy_model,
    write_all_layers,
    write_layer,
)
from fastblt.tokenizer import EOS

# Named scopes of the sampler's stages: profiles of a generation are split by them
# (fastblt.profiling.DECODE_RULES).
SCOPES = {
    "entropy": "sampler_entropy",
    "encoder": "sampler_encoder",
    "patcher": "sampler_patcher",
    "pool": "sampler_pool_cross",
    "global": "sampler_global",
    "decoder": "sampler_decoder",
}


def _seg_max(x: jax.Array, seg: jax.Array, p: int) -> jax.Array:
    """Per-row segment max: x [B, N, ...], seg int32[B, N] in [0, p] (p: dropped) -> [B, p, ...]."""
    return jax.vmap(lambda xi, si: jax.ops.segment_max(xi, si, num_segments=p))(x, seg)


# At most this many candidate patches are max-pooled by masked reductions over the byte buffer (one
# read of it per candidate) instead of a segment max over every patch: the segment max is a scatter
# over the whole buffer, 106 us per global step at BLT-1B and batch 32 on an H100, the top kernel of
# ar's step there (experiments/results/generate_speed.md, run 11). A decode step has 1-3 candidates;
# a prefill chunk, many.
MASKED_POOL_CANDIDATES = 4


def pool_patches(x: jax.Array, seg: jax.Array, cand: jax.Array, p: int) -> jax.Array:
    """Max over each candidate patch's bytes: x float[B, N, D], seg int32[B, N] (the byte's patch, p:
    none), cand int32[B, C] (clipped into [0, p)) -> float[B, C, D]; -inf for a patch without bytes.
    Equal to ``gather_rows(_seg_max(x, seg, p), cand)``; few candidates take masked reductions."""
    if cand.shape[1] > MASKED_POOL_CANDIDATES:
        return gather_rows(_seg_max(x, seg, p), cand)
    hit = seg[:, None, :] == jnp.clip(cand, 0, p - 1)[:, :, None]  # [B, C, N]
    return jnp.max(jnp.where(hit[..., None], x[:, None], jnp.array(-jnp.inf, x.dtype)), axis=2)


def cached_attend(
    k_stack: Layers,
    v_stack: Layers,
    layer: int | jax.Array,
    cols: jax.Array,
    mask: jax.Array,
    impl: str,
    window: int | None = None,
    qpos: jax.Array | None = None,
    ring: bool = False,
) -> Attend:
    """Attention over layer ``layer``'s KV cache in a stack's caches (either form of
    fastblt.sampler.state.Layers): the new keys/values are written at ``cols`` int32[B, T] (out of
    range: not written) and the queries attend the layer's cache [B, N, KV, hd] under ``mask``
    bool[B, T, N]. With a sliding ``window`` (and ``qpos`` int32[B, T], the queries' positions) on a
    long buffer, only the ``window + T - 1`` keys the queries can see are read (``window_span``), so
    attention costs what the window costs (the mask, document ids and cache writes still span the
    buffer, cheaply); the decode kernel reads the window itself and sizes its key splits for it.
    ``ring``: the caches are rings (fastblt.sampler.state.ring_slots), ``cols`` their slots and
    ``mask`` over the slots: read whole (a ring is about the window long). Returns the stack's
    written caches as the step's aux."""
    n, t = mask.shape[2], cols.shape[1]
    span = None if ring else window_span(n, t, window)
    visible = None if window is None else window + t - 1  # the most keys a row's queries see
    # A ring's keys are read from the slot of the oldest position the queries see, in position order.
    first = jnp.mod(qpos[:, 0] - (window - 1), n) if ring else None

    def attend(q, k, v):
        views = (q, k, v)  # HeadViews of the layer's product (fused.layer_step), or arrays
        q, k, v = (decode_kernel.cut_out(x) for x in views)  # slices, left unused where read in place
        kernel = resolve_impl(impl, q, kv_heads=k.shape[2]) == "decode"
        if kernel and isinstance(k_stack, tuple) and decode_kernel.writes_cache(q, k_stack[layer], visible):
            # The kernel writes the new keys and values itself (no scatter kernels per layer), and
            # reads q, k and v out of the layer's product where it can (no slice kernels).
            o, kc, vc = decode_kernel.decode_attention_write(
                *views, cols, k_stack[layer], v_stack[layer], mask, visible_keys=visible, first_key=first
            )
            return o, (replace_layer(k_stack, layer, kc), replace_layer(v_stack, layer, vc))
        ks, vs = write_layer(k_stack, layer, cols, k), write_layer(v_stack, layer, cols, v)
        # The decode kernel reads only the visible keys itself: no window gathered for it (from an
        # unrolled stack; a stacked one's read_layer would copy the layer's whole cache).
        own_window = isinstance(k_stack, tuple) and kernel
        if span is None or own_window:
            o = attention(q, read_layer(ks, layer), read_layer(vs, layer), mask, impl, visible, first)
            return o, (ks, vs)
        start = window_start(qpos[:, 0], window, n, span)
        seen = start[:, None] + jnp.arange(span, dtype=jnp.int32)[None]  # [B, span]
        keys, vals = gather_layer_rows(ks, layer, seen), gather_layer_rows(vs, layer, seen)
        return attention(q, keys, vals, window_rows(mask, start, span, 1), impl), (ks, vs)

    attend.takes_head_views = True
    return attend


# The layers of an unrolled stack are traced and lowered once per stack, not once per layer: each runs
# as a call of one jitted layer (_cached_layer), whose traced jaxpr and lowered function JAX reuses for
# every call with the same static arguments and argument types. XLA inlines the calls before it
# optimises, so the compiled program is the same. At BLT-1B shapes the 98 layer traces of ar's two
# halves were 4.4 of 7.6 s of its tracing (experiments/results/generate_speed.md, run 16).
TRACE_LAYERS_ONCE = True


def _cached_layer(layer, c, impl, window, ring, h, positions, k_cache, v_cache, cols, mask):
    """One layer of :func:`_run_blocks` over its own caches [B, N, KV, hd]: (h, k_cache, v_cache)."""
    attend = cached_attend((k_cache,), (v_cache,), 0, cols, mask, impl, window, positions, ring)
    h, ((k_cache,), (v_cache,)) = fused.layer_step(layer, c, h, positions, attend)
    return h, k_cache, v_cache


def layer_once() -> Callable:
    """A jitted :func:`_cached_layer` of its own, for one traced program (a :class:`Runner`).

    JAX keeps a jitted function's traces for the whole process, keyed on the function, its static
    arguments and its arguments' types, not on what the trace read: the platform, and the switches of
    fastblt.model.attention, decode_attention and fused that the sampler's program cache keys on
    (fastblt.sampler.api._compiled). One module-level function would hand a later program the layers
    traced under an earlier program's switches; a new function per program shares traces only among
    its own layers."""

    def layer(*args):
        return _cached_layer(*args)

    return jax.jit(layer, static_argnums=(1, 2, 3, 4))


def _run_blocks(
    layers,
    c,
    impl,
    h,
    positions,
    k_caches,
    v_caches,
    cols,
    mask,
    on_layer=None,
    window=None,
    run_layer=None,
    ring=False,
):
    """Pre-norm layers (TransformerBlock) with caches, unrolled or scanned (fastblt.sampler.fused.run_layers);
    ``on_layer(i, h)`` after each (unrolled stacks only); ``window``: the sliding window ``mask``
    applies (reads only the keys in it, see cached_attend); ``run_layer``: a :func:`layer_once` that
    runs each layer of an unrolled stack (None: :func:`_cached_layer` traced inline); ``ring``: the
    caches are rings (cached_attend). Returns (h, new k caches, new v caches)."""

    def body(i, layer, carry):
        h, ks, vs = carry
        if isinstance(ks, tuple):  # unrolled: the layer over its own caches, traced once with run_layer
            run = run_layer or _cached_layer
            h, k, v = run(layer, c, impl, window, ring, h, positions, ks[i], vs[i], cols, mask)
            ks, vs = replace_layer(ks, i, k), replace_layer(vs, i, v)
        else:  # one scan over the stacked caches
            h, (ks, vs) = fused.layer_step(
                layer, c, h, positions, cached_attend(ks, vs, i, cols, mask, impl, window, positions, ring)
            )
        if on_layer is not None:
            on_layer(i, h)
        return h, ks, vs

    if on_layer is not None and isinstance(layers, fused.Scanned):
        raise ValueError("on_layer needs unrolled layers (a Python index per layer)")
    return fused.run_layers(layers, body, (h, k_caches, v_caches))


class Runner:
    """The model's parameters bound for incremental use. Build it inside the jitted function.

    ``width``: the exact mode's step width (``exact_width`` of fastblt.sampler.api.prepare): every :meth:`extend` of at most
    ``width`` bytes runs ``width`` columns (the rest inert), so a byte's logits, entropy and caches
    come from the same kernels and shapes whether one byte or a verified chunk is appended.
    """

    def __init__(self, config: ModelConfig, params: dict, width: int | None = None):
        m = config
        self.config = m
        self.width = width
        impl = m.attention_impl
        dtype = jnp.dtype(m.dtype)
        self.blt = BLT(m).bind({"params": params})
        self.enc = self.blt.local_encoder
        self.dec = self.blt.local_decoder
        self.impl = impl
        self.run_layer = layer_once() if TRACE_LAYERS_ONCE else None
        # Fused once per generation, outside the sampler's loop (fastblt.sampler.fused); stacks in
        # scanned_stacks(m) are stacked for one lax.scan each.
        scanned = scanned_stacks(m)
        self.enc_layers = fused.fuse_stack(m.encoder, params["local_encoder"], dtype)
        gp = params["global_transformer"]
        self.glob_layers = fused.stack_layers(
            fused.fuse_stack(m.global_model, gp, dtype), "global" in scanned
        )
        dp = params["local_decoder"]
        self.dec_cross = decoder_cross_layers(m)
        # Decoder layer i: its weights and the query side of the cross-attention before it (or None).
        queries = {i: fused.fuse_cross(dp[f"cross_attn_layers_{i}"], dtype) for i in self.dec_cross}
        self.dec_layers = fused.stack_layers(
            tuple(
                (layer, queries.get(i))
                for i, layer in enumerate(fused.fuse_stack(m.decoder, params["local_decoder"], dtype))
            ),
            "decoder" in scanned,
        )
        if "decoder" in scanned:
            self.dec_cross_params = jax.tree.map(
                lambda *xs: jnp.stack(xs), *(dp[f"cross_attn_layers_{i}"] for i in self.dec_cross)
            )
        self.dec_head = fused.fuse_head(dp["norm"], dp["output"], dtype)
        self.dec_slots_w = dp["patch_embedding_projection"]["kernel"].astype(dtype)
        self.glob_proj = None
        if m.needs_global_projection:
            self.glob_proj = gp["token_embedding_projection"]["kernel"].astype(dtype)
        self.cross_layers = encoder_cross_layers(m)
        g = max(m.hash.group_sizes) if m.hash.n_tables else 1
        self.hash_context = g - 1  # earlier bytes a new byte's hash n-grams read
        if uses_entropy_model(m):
            e = m.entropy_model
            ep = params["entropy_model"]
            edt = jnp.dtype(e.dtype)
            self.ent_embed = embed(e.vocab_size, e.dim, ("vocab", "embed"), edt, "tok_embeddings").bind(
                {"params": ep["tok_embeddings"]}
            )
            self.ent_layers = fused.stack_layers(fused.fuse_stack(e, ep, edt), "entropy" in scanned)
            self.ent_head = fused.fuse_head(ep["norm"], ep["output"], edt)

    # ------------------------------------------------------------------------------- helpers

    @staticmethod
    def _key_positions(buffer: jax.Array) -> jax.Array:
        b, n = buffer.shape[:2]
        return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))

    @staticmethod
    def _local_keys(
        tokens, qpos, cols, window, use_docs, caches: Layers
    ) -> tuple[jax.Array, jax.Array, bool]:
        """A local stack's view of an append: (mask bool[B, T, S] of the new bytes over its cache
        slots, the slots ``cols`` go to, whether the cache is a ring)."""
        n, slots = tokens.shape[1], cache_slots(caches)
        if slots == n:
            return Runner._local_mask(tokens, qpos, window, use_docs), cols, False
        mask = ring_mask(tokens, qpos, window, use_docs, slots, qpos.shape[1])
        return mask, ring_cols(cols, n, slots), True

    @staticmethod
    def _local_mask(tokens, qpos, window, use_docs) -> jax.Array:
        """bool[B, T, N]: causal, sliding-window, same-document mask of new bytes over the buffer."""
        kpos = Runner._key_positions(tokens)
        if not use_docs:
            return causal_mask(qpos, kpos, window)
        docs = document_ids(tokens)
        return causal_mask(qpos, kpos, window, gather_rows(docs, qpos), docs)

    # -------------------------------------------------------------------------------- stages

    def entropy(self, st: State, chunk, qpos, cols, tokens) -> State:
        """Entropy model over the new bytes; writes their KV and entropies. chunk: int32[B, T]."""
        e = self.config.entropy_model
        mask, slots, ring = self._local_keys(tokens, qpos, cols, e.window, e.document_masking, st.ent_k)
        h = self.ent_embed(chunk)
        h, ks, vs = _run_blocks(
            self.ent_layers,
            e,
            self.impl,
            h,
            qpos,
            st.ent_k,
            st.ent_v,
            slots,
            mask,
            window=e.window,
            run_layer=self.run_layer,
            ring=ring,
        )
        logits = fused.head_logits(self.ent_head, e.norm_eps, h)
        ent = patching.entropy(logits)
        return st._replace(ent_k=ks, ent_v=vs, entropies=scatter_rows(st.entropies, cols, ent))

    def encoder_bytes(self, st: State, qpos, cols, tokens) -> tuple[State, jax.Array]:
        """Hash embeddings + encoder layers for the new bytes (tokens already in ``tokens``).

        Returns the state with the encoder caches written and the new bytes' final encoder states
        float[B, T, D_e] (the decoder's input).
        """
        m = self.config
        c = self.hash_context
        t = qpos.shape[1]
        win_pos = qpos[:, :1] - c + jnp.arange(c + t, dtype=jnp.int32)[None]
        window = jnp.where(win_pos >= 0, gather_rows(tokens, win_pos), 0)  # positions < 0 read 0
        h = self.blt.hash_embed(window, self.enc.embed_tokens(window))[:, c:]
        mask, slots, ring = self._local_keys(
            tokens, qpos, cols, m.encoder.window, m.document_masking, st.enc_k
        )
        enc_h, enc_ck, enc_cv = list(st.enc_h), list(st.enc_ck), list(st.enc_cv)

        def on_layer(i, h_i):
            if i in self.cross_layers:
                j = self.cross_layers.index(i)
                enc_h[j] = scatter_rows(enc_h[j], cols, h_i)
                k, v = self.enc.cross_attn_layers[j].kv(h_i)
                enc_ck[j] = scatter_rows(enc_ck[j], cols, k)
                enc_cv[j] = scatter_rows(enc_cv[j], cols, v)

        h, ks, vs = _run_blocks(
            self.enc_layers,
            m.encoder,
            self.impl,
            h,
            qpos,
            st.enc_k,
            st.enc_v,
            slots,
            mask,
            on_layer,
            m.encoder.window,
            self.run_layer,
            ring,
        )
        st = st._replace(enc_k=ks, enc_v=vs, enc_h=tuple(enc_h), enc_ck=tuple(enc_ck), enc_cv=tuple(enc_cv))
        return st, h

    def patches(self, tokens, entropies, length) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Patch ids of the committed bytes (fastblt.sampler.patch_slots.committed_patches)."""
        return committed_patches(self.config, tokens, entropies, length)

    def latents(self, st: State, tokens, byte_pid, first, count, n_cand: int) -> State:
        """Encoder patch embeddings and global steps for patches ``first .. first + count - 1``.

        Args: byte_pid: int32[B, N]; first, count: int32[B]; n_cand: static bound on count.
        """
        p = st.patch_eos.shape[1]
        cand = first[:, None] + jnp.arange(n_cand, dtype=jnp.int32)[None]  # [B, C] patch indices
        valid = cand < (first + count)[:, None]
        gcols = jnp.where(valid, cand, p)
        seg = jnp.where(byte_pid >= 0, byte_pid, p)  # bytes past the length go to a dropped segment

        with jax.named_scope(SCOPES["pool"]):
            pe = self._pool_cross(st, byte_pid, cand, seg)
        with jax.named_scope(SCOPES["global"]):
            return self._global_steps(st, tokens, byte_pid, cand, gcols, pe, seg)

    def _pool_cross(self, st: State, byte_pid, cand, seg) -> jax.Array:
        """Max-pool + encoder cross-attention of candidate patches ``cand`` int32[B, C]:
        float[B, C * k, D_e] patch slot embeddings."""
        m = self.config
        k = m.cross_attn_k
        b, n_cand = cand.shape
        d_e = st.enc_h[0].shape[-1]
        p = st.patch_eos.shape[1]
        slot_patch = jnp.repeat(cand, k, axis=1)  # [B, C * k]
        cross_mask = byte_pid[:, None, :] == slot_patch[:, :, None]  # slots see exactly their bytes
        pe = None
        for j, _ in enumerate(self.cross_layers):
            if pe is None or m.encoder_repool_every_layer:
                pooled = pool_patches(st.enc_h[j], seg, cand, p)  # [B, C, D_e]
                pe = self.enc.patch_embedding_projection(pooled).reshape(b, n_cand * k, d_e)
            cross = self.enc.cross_attn_layers[j]
            o = attention(cross.query(pe), st.enc_ck[j], st.enc_cv[j], cross_mask, m.attention_impl)
            pe = pe + (pe + cross.out(o))  # the double residual
        return pe

    def _global_steps(self, st: State, tokens, byte_pid, cand, gcols, pe, seg) -> State:
        """Global steps of patches ``cand`` (slot embeddings ``pe``); writes, at ``gcols``, their global
        KV entries and the decoder's cross-attention keys/values of their latents' slots."""
        m = self.config
        b, n_cand = cand.shape
        p = st.patch_eos.shape[1]
        x = pe.reshape(b, n_cand, -1)
        if self.glob_proj is not None:
            x = fused.dot(x, self.glob_proj)
        h = x.astype(jnp.dtype(m.dtype))

        patch_eos = st.patch_eos
        kpos = self._key_positions(st.patch_eos)
        if m.document_masking:
            eos = ((tokens == EOS) & (byte_pid >= 0)).astype(jnp.int32)
            has_eos = gather_rows(_seg_max(eos, seg, p), cand) > 0
            patch_eos = scatter_rows(patch_eos, gcols, has_eos)
            ends = patch_eos.astype(jnp.int32)
            pdocs = jnp.cumsum(ends, axis=1) - ends
            mask = causal_mask(cand, kpos, None, gather_rows(pdocs, cand), pdocs)
        else:
            mask = causal_mask(cand, kpos)
        h, ks, vs = _run_blocks(
            self.glob_layers,
            m.global_model,
            self.impl,
            h,
            cand,
            st.glob_k,
            st.glob_v,
            gcols,
            mask,
            run_layer=self.run_layer,
        )
        # The decoder's cross-attention keys/values of these patches' slots, once per patch.
        slots = fused.dot(h, self.dec_slots_w).reshape(b, n_cand, m.cross_attn_k, m.decoder.dim)
        dec_ck, dec_cv = st.dec_ck, st.dec_cv
        if isinstance(dec_ck, tuple):
            for j, i in enumerate(self.dec_cross):
                k, v = self.dec.cross_attn_layers[i].slot_kv(slots)
                dec_ck = write_layer(dec_ck, j, gcols, k)
                dec_cv = write_layer(dec_cv, j, gcols, v)
        else:  # a scanned decoder: every layer's slot keys/values as one batched product
            cross = self.dec.cross_attn_layers[0].clone(parent=None)
            k, v = jax.vmap(lambda p: cross.apply({"params": p}, slots, method="slot_kv"))(
                self.dec_cross_params
            )
            dec_ck = write_all_layers(dec_ck, gcols, k)
            dec_cv = write_all_layers(dec_cv, gcols, v)
        return st._replace(glob_k=ks, glob_v=vs, patch_eos=patch_eos, dec_ck=dec_ck, dec_cv=dec_cv)

    def decoder(self, st: State, h, qpos, cols, read, tokens) -> tuple[State, jax.Array]:
        """Decoder over the new bytes; byte ``j`` reads the latent of patch ``read[:, j]``.

        h: float[B, T, D_e] encoder states; read: int32[B, T]. Returns logits float32[B, T, V].
        """
        m = self.config
        mask, slots, ring = self._local_keys(
            tokens, qpos, cols, m.decoder.window, m.document_masking, st.dec_k
        )

        def attend_of(i, caches):
            return cached_attend(*caches, i, slots, mask, self.impl, m.decoder.window, qpos, ring)

        logits, (ks, vs) = self.decoder_layers(st, h, qpos, read, attend_of, (st.dec_k, st.dec_v))
        return st._replace(dec_k=ks, dec_v=vs), logits

    def decoder_layers(self, st: State, h, positions, read, attend_of, caches=None) -> tuple[jax.Array, Any]:
        """The decoder stack (unrolled or scanned), shared by the byte steps and BLT-D's block passes.

        Args: h: float[B, T, D_d] inputs; positions: int32[B, T]; read: int32[B, T], the patch whose
          slots each row cross-attends (their keys/values cached by the global step);
          attend_of(i, caches) -> layer i's self-attention (fastblt.model.attention.Attend) whose aux
          is ``caches`` after layer i's writes; caches: what the layers write (None: nothing).
        Returns: (logits float32[B, T, V], the written caches).
        """
        dc = self.config.decoder
        every = self.config.decoder.cross_attn_all_layers

        def body(i, layer, carry):
            h, caches = carry
            weights, query = layer
            if query is not None:  # the slots' keys/values of cross-attention layer i (or the only one)
                k = gather_layer_rows(st.dec_ck, i if every else 0, read)
                v = gather_layer_rows(st.dec_cv, i if every else 0, read)
                h = h + fused.cross_attend(query, dc.cross_heads, dc.norm_eps, h, k, v)  # the double residual
            return fused.layer_step(weights, dc, h, positions, attend_of(i, caches))

        h, caches = fused.run_layers(self.dec_layers, body, (h, caches))
        return fused.head_logits(self.dec_head, dc.norm_eps, h), caches

    # ----------------------------------------------------------------------------- entry points

    def extend(self, st: State, chunk: jax.Array, count: jax.Array) -> tuple[State, jax.Array, jax.Array]:
        """Appends ``chunk[b, :count[b]]`` at each row's ``length`` and runs all stages.

        Args: chunk: int32[B, T] byte ids; count: int32[B] in [0, T] (0: the row is left as is; bytes
          that would not fit in the buffer are left out).

        Returns: (state, logits float32[B, T, V] where ``logits[b, j]`` predicts the byte after
        ``chunk[b, j]`` (valid for j < count[b]), new_patches int32[B]: patches completed).
        """
        st, logits, new_patches, _ = self._extend(st, chunk, count, close_last=False)
        return st, logits, new_patches

    def extend_closed(
        self, st: State, chunk: jax.Array, count: jax.Array
    ) -> tuple[State, jax.Array, jax.Array, jax.Array]:
        """:meth:`extend`, plus the latent of the new prefix's last patch forced closed (BLT-D's o_M:
        fastblt.sampler.unmasking.close_last_patch) in the same global call, as scratch in patch slot
        ``completed`` where that patch is still open.

        Returns: (state, logits, new_patches as :meth:`extend`, read int32[B]: the patch slot of
        that latent, see :meth:`closed_last_patch`).
        """
        return self._extend(st, chunk, count, close_last=True)

    @staticmethod
    def closed_last_patch(byte_pid, length, completed) -> tuple[jax.Array, jax.Array]:
        """Where the latent of the prefix's last patch, closed at byte ``length - 1``, lives.

        Args: byte_pid int32[B, N], length and completed int32[B] (as :meth:`patches` gives them).
        Returns: (forced bool[B]: that patch is still open, so its latent must be computed as scratch
        into slot ``completed``; read int32[B]: the slot to read, ``completed`` or ``completed - 1``).
        """
        last = gather_rows(byte_pid, (length - 1)[:, None])[:, 0]  # the patch of byte length - 1
        return last == completed, patching.latent_index(completed, last_patch=last)

    def _extend(self, st: State, chunk, count, close_last: bool):
        b, t_in = chunk.shape
        t = fused.padded_width(b, t_in)  # inert columns (past count: nothing written, logits cut)
        if self.width is not None and t_in <= self.width:
            t = max(t, self.width)
        chunk = jnp.pad(chunk, ((0, 0), (0, t - t_in)))
        n = st.tokens.shape[1]
        # Bytes past the buffer are not appended (a verify chunk may reach beyond it): the length
        # stays <= N, so the patcher's bookkeeping of the bytes that fit stays exact.
        count = jnp.minimum(count, n - st.length)
        valid = jnp.arange(t, dtype=jnp.int32)[None] < count[:, None]
        qpos = st.length[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
        cols = jnp.where(valid, qpos, n)
        tokens = scatter_rows(st.tokens, cols, chunk)
        length = st.length + count
        if uses_entropy_model(self.config):
            with jax.named_scope(SCOPES["entropy"]):
                st = self.entropy(st, chunk, qpos, cols, tokens)
        with jax.named_scope(SCOPES["encoder"]):
            st, h = self.encoder_bytes(st, qpos, cols, tokens)
        with jax.named_scope(SCOPES["patcher"]):
            byte_pid, column_pid, completed = self.patches(tokens, st.entropies, length)
            new_patches = completed - st.completed
            forced, closed_read = jnp.zeros((b,), bool), None
            if close_last:  # the open last patch goes right after the completed ones: one global call
                forced, closed_read = self.closed_last_patch(byte_pid, length, completed)
            steps = new_patches + forced.astype(jnp.int32)
        st = jax.lax.cond(
            jnp.any(steps > 0),
            lambda s: self.latents(s, tokens, byte_pid, s.completed, steps, t + int(close_last)),
            lambda s: s,
            st,
        )
        read = patching.latent_index(jnp.take_along_axis(column_pid, jnp.clip(qpos + 1, 0, n), axis=1))
        with jax.named_scope(SCOPES["decoder"]):
            st, logits = self.decoder(st, h, qpos, cols, read, tokens)
        st = st._replace(tokens=tokens, length=length, completed=completed)
        return st, logits[:, :t_in], new_patches, closed_read

    def draft_step(
        self, st: State, token: jax.Array, pos: jax.Array, read: jax.Array, active: jax.Array
    ) -> tuple[State, jax.Array]:
        """BLT-S draft: encoder byte layers + decoder for ``token`` at ``pos``, reading latent ``read``.

        Writes scratch entries at ``pos`` (past ``length``; the verification pass overwrites them) and
        does not change ``length``. token, pos, read: int32[B]; active: bool[B]. Returns logits [B, V].
        """
        n = st.tokens.shape[1]
        b = token.shape[0]
        w = jnp.arange(fused.padded_width(b, 1), dtype=jnp.int32)[None]  # column 0, then inert ones
        qpos = pos[:, None] + w
        cols = jnp.where(active[:, None] & (w == 0), qpos, n)
        tokens = scatter_rows(st.tokens, cols, jnp.where(w == 0, token[:, None], 0))
        with jax.named_scope(SCOPES["encoder"]):
            st, h = self.encoder_bytes(st, qpos, cols, tokens)
        with jax.named_scope(SCOPES["decoder"]):
            st, logits = self.decoder(st, h, qpos, cols, jnp.broadcast_to(read[:, None], qpos.shape), tokens)
        return st._replace(tokens=tokens), logits[:, 0]

    def patch_count(self, st: State, length: jax.Array) -> jax.Array:
        """Completed patches for a committed length (after a rollback of scratch bytes)."""
        return self.patches(st.tokens, st.entropies, length)[2]

"""BLT-S, self-speculative BLT generation (Fast BLT §5.1, Algorithm 2): greedy, or speculative
sampling at temperature > 0 (see :func:`build_blt_s`).

One round per loop iteration, for all rows in lock-step (each at its own position):

1. ``d_0 = argmax(next_logits)``: the model's own prediction (exact: ``next_logits`` come from the
   full model on the committed prefix).
2. Draft ``d_1 .. d_k`` with ``k = draft`` decoder-only steps (``Runner.draft_step``: encoder byte
   layers + decoder; no entropy model, no global model): every draft byte reads the latent of the
   last completed patch, i.e. drafting runs past patch boundaries ignoring entropy spikes.
3. Verify: one full incremental pass (``Runner.extend``: entropy model, patcher, encoder, global for
   the patches the draft completes, decoder) over ``d_0 .. d_k`` gives the model's prediction
   ``y_j`` after each ``d_j``.
4. Accept ``d_1 .. d_a`` up to the first mismatch ``d_j != y_{j-1}``; commit ``d_0 .. d_a`` and roll
   the row back to that length (scratch cache entries past it are never read and get overwritten).
   ``y_a`` becomes the next round's ``next_logits``: its argmax is the verifier's correction (at the
   first mismatch) or the free byte (when all ``k`` matched), drafted for free as the next ``d_0``.

Greedy output is byte-identical to greedy ``ar``: every committed byte is the argmax of the full
model's logits on its committed prefix. Per round: ``k + 1`` decoder passes (k drafts + the verify
pass) and one encoder+global pass (the verify pass; the paper's schedule spends a second one on the
corrected byte, which here rides along in the next verify pass, see fastblt.sampler.cost).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastblt.config import ModelConfig
from fastblt.model.patcher import latent_index
from fastblt.sampler.cached import Runner
from fastblt.sampler.decoding import Call, Loop, decode
from fastblt.sampler.sampling import filtered_probs, round_keys, sample_logits, speculative_accept
from fastblt.sampler.state import State
from fastblt.tokenizer import EOS


def cut_at_eos(chunk: jax.Array, commit: jax.Array, stop_at_eos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Shortens ``commit`` (int32[b]) so that it ends at the first EOS of ``chunk[:, :commit]``
    where ``stop_at_eos``. Returns (commit, hit bool[b]: an EOS was committed)."""
    steps = jnp.arange(chunk.shape[1], dtype=jnp.int32)
    is_eos = (chunk == EOS) & (steps[None] < commit[:, None]) & stop_at_eos
    hit = jnp.any(is_eos, axis=1)
    return jnp.where(hit, jnp.argmax(is_eos, axis=1) + 1, commit), hit


def greedy_accepted(chunk: jax.Array, verify_logits: jax.Array) -> jax.Array:
    """Leading drafts ``chunk[:, 1:]`` (int32[b, k]) equal to the verifier's argmax after the byte
    before them (``verify_logits`` float32[b, k + 1, V]): int32[b]."""
    pred = jnp.argmax(verify_logits, axis=-1).astype(jnp.int32)  # pred[:, j] follows chunk[:, j]
    match = chunk[:, 1:] == pred[:, :-1]
    return jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=1), axis=1)


def commit_verified(
    runner: Runner,
    st: State,
    chunk: jax.Array,
    verify_logits: jax.Array,
    accepted: jax.Array,
    start: jax.Array,
    limit: jax.Array,
    stop_at_eos: jax.Array,
    active: jax.Array,
    room: int,
) -> tuple[State, jax.Array, jax.Array, jax.Array]:
    """Commits a verified chunk's first byte and its ``accepted`` (int32[b]) drafts, shared by BLT-S
    and BLT-DV.

    ``chunk`` int32[b, T] was appended at ``start`` by one :meth:`Runner.extend` that returned
    ``verify_logits`` float32[b, T, V]; ``chunk[:, 0]`` is a byte of the target's own (always
    kept). Commits ``chunk[:, :accepted + 1]`` (cut at ``limit`` int32[b], bytes the row may still
    take, and at EOS), rolling ``length``/``completed`` back over the rest, whose cache entries
    become scratch. ``room``: patches a next round may complete; rows stop without it.

    Returns: (state, next_logits float32[b, V]: the prediction of the byte after the commit,
    commit int32[b], finish bool[b]).
    """
    commit, hit = cut_at_eos(chunk, jnp.minimum(accepted + 1, limit), stop_at_eos)
    commit = jnp.where(active, commit, 0)
    length = start + commit
    completed = runner.patch_count(st, length)
    finish = ((commit >= limit) | hit | (completed + room > st.patch_eos.shape[1])) & active
    next_logits = jnp.take_along_axis(
        verify_logits, jnp.clip(commit - 1, 0, chunk.shape[1] - 1)[:, None, None], axis=1
    )[:, 0]
    return st._replace(length=length, completed=completed), next_logits, commit, finish


def build_blt_s(
    config: ModelConfig,
    *,
    n_bytes: int,
    n_patches: int,
    prefill_chunk: int,
    draft: int,
    greedy: bool = True,
    exact_width: int | None = None,
):
    """The BLT-S generation function (to be jitted): :func:`fastblt.sampler.decoding.decode` with
    one draft-and-verify round. ``exact_width``: at least ``draft + 1``.

    ``greedy=False``: speculative sampling at ``temperature``/``top_p``
    (:func:`fastblt.sampler.sampling.speculative_accept`): drafts are drawn from the drafter's
    filtered distribution q, accepted with probability min(1, p/q) against the verify pass's p,
    and the byte after the accepted drafts (the residual draw at a rejection, or a draw from p after
    the last draft) is the next round's first byte. The output is distributed as ``ar`` sampling
    with the same temperature and top-p (not draw for draw: the keys differ).
    """
    if draft < 1:
        raise ValueError(f"draft={draft} must be >= 1 (bytes drafted per round)")
    if exact_width is not None and draft + 1 > exact_width:
        raise ValueError(
            f"draft={draft} needs exact_width >= {draft + 1} (the verified chunk), got {exact_width}"
        )

    def init(call: Call, loop: Loop) -> Loop:
        if greedy:
            first = jnp.argmax(loop.logits, axis=-1).astype(jnp.int32)
        else:  # stream 0: the first byte after the prompt; every later first byte comes from a round
            keys = round_keys(call.seed, call.rows, jnp.zeros_like(call.rows), 0, 1)[:, 0]
            first = sample_logits(loop.logits, keys, call.temperature, call.top_p, greedy=False)
        return loop._replace(extra=first)

    def step(call: Call, loop: Loop) -> Loop:
        st, logits, done, generated, counters, first = loop
        runner, prompts, rows = call.runner, call.prompts, call.rows
        seed, temperature, top_p = call.seed, call.temperature, call.top_p
        b = first.shape[0]
        active = ~done
        start = st.length
        # Every draft byte reads the latent a row ending at the committed prefix reads: the drafts'
        # own boundaries are unknown (completed: the patch of the next byte, column `length`).
        read = latent_index(st.completed)
        draft_keys = None if greedy else round_keys(seed, rows, counters.rounds, 1, draft)

        def draft_body(j, carry):
            st, chunk, q, prev = carry
            st, lg = runner.draft_step(st, prev, start + j, read, active)
            if greedy:
                nxt = jnp.argmax(lg, axis=-1).astype(jnp.int32)
            else:
                nxt = sample_logits(lg, draft_keys[:, j], temperature, top_p, greedy=False)
                q = q.at[:, j].set(filtered_probs(lg, temperature, top_p))
            return st, chunk.at[:, j + 1].set(nxt), q, nxt

        chunk = jnp.zeros((b, draft + 1), jnp.int32).at[:, 0].set(first)
        q = jnp.zeros((b, draft, logits.shape[-1]) if not greedy else (b, 0, 0), jnp.float32)
        st, chunk, q, _ = jax.lax.fori_loop(0, draft, draft_body, (st, chunk, q, first))

        count = jnp.where(active, draft + 1, 0).astype(jnp.int32)
        st, verify_logits, _ = runner.extend(st, chunk, count)
        if greedy:
            accepted = greedy_accepted(chunk, verify_logits)
        else:
            accepted, nxt = speculative_accept(
                filtered_probs(verify_logits, temperature, top_p),
                q,
                chunk[:, 1:],
                round_keys(seed, rows, counters.rounds, 2, draft),
                round_keys(seed, rows, counters.rounds, 3, 1)[:, 0],
            )
        # Commit d_0 .. d_a; a verify pass completes at most draft + 1 patches.
        limit = jnp.minimum(prompts.budget - generated, n_bytes - start)
        st, next_logits, commit, finish = commit_verified(
            runner,
            st,
            chunk,
            verify_logits,
            accepted,
            start,
            limit,
            prompts.stop_at_eos,
            active,
            draft + 1,
        )
        a = active.astype(jnp.int32)
        counters = counters.add(
            decoder_passes=a * (draft + 1),
            eg_passes=a,
            entropy_passes=a,
            drafted=a * draft,
            accepted=a * accepted,
            rounds=a,
        )
        logits = jnp.where(active[:, None], next_logits, logits)
        # Greedy: the argmax after the commit (the correction, or the free byte after the last
        # draft). Sampling: the residual draw or the draw from p after the last draft.
        nxt = jnp.argmax(next_logits, axis=-1).astype(jnp.int32) if greedy else nxt
        first = jnp.where(active, nxt, first)
        return Loop(st, logits, done | finish, generated + commit, counters, first)

    shape = dict(n_bytes=n_bytes, n_patches=n_patches, prefill_chunk=prefill_chunk, exact_width=exact_width)
    # The verification chunk is the widest append, and completes up to draft + 1 patches.
    return decode(config, **shape, init=init, step=step, step_rows=draft + 1, round_patches=draft + 1)

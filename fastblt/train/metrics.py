"""Training metrics: model FLOPs per byte and MFU, TensorBoard scalars, console progress (tqdm).

FLOP accounting follows MaxText's convention (model FLOPs, not hardware FLOPs): every matmul costs
2 FLOPs per weight per row it is applied to, attention costs ``4 * keys * H * head_dim`` per query
(``Q K^T`` and ``P V``, 2 each) with causal masks counted by the keys a query actually sees, a
training step costs 3x the forward (forward + backward), and embedding lookups (byte and hash
n-gram tables) are free. Norms, RoPE, softmax, pooling and other elementwise work are not counted.

The BLT runs three stacks at three rates; with ``N`` bytes per row, ``L`` the average patch length
and ``P = N / L`` real patches per row, per byte (forward):

* local encoder: its layers on every byte; the pooled-patch projection ``D_e -> k D_e`` once per
  patch; each cross-attention layer projects q/o on the ``k`` slots of a patch and k/v on every
  byte, and each slot attends the ~``L`` bytes of its patch (no causal halving: the whole patch);
* global transformer: its layers (and the ``k D_e -> D_g`` input projection when present) once per
  patch, attention causal over the ``P`` patches;
* local decoder: the slot projection ``D_g -> k D_d`` once per patch; each cross-attention layer
  projects q/o on every byte and k/v on the ``k`` slots of every patch, and each byte attends the
  ``k`` slots of one patch; its layers on every byte; the output head ``D_d -> V`` on every byte.

Self-attention keys per query: a causal window of ``W`` keys over ``N`` positions gives query ``i``
``min(i + 1, W)`` keys; the count uses their exact mean, ``(N + 1) / 2`` for a full causal mask
(MaxText halves: ``N / 2``; the difference is the diagonal, a relative ``1 / N``) and about ``W``
for a window much shorter than the row (the local models' 512 over 8k-byte rows).
Document masking and padding are ignored (they depend on the data). The fixed-shape patch buffer
of the implementation is larger than ``P``: padded slots are not useful work and are not counted.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from fastblt.config import EntropyModelConfig, LocalModelConfig, ModelConfig, TransformerConfig
from fastblt.launch.accelerators import generation_peak_flops

LN2 = math.log(2.0)


def bits_per_byte(loss_nats: Any) -> Any:
    """Cross-entropy in bits per byte from a mean next-byte loss in nats: ``loss / ln 2``."""
    return loss_nats / LN2


# --------------------------------------------------------------------------- FLOPs


def mean_causal_keys(seq_len: float, window: int | None) -> float:
    """Average keys a query sees under a causal mask limited to ``window`` keys (self included).

    Query ``i`` of ``N`` sees ``min(i + 1, W)`` keys: ``(N W - W (W - 1) / 2) / N`` on average with
    ``W = min(window, N)``; ``(N + 1) / 2`` for a full causal mask.
    """
    w = seq_len if window is None else min(window, seq_len)
    return w - w * (w - 1.0) / (2.0 * seq_len)


def block_matmul_flops(c: TransformerConfig) -> float:
    """Forward matmul FLOPs of one pre-norm block per position: q, k, v, o and the SwiGLU FFN."""
    qkvo = c.dim * c.n_heads * c.head_dim * 2 + c.dim * c.kv_heads * c.head_dim * 2
    ffn = 3 * c.dim * c.hidden_dim
    return 2.0 * (qkvo + ffn)


def attention_flops(n_heads: int, head_dim: int, keys: float) -> float:
    """Forward FLOPs of scores and weighted values for one query: ``2 keys H hd`` each."""
    return 4.0 * keys * n_heads * head_dim


def stack_flops(c: TransformerConfig, seq_len: float) -> float:
    """Forward FLOPs of all blocks of a stack, per position, over rows of ``seq_len`` positions."""
    keys = mean_causal_keys(seq_len, c.window)
    return c.n_layers * (block_matmul_flops(c) + attention_flops(c.n_heads, c.head_dim, keys))


def _check_lengths(seq_len: int, avg_patch_len: float) -> None:
    if not seq_len >= 1:
        raise ValueError(f"seq_len must be >= 1 byte, got {seq_len!r}")
    if not avg_patch_len > 0 or not math.isfinite(avg_patch_len):
        raise ValueError(f"avg_patch_len must be a positive number of bytes, got {avg_patch_len!r}")


def model_flops_breakdown(config: ModelConfig, seq_len: int, avg_patch_len: float) -> dict[str, float]:
    """Forward model FLOPs per byte of each BLT part (see the module docstring for the terms)."""
    _check_lengths(seq_len, avg_patch_len)
    k, lp = config.cross_attn_k, float(avg_patch_len)
    patches = seq_len / lp
    enc: LocalModelConfig = config.encoder
    dec: LocalModelConfig = config.decoder
    de, dd, dg = enc.dim, dec.dim, config.global_model.dim

    n_pool = enc.n_cross_layers if (enc.cross_attn_all_layers and config.encoder_repool_every_layer) else 1
    enc_cross_per_layer = (
        2.0 * 2 * k * de * de / lp  # wq, wo on the k slots of each patch
        + 2.0 * 2 * de * de  # wk, wv on every byte
        + k * attention_flops(1, de, lp) / lp  # each slot attends the ~L bytes of its patch
    )
    encoder = (
        stack_flops(enc, seq_len)
        + n_pool * 2.0 * de * k * de / lp  # patch_embedding_projection, per patch
        + enc.n_cross_layers * enc_cross_per_layer
    )

    global_in = 2.0 * config.global_input_dim * dg if config.needs_global_projection else 0.0
    global_ = (global_in + stack_flops(config.global_model, patches)) / lp

    dec_cross_per_layer = (
        2.0 * 2 * dd * dd  # wq, wo on every byte
        + 2.0 * 2 * k * dd * dd / lp  # wk, wv on the k slots of each patch
        + attention_flops(1, dd, k)  # each byte attends the k slots of one patch
    )
    decoder = (
        2.0 * dg * k * dd / lp  # patch_embedding_projection, per patch
        + dec.n_cross_layers * dec_cross_per_layer
        + stack_flops(dec, seq_len)
        + 2.0 * dd * config.vocab_size  # output head
    )
    return {"local_encoder": encoder, "global_transformer": global_, "local_decoder": decoder}


def blt_d_block_flops_per_byte(
    config: ModelConfig, seq_len: int, avg_patch_len: float, block_size: int
) -> float:
    """Forward FLOPs per byte of BLT-D's block rows in the decoder (fastblt/train/blt_d.py).

    Each real patch after the BOS patch carries one block of ``B`` cells, so there are ``B / L``
    block rows per byte. A block row runs every decoder layer (matmuls; attention over its clean
    context window and the ``B`` cells of its block), the cross-attention q/o projections and its
    attention over the ``k`` slots of one patch, and the output head. Padded patch slots are not
    counted, as for the global model.
    """
    _check_lengths(seq_len, avg_patch_len)
    dec: LocalModelConfig = config.decoder
    dd, k = dec.dim, config.cross_attn_k
    context = mean_causal_keys(seq_len, dec.window)
    per_row = (
        dec.n_layers
        * (block_matmul_flops(dec) + attention_flops(dec.n_heads, dec.head_dim, context + block_size))
        + dec.n_cross_layers * (2.0 * 2 * dd * dd + attention_flops(1, dd, k))
        + 2.0 * dd * config.vocab_size
    )
    return block_size / float(avg_patch_len) * per_row


def model_flops_per_byte(
    config: ModelConfig,
    seq_len: int,
    avg_patch_len: float,
    training: bool = True,
    objective: Any = None,
) -> float:
    """Model FLOPs per byte of a BLT step on rows of ``seq_len`` bytes (3x forward if ``training``).

    ``objective``: a BLT-D ``ObjectiveConfig`` (kind "blt_d") adds the decoder's block rows
    (:func:`blt_d_block_flops_per_byte`). The frozen entropy model is not included: add
    :func:`entropy_model_flops_per_byte` when it runs in the step.
    """
    forward = sum(model_flops_breakdown(config, seq_len, avg_patch_len).values())
    if objective is not None and getattr(objective, "kind", None) == "blt_d":
        forward += blt_d_block_flops_per_byte(config, seq_len, avg_patch_len, int(objective.block_size))
    return (3.0 if training else 1.0) * forward


def entropy_model_flops_per_byte(
    config: ModelConfig | EntropyModelConfig, seq_len: int, training: bool = False
) -> float:
    """Model FLOPs per byte of the entropy model: its forward (patching), 3x that if ``training``.

    Blocks with window-limited causal attention on every byte, then the output head; the byte
    embedding is a lookup (free).
    """
    c = config.entropy_model if isinstance(config, ModelConfig) else config
    if c is None:
        raise ValueError("the model config has no entropy_model: there are no entropy-model FLOPs to count")
    _check_lengths(seq_len, 1.0)
    forward = stack_flops(c, seq_len) + 2.0 * c.dim * c.vocab_size
    return (3.0 if training else 1.0) * forward


# --------------------------------------------------------------------------- MFU

# bf16 dense peak FLOP/s per chip, by a lower-case substring of ``jax.devices()[0].device_kind``.
# The first matching entry wins, so more specific names come first (``TPU v5 lite`` is a v5e). TPU
# figures are fastblt.launch.accelerators' (with their sources).
PEAK_FLOPS: dict[str, float] = {
    "h100 pcie": 756e12,
    "h100": 989e12,  # SXM
    "h200": 989e12,
    "a100": 312e12,
    "tpu v6 lite": generation_peak_flops("v6e"),
    "tpu v6e": generation_peak_flops("v6e"),
    "tpu v5 lite": generation_peak_flops("v5e"),
    "tpu v5e": generation_peak_flops("v5e"),
    "tpu v5p": generation_peak_flops("v5p"),
    "tpu v5": generation_peak_flops("v5p"),
    "tpu v4": generation_peak_flops("v4"),
}


def peak_flops(device_kind: str) -> float | None:
    """bf16 dense peak FLOP/s of one chip, or None when unknown (CPU, unlisted accelerators)."""
    kind = device_kind.lower()
    for key, peak in PEAK_FLOPS.items():
        if key in kind:
            return peak
    return None


def mfu(flops_per_byte: float, bytes_per_sec: float, n_devices: int, device_kind: str) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over the devices' peak.

    ``bytes_per_sec`` is the global throughput (all devices); None when the peak is unknown.
    """
    peak = peak_flops(device_kind)
    if peak is None or n_devices < 1:
        return None
    return flops_per_byte * bytes_per_sec / (n_devices * peak)


# --------------------------------------------------------------------------- TensorBoard

# How often tensorboardX's thread flushes the event file, s: TensorBoard reloads every 5 s, so sooner
# would show nothing sooner; a hard kill loses at most this long of events (metrics.jsonl keeps them).
EVENT_FLUSH_SECS = 2


def _summary_writer_class() -> type:
    """``tensorboardX.SummaryWriter``, imported (lazily: only the writing process needs it) without torch.

    tensorboardX's writer module imports torch when it is installed, for a type alias only: seconds
    of startup, and torch's CUDA libraries loaded next to JAX's. Where torch is not loaded yet, a
    ``None`` in ``sys.modules`` makes that import fail for the moment, and tensorboardX falls back
    to numpy; torch stays importable afterwards.
    """
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        if sys.modules.get("torch", "") is None:
            del sys.modules["torch"]
    return SummaryWriter


def _drop_rows_after(path: str, step: int) -> None:
    """Rewrites a metrics.jsonl without its rows of steps > ``step`` (and any torn last line)."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
            if int(row.get("step", 0)) <= step:
                kept.append(json.dumps(row) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class MetricWriter:
    """Writes scalars to ``metrics.jsonl`` and to a TensorBoard event file (tensorboardX) in ``logdir``.

    Only one process should write: pass ``enabled=(jax.process_index() == 0)``; a disabled writer
    does nothing and creates no file.

    ``metrics.jsonl`` holds one ``{"step": s, tag: value, ...}`` row per :meth:`write_scalars`,
    written and flushed before the call returns: sweeps and tests read it, and a killed run loses
    none of its rows. The event file is written by tensorboardX's background thread, which flushes
    it every :data:`EVENT_FLUSH_SECS` seconds; :meth:`close` writes everything still queued, so only
    a hard kill (SIGKILL, a crash of the interpreter) can lose the events of those last seconds.
    """

    def __init__(
        self, logdir: str | os.PathLike, enabled: bool = True, resume_step: int | None = None
    ) -> None:
        """``resume_step``: the step a resumed run restarts from. Steps a killed run logged after
        its last checkpoint are replayed by the resumed run, so each view drops them once: rows of
        ``metrics.jsonl`` past ``resume_step`` are deleted, and the event file starts with
        TensorBoard's purge marker (a ``SessionLog.START`` at ``resume_step + 1``), which hides the
        earlier files' events of steps after ``resume_step``."""
        if resume_step is not None and resume_step < 0:
            raise ValueError(f"resume_step must be >= 0, got {resume_step}")
        self.logdir = os.fspath(logdir)
        self.enabled = enabled
        self.path: str | None = None
        self._tb: Any = None
        self._jsonl: TextIO | None = None
        if not enabled:
            return
        SummaryWriter = _summary_writer_class()
        os.makedirs(self.logdir, exist_ok=True)
        jsonl = os.path.join(self.logdir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(jsonl):
            _drop_rows_after(jsonl, int(resume_step))
        # tensorboardX names the file events.out.tfevents.<unix seconds>.<host><suffix> and opens it
        # with "wb": the suffix keeps two writers of one second apart (a resume in the same second,
        # in tests), and its nanosecond clock sorts them in creation order, the order TensorBoard
        # reads a directory's files in (a purge marker hides only events of files read before it).
        suffix = f".{time.time_ns()}.{os.getpid()}"
        self._tb = SummaryWriter(
            self.logdir,
            purge_step=None if resume_step is None else int(resume_step) + 1,
            max_queue=256,  # events, not bytes: a few logged steps; a full queue blocks the loop
            flush_secs=EVENT_FLUSH_SECS,
            filename_suffix=suffix,
        )
        (self.path,) = glob.glob(os.path.join(glob.escape(self.logdir), f"events.out.tfevents.*{suffix}"))
        self._jsonl = open(jsonl, "a")  # closed in close()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Writes ``{tag: number}`` at ``step`` (one jsonl row, one event per tag). None values are
        skipped; a value that is not a number raises TypeError or ValueError (from ``float``)."""
        if not self.enabled:
            return
        if self._tb is None:
            raise RuntimeError(f"MetricWriter for {self.logdir} is closed")
        values = {str(k): float(v) for k, v in scalars.items() if v is not None}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        wall_time = time.time()  # one time for the whole row, as one row is one moment
        for tag, value in values.items():
            self._tb.add_scalar(tag, value, global_step=int(step), walltime=wall_time)

    def flush(self) -> None:
        """Flushes ``metrics.jsonl`` and the events tensorboardX's thread has written so far."""
        if self._tb is not None:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        """Writes every queued event and closes both files; later writes raise RuntimeError."""
        if self._tb is not None:
            self._tb.close()
            self._jsonl.close()
            self._tb = self._jsonl = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- console


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``, ``2d03h``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_rate(bytes_per_sec: float) -> str:
    """``812 B/s``, ``12.3 kB/s``, ``1.23 MB/s`` (decimal prefixes)."""
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_sec >= scale:
            return f"{bytes_per_sec / scale:.3g} {unit}"
    return f"{bytes_per_sec:.0f} B/s"


def _is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal a bar can be drawn on.

    A terminal that reports 0 columns (a pseudo-terminal nobody sized, as some containers and CI
    runners open) is not: tqdm would fit its bar, and its numbers, into no width and show nothing.
    """
    isatty = getattr(stream, "isatty", None)
    if not callable(isatty) or not isatty():
        return False
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return True  # terminal-like without a descriptor: nothing says it has no width
    try:
        return os.get_terminal_size(fd).columns > 0
    except OSError:
        return True


class ProgressBar:
    """Training progress on the console: a tqdm bar on a terminal, plain lines elsewhere.

    The plain line (logs, CI, pipes: no TTY control codes; log parsers read it), printed every
    ``every`` steps and at the last step::

        step  120/1000 ( 12.0%) | loss 1.2345 | bpb 1.7810 | 1.23 MB/s | patches/row 512.0
        | patch len 4.50 | MFU 35.2% | ETA 1h02m

    Metrics are read from a dict: ``loss``, ``bits_per_byte`` (else derived from loss),
    ``bytes_per_sec``, ``patches_per_row``, ``avg_patch_len``, ``mfu``, ``masked_accuracy``,
    ``peak_memory_gb``; absent ones are left out. The ETA uses the step rate since the first line
    (since construction for the first line). On a terminal the same fields, less the step and the
    ETA (tqdm shows its own), are the bar's postfix, and :meth:`advance` moves the bar between them.

    ``stream``: where lines and the bar go (None: ``sys.stdout`` when written). ``write``: a
    callable taking each plain line and message instead (a caller's log); with it there is no bar.
    ``bar``: True or False forces the bar on or off; None (default) shows one when there is no
    ``write`` and ``stream`` is a terminal.
    """

    def __init__(
        self,
        total_steps: int,
        every: int = 1,
        start_step: int = 0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        write: Callable[[str], Any] | None = None,
        bar: bool | None = None,
    ) -> None:
        if total_steps < 1 or every < 1:
            raise ValueError(f"ProgressBar needs total_steps >= 1 and every >= 1, got {total_steps}, {every}")
        if bar and write is not None:
            raise ValueError("ProgressBar(bar=True) draws on `stream`; `write` takes plain lines: pass one")
        self.total, self.every, self.stream, self.clock = total_steps, every, stream, clock
        self._write, self._want_bar, self._start = write, bar, start_step
        self._ref = (clock(), start_step)
        self._first_line = True
        self._bar: Any = None  # the tqdm bar, made at the first step it shows

    @property
    def _out(self) -> TextIO:
        return self.stream or sys.stdout  # read when writing: pytest's capsys swaps sys.stdout

    def _uses_bar(self) -> bool:
        if self._want_bar is not None:
            return self._want_bar
        return self._write is None and _is_terminal(self._out)

    def eta(self, step: int) -> float | None:
        t0, s0 = self._ref
        elapsed = self.clock() - t0
        if step <= s0 or elapsed <= 0:
            return None
        return (self.total - step) * elapsed / (step - s0)

    def _fields(self, metrics: Mapping[str, Any]) -> list[str]:
        """The metric fields of a line (``loss 1.2345``, ``bpb 1.7810``, ...), in line order."""
        m = {k: v for k, v in metrics.items() if v is not None}
        parts = []
        if "loss" in m:
            parts.append(f"loss {float(m['loss']):.4f}")
        bpb = m.get("bits_per_byte", bits_per_byte(float(m["loss"])) if "loss" in m else None)
        if bpb is not None:
            parts.append(f"bpb {float(bpb):.4f}")
        if "bytes_per_sec" in m:
            parts.append(format_rate(float(m["bytes_per_sec"])))
        if "patches_per_row" in m:
            parts.append(f"patches/row {float(m['patches_per_row']):.1f}")
        if "avg_patch_len" in m:
            parts.append(f"patch len {float(m['avg_patch_len']):.2f}")
        if "mfu" in m:
            parts.append(f"MFU {100.0 * float(m['mfu']):.1f}%")
        if "masked_accuracy" in m:
            parts.append(f"masked acc {float(m['masked_accuracy']):.3f}")
        if "peak_memory_gb" in m:
            parts.append(f"mem {float(m['peak_memory_gb']):.1f} GB")
        return parts

    def line(self, step: int, metrics: Mapping[str, Any]) -> str:
        """The progress line for ``step``; the first call also resets the ETA reference."""
        eta = self.eta(step)
        if self._first_line:  # later ETAs leave out compilation, which happened before this line
            self._ref, self._first_line = (self.clock(), step), False
        width = len(str(self.total))
        head = f"step {step:>{width}}/{self.total} ({100.0 * step / self.total:5.1f}%)"
        tail = f"ETA {format_duration(eta) if eta is not None else '?'}"
        return " | ".join([head, *self._fields(metrics), tail])

    def advance(self, step: int) -> None:
        """Moves the bar to ``step`` (steps done); without a bar, nothing (lines come from update)."""
        if not self._uses_bar():
            return
        if self._bar is None:
            # Made at the first step, not at construction: its rate leaves out the setup before it.
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total, initial=self._start, file=self._out, unit="step", dynamic_ncols=True
            )
        self._bar.update(step - self._bar.n)

    def update(self, step: int, metrics: Mapping[str, Any]) -> str | None:
        """Every ``every`` steps and at the last: prints the line (or, with a bar, shows its fields
        on the bar) and returns it; None at other steps (a bar still advances)."""
        if step % self.every and step != self.total:
            self.advance(step)
            return None
        text = self.line(step, metrics)
        if self._uses_bar():
            self.advance(step)
            self._bar.set_postfix_str(" | ".join(self._fields(metrics)), refresh=False)
            self._bar.refresh()
        else:
            self.write(text)
        return text

    def write(self, text: str) -> None:
        """A message line: above the bar while one is shown (tqdm keeps it intact), else as a line."""
        if self._bar is not None:
            self._bar.write(text, file=self._out)
        elif self._write is not None:
            self._write(text)
        else:
            print(text, file=self._out, flush=True)

    def close(self) -> None:
        """Leaves the bar's last state on screen; later messages print as plain lines."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

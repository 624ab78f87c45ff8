"""Metrics: FLOPs per byte against a hand count, MFU, the TensorBoard event file (read back with an
independent record parser and protobuf's own decoder, and with TensorBoard's own reader) and the
console progress (plain lines, or a tqdm bar on a terminal)."""

from __future__ import annotations

import glob
import importlib.util
import io
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from fastblt.config import EntropyModelConfig, LocalModelConfig, ModelConfig, PatcherConfig, TransformerConfig
from fastblt.train.metrics import (
    PEAK_FLOPS,
    MetricWriter,
    ProgressBar,
    bits_per_byte,
    entropy_model_flops_per_byte,
    format_duration,
    mfu,
    model_flops_breakdown,
    model_flops_per_byte,
    peak_flops,
)

# --------------------------------------------------------------------------- FLOPs: hand count


def visible_keys(n: int, window: int | None) -> int:
    """Naive count of the True entries of a causal (optionally windowed) n x n mask."""
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    mask = j <= i
    if window is not None:
        mask &= i - j < window
    return int(mask.sum())


def tiny_blt() -> ModelConfig:
    return ModelConfig(
        encoder=LocalModelConfig(dim=8, n_layers=1, n_heads=2, ffn_dim=16, window=4),
        global_model=TransformerConfig(dim=24, n_layers=2, n_heads=3, ffn_dim=32),
        decoder=LocalModelConfig(
            dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=16, window=16, cross_attn_all_layers=True
        ),
        entropy_model=EntropyModelConfig(dim=8, n_layers=1, n_heads=2, ffn_dim=16, window=4),
        patcher=PatcherConfig(mode="static"),
        cross_attn_k=2,
        vocab_size=260,
    )


def test_visible_key_counts_by_enumeration():
    assert visible_keys(8, 4) == 1 + 2 + 3 + 4 + 4 + 4 + 4 + 4 == 26
    assert visible_keys(8, None) == visible_keys(8, 16) == 36
    assert visible_keys(4, None) == 1 + 2 + 3 + 4 == 10


def test_blt_flops_per_byte_matches_hand_count():
    """One row of N = 8 bytes, average patch length L = 2, so P = 4 patches and 8 slots (k = 2).

    A matmul costs 2 FLOPs per weight per row it multiplies; attention 2 * head_dim per (query,
    key, head) for the scores and as much for the values, i.e. 4 * keys * (heads * head_dim).
    """
    # Local encoder: D = 8, 2 heads of 4, FFN 16, window 4, one cross-attention after its layer.
    enc_layer_weights = 4 * 8 * 8 + 3 * 8 * 16  # wq wk wv wo (64 each) + w1 w3 w2 = 256 + 384 = 640
    enc_layer_matmul = 8 * 2 * enc_layer_weights  # 8 bytes -> 10240
    enc_layer_attn = 4 * visible_keys(8, 4) * 8  # 26 keys -> 832
    enc_pool_proj = 4 * 2 * 8 * 16  # 4 patches, Linear(8 -> 16) -> 1024
    enc_cross_q_o = 8 * 2 * 2 * 8 * 8  # wq, wo on 8 slots -> 2048
    enc_cross_k_v = 8 * 2 * 2 * 8 * 8  # wk, wv on 8 bytes -> 2048
    enc_cross_attn = 8 * 4 * 2 * 8  # each of 8 slots attends the L = 2 bytes of its patch -> 512
    encoder = (
        enc_layer_matmul + enc_layer_attn + enc_pool_proj + enc_cross_q_o + enc_cross_k_v + enc_cross_attn
    )
    assert encoder == 16704

    # Global: input k * D_e = 16 != 24 -> projection; 2 layers of D = 24, 3 heads of 8, FFN 32, causal.
    glob_proj = 4 * 2 * 16 * 24  # 4 patches -> 3072
    glob_layer_weights = 4 * 24 * 24 + 3 * 24 * 32  # 2304 + 2304 = 4608
    glob_matmul = 2 * 4 * 2 * glob_layer_weights  # 2 layers, 4 patches -> 73728
    glob_attn = 2 * 4 * visible_keys(4, None) * 24  # 2 layers, 10 keys -> 1920
    global_ = glob_proj + glob_matmul + glob_attn
    assert global_ == 78720

    # Local decoder: D = 8, 2 heads of 4, 1 kv head, FFN 16, window 16 >= 8 (plain causal),
    # cross-attention before each of its 2 layers, output head to 260.
    dec_slot_proj = 4 * 2 * 24 * 16  # 4 patches, Linear(24 -> 16) -> 3072
    dec_cross_q_o = 2 * 8 * 2 * 2 * 8 * 8  # 2 layers, wq, wo on 8 bytes -> 4096
    dec_cross_k_v = 2 * 8 * 2 * 2 * 8 * 8  # 2 layers, wk, wv on 8 slots -> 4096
    dec_cross_attn = 2 * 8 * 4 * 2 * 8  # 2 layers, each byte attends k = 2 slots -> 1024
    dec_layer_weights = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16  # GQA: wk, wv are 8 x 4 -> 576
    dec_matmul = 2 * 8 * 2 * dec_layer_weights  # 2 layers, 8 bytes -> 18432
    dec_attn = 2 * 4 * visible_keys(8, 16) * 8  # 2 layers, 36 keys -> 2304
    dec_head = 8 * 2 * 8 * 260  # -> 33280
    decoder = (
        dec_slot_proj + dec_cross_q_o + dec_cross_k_v + dec_cross_attn + dec_matmul + dec_attn + dec_head
    )
    assert decoder == 66304

    parts = model_flops_breakdown(tiny_blt(), seq_len=8, avg_patch_len=2.0)
    assert parts["local_encoder"] * 8 == pytest.approx(encoder)
    assert parts["global_transformer"] * 8 == pytest.approx(global_)
    assert parts["local_decoder"] * 8 == pytest.approx(decoder)
    per_byte = (encoder + global_ + decoder) / 8  # 161728 / 8 = 20216
    assert model_flops_per_byte(tiny_blt(), 8, 2.0, training=False) == pytest.approx(per_byte)
    assert model_flops_per_byte(tiny_blt(), 8, 2.0) == pytest.approx(3 * per_byte)


def test_blt_d_block_rows_flops_match_hand_count():
    """BLT-D adds B / L block rows per byte to the decoder: N = 8, L = 2 (4 patches), B = 2 -> 8 rows.

    A block row runs both decoder layers (576 weights each; attention over the clean context, counted
    as the clean rows' mean 36 / 8 = 4.5 keys, plus its B = 2 cells), both cross-attentions (wq, wo and
    the k = 2 slots) and the output head.
    """
    from fastblt.train.blt_d import ObjectiveConfig

    layers = 2 * (2 * 576 + 4 * (36 / 8 + 2) * 8)  # 2 * (1152 + 208)
    cross = 2 * (2 * 2 * 8 * 8 + 4 * 2 * 8)  # 2 * (256 + 64)
    head = 2 * 8 * 260
    per_row = layers + cross + head
    assert per_row == 7520
    objective = ObjectiveConfig(kind="blt_d", block_size=2)
    plain = model_flops_per_byte(tiny_blt(), 8, 2.0, training=False)
    with_blocks = model_flops_per_byte(tiny_blt(), 8, 2.0, training=False, objective=objective)
    assert with_blocks - plain == pytest.approx(8 * per_row / 8)
    # The next-byte objective adds nothing.
    assert model_flops_per_byte(tiny_blt(), 8, 2.0, objective=ObjectiveConfig()) == pytest.approx(3 * plain)


def test_entropy_model_flops_match_hand_count():
    # 1 layer of D = 8 (640 weights) on 8 bytes, windowed attention (26 keys), head 8 -> 260; no lookup cost.
    row = 8 * 2 * 640 + 4 * visible_keys(8, 4) * 8 + 8 * 2 * 8 * 260
    assert row == 10240 + 832 + 33280
    assert entropy_model_flops_per_byte(tiny_blt(), 8) == pytest.approx(row / 8)
    assert entropy_model_flops_per_byte(tiny_blt().entropy_model, 8, training=True) == pytest.approx(
        3 * row / 8
    )
    with pytest.raises(ValueError, match="entropy_model"):
        entropy_model_flops_per_byte(tiny_blt().replace(entropy_model=None), 8)


def test_longer_patches_make_global_cheaper_per_byte():
    cfg = tiny_blt()
    short, long = (model_flops_breakdown(cfg, 64, lp)["global_transformer"] for lp in (2.0, 8.0))
    assert long < short / 4  # per-patch work divided by L, and attention over fewer patches
    with pytest.raises(ValueError, match="avg_patch_len"):
        model_flops_per_byte(cfg, 64, 0.0)


# --------------------------------------------------------------------------- MFU


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5p", 459e12),
        ("TPU v5", 459e12),
        ("TPU v6 lite", 918e12),
        ("cpu", None),
        ("TFRT_CPU_0", None),
    ],
)
def test_peak_flops_table(kind, peak):
    assert peak_flops(kind) == peak


def test_mfu():
    # 1e9 FLOPs/byte at 5e5 bytes/s on 2 H100s: 5e14 / (2 * 989e12).
    assert mfu(1e9, 5e5, 2, "NVIDIA H100 80GB HBM3") == pytest.approx(5e14 / 1.978e15)
    assert mfu(1e9, 5e5, 1, "cpu") is None
    assert all(v > 1e14 for v in PEAK_FLOPS.values())


def test_bits_per_byte():
    assert bits_per_byte(math.log(2.0)) == pytest.approx(1.0)
    assert bits_per_byte(2.0) == pytest.approx(2.0 / 0.6931471805599453)


# --------------------------------------------------------------------------- event files


def crc32c_bitwise(data: bytes) -> int:
    """CRC-32C computed bit by bit (an independent check of the writer's table-driven CRC)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path: str) -> list[bytes]:
    """TFRecord framing: u64 length, u32 masked crc(length), data, u32 masked crc(data)."""
    out, blob, pos = [], open(path, "rb").read(), 0
    while pos < len(blob):
        (length,) = struct.unpack_from("<Q", blob, pos)
        (len_crc,) = struct.unpack_from("<I", blob, pos + 8)
        assert len_crc == masked(crc32c_bitwise(blob[pos : pos + 8]))
        data = blob[pos + 12 : pos + 12 + length]
        (data_crc,) = struct.unpack_from("<I", blob, pos + 12 + length)
        assert data_crc == masked(crc32c_bitwise(data))
        out.append(data)
        pos += 12 + length + 4
    return out


def event_class():
    """tensorflow.Event / Summary / Summary.Value / SessionLog declared from their field numbers, for
    protobuf (independent of the writer's own proto classes)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FileDescriptorProto(name="test_event.proto", package="tbtest", syntax="proto3")
    t = descriptor_pb2.FieldDescriptorProto
    summary = f.message_type.add(name="Summary")
    value = summary.nested_type.add(name="Value")
    value.field.add(name="tag", number=1, type=t.TYPE_STRING, label=t.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=t.TYPE_FLOAT, label=t.LABEL_OPTIONAL)
    summary.field.add(
        name="value", number=1, type=t.TYPE_MESSAGE, label=t.LABEL_REPEATED, type_name=".tbtest.Summary.Value"
    )
    event = f.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=t.TYPE_DOUBLE, label=t.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=t.TYPE_INT64, label=t.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=t.TYPE_STRING, label=t.LABEL_OPTIONAL)
    event.field.add(
        name="summary", number=5, type=t.TYPE_MESSAGE, label=t.LABEL_OPTIONAL, type_name=".tbtest.Summary"
    )
    # Event.session_log = 7 (6 is the deprecated log_message); SessionLog { SessionStatus status = 1 },
    # START = 1: TensorBoard's purge marker.
    session = f.message_type.add(name="SessionLog")
    session.field.add(name="status", number=1, type=t.TYPE_INT32, label=t.LABEL_OPTIONAL)
    event.field.add(
        name="session_log",
        number=7,
        type=t.TYPE_MESSAGE,
        label=t.LABEL_OPTIONAL,
        type_name=".tbtest.SessionLog",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tbtest.Event"))


def test_crc32c_oracle_check_value():
    """The test-side CRC that read_records checks the writer's framing with."""
    assert crc32c_bitwise(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c_bitwise(b"") == 0


def test_metric_writer_event_file_reads_back(tmp_path):
    with MetricWriter(tmp_path / "tb") as w:
        w.write_scalars(10, {"loss": 2.5, "bits_per_byte": 3.6067376, "mfu": None})
        w.write_scalars(20, {"loss": 1.25, "lr": np.float32(3e-4)})
    files = glob.glob(os.path.join(tmp_path, "tb", "events.out.tfevents.*"))
    assert files == [w.path]
    Event = event_class()
    events = [Event.FromString(r) for r in read_records(files[0])]
    assert events[0].file_version == "brain.Event:2"
    assert not any(e.HasField("session_log") for e in events)  # a fresh writer purges nothing
    scalars = {(e.step, v.tag): v.simple_value for e in events[1:] for v in e.summary.value}
    assert scalars == {
        (10, "loss"): 2.5,
        (10, "bits_per_byte"): pytest.approx(3.6067376),
        (20, "loss"): 1.25,
        (20, "lr"): pytest.approx(3e-4),
    }
    assert all(e.wall_time > 1.6e9 for e in events)
    lines = [json.loads(x) for x in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 10, "loss": 2.5, "bits_per_byte": pytest.approx(3.6067376)}
    assert lines[1]["step"] == 20


def test_metric_writer_disabled_writes_nothing(tmp_path):
    w = MetricWriter(tmp_path / "tb", enabled=False)
    w.write_scalars(1, {"loss": 1.0})
    w.close()
    assert not (tmp_path / "tb").exists()


def test_tensorboard_reader(tmp_path):
    """The real TensorBoard loader (the `test` extra installs tensorboard)."""
    from tensorboard.backend.event_processing import event_file_loader as loader

    with MetricWriter(tmp_path) as w:
        w.write_scalars(3, {"loss": 0.5})
    (path,) = glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))
    events = list(loader.EventFileLoader(path).Load())
    values = [(e.step, v.tag) for e in events for v in e.summary.value]
    assert (3, "loss") in values


# --------------------------------------------------------------------------- console


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_progress_line_fields_and_eta():
    clock = FakeClock()
    bar = ProgressBar(1000, clock=clock)
    clock.t += 50.0  # 100 steps (with compilation) in 50 s
    first = bar.line(
        100,
        {
            "loss": 1.0,
            "bytes_per_sec": 1.5e6,
            "patches_per_row": 512.0,
            "avg_patch_len": 4.5,
            "mfu": 0.352,
        },
    )
    assert first.startswith("step  100/1000 ( 10.0%)")
    for part in (
        "loss 1.0000",
        f"bpb {1 / math.log(2):.4f}",
        "1.5 MB/s",
        "patches/row 512.0",
        "patch len 4.50",
    ):
        assert part in first
    assert "MFU 35.2%" in first
    assert "ETA 7m30s" in first  # 900 steps at 0.5 s/step
    clock.t += 20.0  # the next 100 steps take 20 s: the rate since the first line is 0.2 s/step
    second = bar.line(200, {"loss": 0.9})
    assert "ETA 2m40s" in second and "MFU" not in second and "MB/s" not in second


def test_progress_update_prints_every_n(capsys):
    bar = ProgressBar(10, every=4)
    printed = [s for s in range(1, 11) if bar.update(s, {"loss": 1.0})]
    assert printed == [4, 8, 10]
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[0].startswith("step  4/10")
    assert "\r" not in "".join(out) and "\x1b" not in "".join(out)


def test_format_duration():
    assert [format_duration(s) for s in (5, 185, 3720, 2 * 86400 + 3 * 3600)] == [
        "5s",
        "3m05s",
        "1h02m",
        "2d03h",
    ]


def test_resumed_writer_keeps_each_step_once(tmp_path):
    """A run killed after logging steps 1-7 but checkpointing step 4 replays 5-7 when resumed."""
    with MetricWriter(tmp_path) as w:
        for step in range(1, 8):
            w.write_scalars(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # a line cut by the kill
    with MetricWriter(tmp_path, resume_step=4) as w:
        for step in range(5, 8):
            w.write_scalars(step, {"loss": 10.0 + step})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["loss"] for r in rows[4:]] == [15.0, 16.0, 17.0]

    # TensorBoard: the resumed file starts with a purge marker at step 5 ...
    Event = event_class()
    resumed = [Event.FromString(r) for r in read_records(w.path)]
    starts = [e.step for e in resumed if e.HasField("session_log") and e.session_log.status == 1]
    assert starts == [5]
    # ... and TensorBoard's own reader, over the directory, shows each step once, the replay's values.
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.0),
        (5, 15.0),
        (6, 16.0),
        (7, 17.0),
    ]


def test_metric_writer_rejects_closed_and_bad_input(tmp_path):
    w = MetricWriter(tmp_path)
    with pytest.raises(ValueError):
        w.write_scalars(1, {"loss": "not a number"})
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.write_scalars(2, {"loss": 1.0})
    with pytest.raises(ValueError, match="resume_step must be >= 0"):
        MetricWriter(tmp_path / "other", resume_step=-1)


class Terminal(io.StringIO):
    """A stream that says it is a terminal (what tqdm draws its bar on)."""

    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_draws_a_tqdm_bar():
    out = Terminal()
    with ProgressBar(10, every=5, stream=out) as bar:
        bar.advance(1)
        bar.write("a message")
        for step in range(2, 11):
            bar.update(step, {"loss": 1.0, "mfu": 0.5})
    text = out.getvalue()
    assert "\r" in text and "10/10" in text  # redrawn in place, up to the last step
    assert "loss 1.0000 | bpb" in text and "MFU 50.0%" in text  # the line's fields as the postfix
    assert "step  5/10" not in text and "ETA" not in text  # tqdm shows the step and time itself
    assert "a message\n" in text  # messages go above the bar, whole


def test_progress_plain_when_not_a_terminal_or_given_a_log():
    out = io.StringIO()  # isatty() is False: a log file or a pipe
    bar = ProgressBar(4, stream=out)
    bar.advance(1)  # nothing without a bar
    bar.update(2, {"loss": 1.0})
    bar.write("msg")
    assert out.getvalue().splitlines()[0].startswith("step 2/4 ( 50.0%) | loss 1.0000")
    assert out.getvalue().splitlines()[1] == "msg" and "\r" not in out.getvalue()

    lines: list[str] = []
    bar = ProgressBar(4, stream=Terminal(), write=lines.append)  # a caller's log: never a bar
    assert bar.update(4, {"loss": 1.0}) == lines[0] and lines[0].startswith("step 4/4 (100.0%)")
    bar.write("msg")
    assert lines[1:] == ["msg"]
    with pytest.raises(ValueError, match="bar=True"):
        ProgressBar(4, write=lines.append, bar=True)


def test_metric_writer_does_not_import_torch(tmp_path):
    """tensorboardX imports torch when installed (seconds, and CUDA libraries beside JAX's): the
    writer keeps it out, and torch stays importable after."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed: nothing to keep out")
    probe = (
        "import sys\n"
        "from fastblt.train.metrics import MetricWriter\n"
        f"with MetricWriter({str(tmp_path)!r}) as w:\n"
        "    w.write_scalars(1, {'loss': 1.0})\n"
        "assert 'tensorboardX' in sys.modules and 'torch' not in sys.modules, 'torch was imported'\n"
        "import torch\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=repo, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _read_all(screen, quiet_s: float = 0.5) -> bytes:
    """Everything written to a pseudo-terminal so far: one read may return only part of it."""
    import select

    chunks = []
    while select.select([screen], [], [], quiet_s)[0]:
        chunk = screen.read(65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs pseudo-terminals (POSIX)")
def test_progress_bar_needs_a_terminal_with_a_width():
    """A pseudo-terminal of unset size (0 columns) would show an empty bar: plain lines instead."""
    import fcntl
    import termios

    leader, follower = os.openpty()
    with open(follower, "w") as tty, open(leader, "rb", buffering=0) as screen:
        assert tty.isatty() and os.get_terminal_size(follower).columns == 0
        ProgressBar(4, stream=tty).update(2, {"loss": 1.0})
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 x 100
        with ProgressBar(4, stream=tty) as bar:
            bar.update(3, {"loss": 1.0})
        tty.flush()
        shown = _read_all(screen).decode()
    plain, drawn = shown.split("\n", 1)
    assert plain.rstrip("\r").startswith("step 2/4 ( 50.0%) | loss 1.0000")
    assert "3/4" in drawn and "|" in drawn and "step 3/4" not in drawn

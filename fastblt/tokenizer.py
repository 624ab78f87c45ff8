"""Byte tokenizer of the BLT reference: byte ``b`` becomes id ``b + 4``; ids 0..3 are special.

Numpy only (no JAX import) so data pipelines and the CLI can use it without starting a backend.
Text is UTF-8 encoded; ``bytes`` are taken as they are, so arbitrary (even invalid UTF-8) byte
strings round-trip losslessly through :func:`encode` and :func:`decode_bytes`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOE = 0  # beginning of example; also the padding id of training batches
BOS = 1
EOS = 2
BPE = 3  # BPE delimiter of the reference's unused `bpe` patching mode
OFFSET = 4  # byte b has id b + OFFSET
VOCAB_SIZE = 256 + OFFSET

Data = str | bytes | bytearray | memoryview


def _as_bytes(data: Data) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(
        f"encode expects str or bytes, got {type(data).__name__}; decode/encode it to bytes first"
    )


def encode(data: Data, add_bos: bool = True, add_eos: bool = False) -> np.ndarray:
    """Encodes text (as UTF-8) or raw bytes to token ids.

    Returns ``int32[n]`` with ``n = len(bytes) + add_bos + add_eos``. The reference defaults to
    ``add_eos=True``; generation prompts use ``add_eos=False``, which is the default here.
    """
    raw = np.frombuffer(_as_bytes(data), dtype=np.uint8).astype(np.int32) + OFFSET
    parts = []
    if add_bos:
        parts.append(np.array([BOS], np.int32))
    parts.append(raw)
    if add_eos:
        parts.append(np.array([EOS], np.int32))
    return np.concatenate(parts).astype(np.int32, copy=False)


def decode_bytes(ids: Sequence[int] | np.ndarray, cut_at_eos: bool = False) -> bytes:
    """Decodes token ids ``int[n]`` to bytes: special ids (< 4) are dropped.

    With ``cut_at_eos`` everything from the first EOS on is dropped. Raises ValueError for ids
    outside ``[0, VOCAB_SIZE)`` (e.g. the -1 that marks unfilled generation slots): slice them off first.
    """
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(
            f"decode expects a 1-D sequence of ids, got shape {arr.shape}; decode rows one by one"
        )
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"decode expects integer ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= VOCAB_SIZE)
    if bad.any():
        first = int(np.argmax(bad))
        raise ValueError(
            f"id {int(arr[first])} at position {first} is outside the byte vocabulary [0, {VOCAB_SIZE}); "
            "drop padding/unfilled slots before decoding"
        )
    if cut_at_eos:
        eos = np.flatnonzero(arr == EOS)
        if eos.size:
            arr = arr[: eos[0]]
    return (arr[arr >= OFFSET] - OFFSET).astype(np.uint8).tobytes()


def decode(ids: Sequence[int] | np.ndarray, cut_at_eos: bool = False) -> str:
    """Decodes token ids ``int[n]`` to text; invalid UTF-8 is dropped (``errors="ignore"``)."""
    return decode_bytes(ids, cut_at_eos=cut_at_eos).decode("utf-8", errors="ignore")


def encode_batch(
    data: Sequence[Data], length: int, add_bos: bool = True, add_eos: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Encodes a list of texts/byte strings into one right-padded (BOE) batch.

    Returns ``(ids: int32[batch, length], lengths: int32[batch])`` where ``lengths`` counts the real
    ids of each row (specials included). Raises ValueError if a row needs more than ``length`` ids.
    """
    if isinstance(data, (str, bytes, bytearray, memoryview)):
        raise TypeError("encode_batch expects a list of texts or byte strings; wrap a single one in a list")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    ids = np.full((len(data), length), BOE, dtype=np.int32)
    lengths = np.zeros((len(data),), dtype=np.int32)
    for row, item in enumerate(data):
        encoded = encode(item, add_bos=add_bos, add_eos=add_eos)
        if encoded.shape[0] > length:
            raise ValueError(
                f"row {row} encodes to {encoded.shape[0]} ids, more than length={length}; "
                "raise length or truncate the input"
            )
        ids[row, : encoded.shape[0]] = encoded
        lengths[row] = encoded.shape[0]
    return ids, lengths

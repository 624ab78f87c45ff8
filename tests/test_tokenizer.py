"""Byte tokenizer: ids are byte + 4 with BOE/BOS/EOS/BPE = 0/1/2/3 (notes §1)."""

import numpy as np
import pytest

from fastblt import tokenizer as tok


def test_special_ids():
    assert (tok.BOE, tok.BOS, tok.EOS, tok.BPE, tok.OFFSET, tok.VOCAB_SIZE) == (0, 1, 2, 3, 4, 260)


def test_hello_vector():
    ids = tok.encode("Hello")
    assert ids.dtype == np.int32
    assert ids.tolist() == [1, 76, 105, 112, 112, 115]
    assert tok.encode("Hello", add_eos=True).tolist() == [1, 76, 105, 112, 112, 115, 2]
    assert tok.encode("Hello", add_bos=False).tolist() == [76, 105, 112, 112, 115]


def test_utf8_text_is_encoded_bytewise():
    # "é" is the two UTF-8 bytes 0xC3 0xA9.
    assert tok.encode("é", add_bos=False).tolist() == [0xC3 + 4, 0xA9 + 4]
    assert tok.decode(tok.encode("héllo, wörld ✓")) == "héllo, wörld ✓"


def test_random_bytes_round_trip_losslessly():
    rng = np.random.default_rng(0)
    every_byte = bytes(range(256))
    noise = rng.integers(0, 256, size=1000, dtype=np.uint8).tobytes()
    for data in (every_byte, noise, b"\xff\xfe\xc3(", b""):
        ids = tok.encode(data, add_eos=True)
        assert ids.tolist() == [1] + [b + 4 for b in data] + [2]
        assert tok.decode_bytes(ids) == data


def test_decode_drops_specials_and_ignores_invalid_utf8():
    ids = [tok.BOS, 72 + 4, tok.BOE, 105 + 4, tok.BPE, 0xFF + 4, tok.EOS]
    assert tok.decode_bytes(ids) == b"Hi\xff"
    assert tok.decode(ids) == "Hi"


def test_cut_at_eos():
    ids = tok.encode(b"ab", add_eos=True).tolist() + [99 + 4]
    assert tok.decode_bytes(ids) == b"abc"
    assert tok.decode_bytes(ids, cut_at_eos=True) == b"ab"
    assert tok.decode(ids, cut_at_eos=True) == "ab"


@pytest.mark.parametrize("bad", [-1, 260, 1000])
def test_decode_rejects_ids_outside_vocab(bad):
    with pytest.raises(ValueError, match=rf"id {bad} at position 1 is outside the byte vocabulary"):
        tok.decode_bytes([1, bad, 5])


def test_decode_rejects_2d():
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(np.zeros((2, 3), np.int32))


def test_encode_rejects_other_types():
    with pytest.raises(TypeError, match="str or bytes"):
        tok.encode([1, 2, 3])


def test_encode_batch_pads_with_boe():
    ids, lengths = tok.encode_batch(["Hi", b"\x00", ""], length=5)
    assert ids.dtype == np.int32 and lengths.dtype == np.int32
    assert ids.tolist() == [[1, 76, 109, 0, 0], [1, 4, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert lengths.tolist() == [3, 2, 1]
    ids, lengths = tok.encode_batch(["Hi"], length=4, add_bos=False, add_eos=True)
    assert ids.tolist() == [[76, 109, 2, 0]] and lengths.tolist() == [3]


def test_encode_batch_too_long_names_the_length():
    with pytest.raises(ValueError, match=r"row 1 encodes to 6 ids, more than length=5"):
        tok.encode_batch(["ab", "abcde"], length=5)


def test_encode_batch_rejects_a_single_string():
    with pytest.raises(TypeError, match="list"):
        tok.encode_batch("abc", length=8)

"""Packed token arrays: exact round trips, numpy input, and clear errors on torn data."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from schemas.codecs import pack_float32, pack_int32, pack_uint8, unpack_float32, unpack_int32, unpack_uint8


def test_int32_round_trip_and_layout():
    ids = [0, 1, 49151, 2**31 - 1, -5]
    packed = pack_int32(ids)
    assert packed == struct.pack("<5i", *ids)
    assert unpack_int32(packed) == ids


def test_float32_round_trip_is_exact_for_float32_values():
    values = struct.unpack("<3f", struct.pack("<3f", -0.1, -12.75, 0.0))
    assert unpack_float32(pack_float32(values)) == list(values)


def test_numpy_input_is_packed_little_endian():
    arr = np.array([3, 2, 1], dtype=">i8")  # big-endian int64 on purpose
    assert unpack_int32(pack_int32(arr)) == [3, 2, 1]
    assert unpack_uint8(pack_uint8(np.array([1, 0, 1]))) == [1, 0, 1]


def test_torn_buffer_is_an_error():
    with pytest.raises(ValueError, match="not a multiple of 4"):
        unpack_int32(b"\x01\x02\x03")


def test_empty_arrays():
    assert unpack_int32(pack_int32([])) == []
    assert unpack_float32(pack_float32([])) == []

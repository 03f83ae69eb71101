"""TFRecord files of `tf.train.Example` messages, read without TensorFlow.

A TFRecord file is a sequence of records, all integers little-endian::

    uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)

Every CRC is checked. A byte-at-a-time CRC in Python would take hours on ImageNet32's
1.28 M records, so `crc32c_many` computes the CRCs of many messages at once with numpy: each
message is cut into 64-byte segments, all segments of all messages advance two bytes per step
in parallel (a 65536-entry table), and the segment CRCs are then chained with a precomputed
"advance over 64 zero bytes" operator (CRCs are linear over GF(2), so this is exact).
"""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Any

import numpy as np

from sdn.data.errors import DatasetError

_POLY = 0x82F63B78  # CRC-32C (Castagnoli), bit-reversed
_MASK_DELTA = 0xA282EAD8
_SEGMENT = 64
_LANES = 16384  # segments processed together
_HEADER = 12  # length (8) + its CRC (4)


def _byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1).astype(np.uint32)
    return table


_TABLE = _byte_table()


def _advance(register: np.ndarray, nbytes: int) -> np.ndarray:
    """The CRC register after `nbytes` zero bytes, byte by byte."""
    for _ in range(nbytes):
        register = _TABLE[register & 0xFF] ^ (register >> 8)
    return register


# Two message bytes at a time: the register's low 16 bits (message xor-ed in) after two steps.
_TABLE16 = _advance(np.arange(1 << 16, dtype=np.uint32), 2)
# Advancing over zero bytes is linear in the register, so it is tabulated per register byte.
_ADVANCE_SEGMENT = _advance(
    np.arange(256, dtype=np.uint32)[None, :] << (8 * np.arange(4, dtype=np.uint32)[:, None]), _SEGMENT
)


def _advance_segment(register: np.ndarray) -> np.ndarray:
    table = _ADVANCE_SEGMENT
    return (
        table[0][register & 0xFF]
        ^ table[1][(register >> 8) & 0xFF]
        ^ table[2][(register >> 16) & 0xFF]
        ^ table[3][register >> 24]
    )


@lru_cache(maxsize=64)
def _crc_of_init(length: int) -> int:
    """What the standard initial value and final xor (both 0xFFFFFFFF) add to a `length`-byte CRC."""
    register = np.array([0xFFFFFFFF], dtype=np.uint32)
    for _ in range(length // _SEGMENT):
        register = _advance_segment(register)
    return int(_advance(register, length % _SEGMENT)[0]) ^ 0xFFFFFFFF


def _segment_crcs(words: np.ndarray) -> np.ndarray:
    """Zero-initialised CRC of each row of `words` (rows of uint16 message pairs)."""
    columns = np.ascontiguousarray(words.T)
    register = np.zeros(columns.shape[1], dtype=np.uint32)
    index = np.empty(columns.shape[1], dtype=np.intp)
    looked_up = np.empty(columns.shape[1], dtype=np.uint32)
    for word in columns:  # in place: this loop is the hot path of an ImageNet32 conversion
        np.bitwise_and(register, 0xFFFF, out=index, casting="unsafe")
        np.bitwise_xor(index, word, out=index)
        np.take(_TABLE16, index, out=looked_up)
        np.right_shift(register, 16, out=register)
        np.bitwise_xor(register, looked_up, out=register)
    return register


def crc32c_many(buffer: np.ndarray, offsets: np.ndarray, length: int) -> np.ndarray:
    """CRC-32C of the `length`-byte messages starting at each of `offsets` in the uint8 `buffer`."""
    offsets = np.asarray(offsets, dtype=np.int64)
    if length == 0:
        return np.zeros(len(offsets), dtype=np.uint32)
    segments = -(-length // _SEGMENT)
    # Leading zero bytes leave a zero-initialised CRC unchanged: left-pad to whole segments.
    padded = np.zeros((len(offsets), segments * _SEGMENT), dtype=np.uint8)
    start = segments * _SEGMENT - length
    for row, offset in zip(padded, offsets, strict=True):
        row[start:] = buffer[offset : offset + length]
    # One lane per segment, fed two bytes (a little-endian uint16) per step; lanes go in blocks
    # whose transposed copy stays in cache.
    words = padded.view("<u2").reshape(-1, _SEGMENT // 2)
    register = np.concatenate([_segment_crcs(words[i : i + _LANES]) for i in range(0, len(words), _LANES)])
    register = register.reshape(len(offsets), segments)
    crc = np.zeros(len(offsets), dtype=np.uint32)
    for k in range(segments):
        crc = _advance_segment(crc) ^ register[:, k]
    return crc ^ np.uint32(_crc_of_init(length))


def crc32c(data: bytes) -> int:
    """CRC-32C of one message."""
    return int(crc32c_many(np.frombuffer(data, dtype=np.uint8), np.zeros(1), len(data))[0])


def mask_crc(crc: np.ndarray | int) -> np.ndarray | int:
    """TFRecord's masked CRC: rotate right by 15 bits, add a constant (mod 2**32)."""
    crc = np.asarray(crc, dtype=np.uint64)
    masked = (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF
    return masked.astype(np.uint32) if masked.ndim else int(masked)


def read_records(data: bytes, source: str) -> list[bytes]:
    """The records of one TFRecord file's bytes, after checking every length and data CRC."""
    offsets, lengths, length_crcs, data_crcs = [], [], [], []
    position = 0
    while position < len(data):
        if position + _HEADER > len(data):
            raise DatasetError(f"{source}: truncated record header at byte {position}.")
        (length,) = struct.unpack_from("<Q", data, position)
        end = position + _HEADER + length + 4
        if end > len(data):
            raise DatasetError(
                f"{source}: record at byte {position} claims {length} bytes but the file ends at "
                f"{len(data)}: the file is truncated or corrupt; download it again."
            )
        offsets.append(position)
        lengths.append(length)
        length_crcs.append(struct.unpack_from("<I", data, position + 8)[0])
        data_crcs.append(struct.unpack_from("<I", data, end - 4)[0])
        position = end
    if not offsets:
        return []
    buffer = np.frombuffer(data, dtype=np.uint8)
    offsets_arr, lengths_arr = np.array(offsets), np.array(lengths)
    _check(
        mask_crc(crc32c_many(buffer, offsets_arr, 8)), np.array(length_crcs), offsets_arr, source, "length"
    )
    for length in np.unique(lengths_arr):
        group = np.flatnonzero(lengths_arr == length)
        found = mask_crc(crc32c_many(buffer, offsets_arr[group] + _HEADER, int(length)))
        _check(found, np.array(data_crcs)[group], offsets_arr[group], source, "data")
    return [data[o + _HEADER : o + _HEADER + n] for o, n in zip(offsets, lengths, strict=True)]


def _check(found: np.ndarray, stored: np.ndarray, offsets: np.ndarray, source: str, what: str) -> None:
    bad = np.flatnonzero(found != stored)
    if len(bad):
        raise DatasetError(
            f"{source}: {what} CRC mismatch in {len(bad)} record(s), first at byte {offsets[bad[0]]}: "
            "the file is corrupt; download it again."
        )


# --- tf.train.Example: a minimal protobuf wire-format reader ----------------------------------
# Example{features=1: Features}; Features{feature=1: map<string, Feature>} (entries key=1, value=2);
# Feature{bytes_list=1 | float_list=2 | int64_list=3}; each list{value=1, repeated (maybe packed)}.


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data):
            raise ValueError("varint runs past the end of the message")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7


def _fields(data: bytes):
    """(field number, wire type, value) of each field: int for varints, bytes otherwise."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(data, position)
        elif wire == 1:
            value, position = data[position : position + 8], position + 8
        elif wire == 2:
            size, position = _varint(data, position)
            value, position = data[position : position + size], position + size
        elif wire == 5:
            value, position = data[position : position + 4], position + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if position > len(data):
            raise ValueError("field runs past the end of the message")
        yield field, wire, value


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _feature(data: bytes) -> list[Any]:
    values: list[Any] = []
    for kind, _, payload in _fields(data):
        for field, wire, value in _fields(payload):
            if field != 1:
                continue
            if kind == 1:  # bytes_list
                values.append(value)
            elif kind == 2:  # float_list, packed or not
                values.extend(struct.unpack(f"<{len(value) // 4}f", value))
            elif kind == 3 and wire == 0:  # int64_list, not packed
                values.append(_int64(value))
            elif kind == 3:  # int64_list, packed
                position = 0
                while position < len(value):
                    item, position = _varint(value, position)
                    values.append(_int64(item))
    return values


def parse_example(record: bytes) -> dict[str, list[Any]]:
    """The features of a serialised `tf.train.Example` as lists of bytes, floats or ints."""
    features: dict[str, list[Any]] = {}
    try:
        for field, _, payload in _fields(record):
            if field != 1:
                continue
            for entry_field, _, entry in _fields(payload):
                if entry_field != 1:
                    continue
                key, feature = "", b""
                for part, _, value in _fields(entry):
                    if part == 1:
                        key = value.decode()
                    elif part == 2:
                        feature = value
                features[key] = _feature(feature)
    except (ValueError, UnicodeDecodeError, struct.error) as error:
        raise DatasetError(f"malformed tf.train.Example ({error})") from error
    return features

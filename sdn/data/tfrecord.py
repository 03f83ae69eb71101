"""TFRecord files of `tf.train.Example` messages, read without TensorFlow.

A TFRecord file is a sequence of records, all integers little-endian::

    uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)

Every CRC is checked, with `google-crc32c` (the C implementation, using the CPU's CRC32
instruction where there is one): the GLOW tars are 10+ GB.
"""

from __future__ import annotations

import struct
from typing import Any

import google_crc32c

from sdn.errors import DatasetError

_MASK_DELTA = 0xA282EAD8
_HEADER = 12  # length (8) + its CRC (4)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of one message."""
    return google_crc32c.value(data)


def mask_crc(crc: int) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits, add a constant (mod 2**32)."""
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def read_records(data: bytes, source: str) -> list[bytes]:
    """The records of one TFRecord file's bytes, after checking every length and data CRC."""
    records = []
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
        (length_crc,) = struct.unpack_from("<I", data, position + 8)
        (data_crc,) = struct.unpack_from("<I", data, end - 4)
        payload = data[position + _HEADER : end - 4]
        for what, found, stored in (
            ("length", mask_crc(crc32c(data[position : position + 8])), length_crc),
            ("data", mask_crc(crc32c(payload)), data_crc),
        ):
            if found != stored:
                raise DatasetError(
                    f"{source}: {what} CRC mismatch in the record at byte {position}: the file is "
                    "corrupt; download it again."
                )
        records.append(payload)
        position = end
    return records


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

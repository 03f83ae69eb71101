"""Dataset files as their publishers ship them, built in memory for the data tests: TFRecord
examples (GLOW) and CIFAR-10's tar of Python 2 pickles."""

from __future__ import annotations

import io
import pickle
import struct
import tarfile

import numpy as np

from sdn.data.tfrecord import crc32c, mask_crc


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def protobuf_field(number: int, wire: int, payload: bytes) -> bytes:
    key = varint(number << 3 | wire)
    return key + (varint(len(payload)) + payload if wire == 2 else payload)


def encode_example(features: dict[str, list]) -> bytes:
    """A serialised tf.train.Example: lists of bytes, floats or ints (ints packed)."""
    entries = b""
    for key, values in features.items():
        if isinstance(values[0], bytes):
            feature = protobuf_field(1, 2, b"".join(protobuf_field(1, 2, v) for v in values))
        elif isinstance(values[0], float):
            feature = protobuf_field(2, 2, protobuf_field(1, 2, struct.pack(f"<{len(values)}f", *values)))
        else:
            packed = b"".join(varint(v & (2**64 - 1)) for v in values)
            feature = protobuf_field(3, 2, protobuf_field(1, 2, packed))
        entries += protobuf_field(1, 2, protobuf_field(1, 2, key.encode()) + protobuf_field(2, 2, feature))
    return protobuf_field(1, 2, entries)


def tfrecord_file(records: list[bytes]) -> bytes:
    """Records framed as in a .tfrecords file, with their masked CRCs."""
    out = b""
    for record in records:
        length = struct.pack("<Q", len(record))
        out += length + struct.pack("<I", mask_crc(crc32c(length)))
        out += record + struct.pack("<I", mask_crc(crc32c(record)))
    return out


def tar_archive(members: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class _Python2Pickler(pickle._Pickler):
    """Writes pickles as CIFAR-10's were written (Python 2, protocol 2): byte strings as
    BINSTRING, numpy's array rebuilder under its numpy 1 name `numpy.core.multiarray`."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj, name=None) -> None:
        if obj is np.ndarray.__reduce__(np.zeros(0))[0]:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    dispatch[type(len)] = save_global


def python2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def cifar_archive(batches: dict[str, tuple[np.ndarray, list[int]]], classes: list[bytes]) -> bytes:
    """A cifar-10-python.tar.gz of the given batches, pickled as the published one is."""
    members = {
        f"cifar-10-batches-py/{n}": python2_pickle({b"batch_label": n.encode(), b"data": d, b"labels": y})
        for n, (d, y) in batches.items()
    }
    members["cifar-10-batches-py/batches.meta"] = python2_pickle(
        {b"label_names": classes, b"num_cases_per_batch": 10000, b"num_vis": 3072}
    )
    return tar_archive(members, "w:gz")

"""Downloads against a loopback HTTP server: verify, resume, refuse bad files, explain no network.

Also home of the TFRecord reader's CRC and protobuf tests. The loopback server is
tests/network_tools.py's, the TFRecord files tests/dataset_files.py's.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sdn.data.download import fetch
from sdn.data.sources import convert_dataset
from sdn.data.tfrecord import crc32c, mask_crc, parse_example, read_records
from sdn.errors import ChecksumError, DatasetError, DatasetNotFoundError, DownloadError
from tests.dataset_files import encode_example, protobuf_field, tfrecord_file, varint
from tests.network_tools import FileServer, closed_port_url, serving

# --- a loopback file server ----------------------------------------------------------------------








@pytest.fixture
def server() -> Iterator[FileServer]:
    with serving() as httpd:
        yield httpd


# --- TFRecord writing helpers (the format GLOW's tars hold) --------------------------------------










# --- downloads -----------------------------------------------------------------------------------

PAYLOAD = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


def _fetch(url: str, dest: Path, expected: str | None = MD5, algorithm: str = "md5") -> Path:
    return fetch(
        url,
        dest,
        algorithm,
        expected,
        rerun="python stages/download.py demo",
        pin_key=f"datasets.demo.{algorithm}",
        retries=3,
        timeout=10,
    )


def test_download_verifies_and_is_not_repeated(server: FileServer, tmp_path: Path) -> None:
    server.files["/a/file.bin"] = PAYLOAD
    dest = tmp_path / "raw" / "file.bin"
    assert _fetch(server.url("/a/file.bin"), dest) == dest
    assert dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]
    _fetch(server.url("/a/file.bin"), dest)  # verified copy present: no second request
    assert len(server.requests) == 1


def test_cut_connection_is_resumed_with_range(server: FileServer, tmp_path: Path) -> None:
    server.files["/f.bin"] = PAYLOAD
    server.cuts = [100_000, 50_000]
    dest = tmp_path / "f.bin"
    _fetch(server.url("/f.bin"), dest)
    assert dest.read_bytes() == PAYLOAD
    assert [r for _, r in server.requests] == [None, "bytes=100000-", "bytes=150000-"]


def test_partial_file_from_an_earlier_run_is_resumed(server: FileServer, tmp_path: Path) -> None:
    server.files["/f.bin"] = PAYLOAD
    dest = tmp_path / "f.bin"
    dest.with_name("f.bin.part").write_bytes(PAYLOAD[:123_456])
    _fetch(server.url("/f.bin"), dest)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/f.bin", "bytes=123456-")]


def test_server_without_ranges_restarts_from_zero(server: FileServer, tmp_path: Path) -> None:
    server.files["/f.bin"] = PAYLOAD
    server.ranges = False
    dest = tmp_path / "f.bin"
    dest.with_name("f.bin.part").write_bytes(b"stale bytes")
    _fetch(server.url("/f.bin"), dest)
    assert dest.read_bytes() == PAYLOAD


def test_truncated_download_is_refused_and_kept_for_resuming(server: FileServer, tmp_path: Path) -> None:
    server.files["/f.bin"] = PAYLOAD
    server.cuts = [1000, 1000, 1000]
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match=r"stopped at 3000 of 300000 bytes after 3 attempts") as info:
        _fetch(server.url("/f.bin"), dest)
    assert "f.bin.part" in str(info.value) and "resume" in str(info.value)
    assert not dest.exists()
    assert dest.with_name("f.bin.part").stat().st_size == 3000
    _fetch(server.url("/f.bin"), dest)  # the server recovers: the rerun completes the file
    assert dest.read_bytes() == PAYLOAD


def test_wrong_checksum_is_refused_and_never_converted(server: FileServer, tmp_path: Path) -> None:
    server.files["/cifar-10-python.tar.gz"] = PAYLOAD
    wrong = "0" * 32
    cfg = {"image_size": 32, "channels": 3, "url": server.url("/cifar-10-python.tar.gz"), "md5": wrong}
    from sdn.data.sources import download_dataset

    with pytest.raises(ChecksumError) as info:
        download_dataset("cifar10", cfg, tmp_path / "raw")
    message = str(info.value)
    assert "cifar-10-python.tar.gz.unverified" in message
    assert f"expected md5 {wrong}" in message and f"got {MD5}" in message
    assert not (tmp_path / "raw" / "cifar10" / "cifar-10-python.tar.gz").exists()
    with pytest.raises(DatasetNotFoundError, match="download@cifar10"):
        convert_dataset("cifar10", cfg, tmp_path / "raw", tmp_path / "lmdb")
    assert not (tmp_path / "lmdb" / "cifar10").exists()


def test_hand_placed_file_with_wrong_checksum_is_refused(tmp_path: Path) -> None:
    dest = tmp_path / "f.bin"
    dest.write_bytes(PAYLOAD[:-1])
    with pytest.raises(ChecksumError, match=rf"checksum mismatch for {re.escape(str(dest))}: expected md5"):
        _fetch(closed_port_url("/f.bin"), dest)


def test_missing_checksum_must_be_pinned(server: FileServer, tmp_path: Path) -> None:
    server.files["/f.tar"] = PAYLOAD
    dest = tmp_path / "f.tar"
    sha256 = hashlib.sha256(PAYLOAD).hexdigest()
    with pytest.raises(
        ChecksumError, match=rf"datasets.demo.sha256 is not set.*{sha256}.*`sdn pin demo` writes it"
    ):
        _fetch(server.url("/f.tar"), dest, expected=None, algorithm="sha256")
    assert not dest.exists()
    _fetch(server.url("/f.tar"), dest, expected=sha256, algorithm="sha256")  # pinned: no new download
    assert dest.read_bytes() == PAYLOAD and len(server.requests) == 1


def test_no_network_says_where_to_put_the_file(tmp_path: Path) -> None:
    dest = tmp_path / "raw" / "f.bin"
    with pytest.raises(DownloadError, match=r"cannot reach .*put it at .*f\.bin and rerun") as info:
        _fetch(closed_port_url("/f.bin"), dest)
    assert MD5 in str(info.value)
    dest.write_bytes(PAYLOAD)  # put there by hand: verified, no network needed
    assert _fetch(closed_port_url("/f.bin"), dest) == dest


def test_http_error_is_reported(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        _fetch(server.url("/missing.bin"), tmp_path / "missing.bin")


# --- TFRecords -----------------------------------------------------------------------------------


def _crc32c_reference(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_known_values_and_reference() -> None:
    # RFC 3720 (iSCSI) test vectors and the usual check value.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    # RFC 3720 B.4: the 48-byte iSCSI SCSI Read (10) command PDU
    pdu = bytes.fromhex(
        "01c00000000000000000000000000000"
        "14000000000004000000001400000018"
        "28000000000000000200000000000000"
    )
    assert crc32c(pdu) == 0xD9963A56
    assert crc32c(b"") == 0
    rng = np.random.default_rng(1)
    for length in (1, 2, 63, 64, 65, 1000):
        data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
        assert crc32c(data) == _crc32c_reference(data)
    # TFRecord's mask, from its definition: rotate right by 15 bits, add 0xa282ead8
    assert mask_crc(0) == 0xA282EAD8
    assert mask_crc(0x00008000) == (1 + 0xA282EAD8) & 0xFFFFFFFF


def test_read_records_checks_crcs() -> None:
    records = [encode_example({"data": [bytes([i]) * (10 + i)]}) for i in range(5)]
    data = tfrecord_file(records)
    assert read_records(data, "f") == records
    corrupt = bytearray(data)
    corrupt[40] ^= 1
    with pytest.raises(DatasetError, match="f: .*CRC mismatch.*corrupt"):
        read_records(bytes(corrupt), "f")
    with pytest.raises(DatasetError, match="truncated"):
        read_records(data[:-3], "f")


def test_parse_example_packed_unpacked_and_negative() -> None:
    record = encode_example({"shape": [32, 32, 3], "data": [b"ab", b"c"], "x": [0.5, -2.0], "neg": [-3]})
    assert parse_example(record) == {
        "shape": [32, 32, 3],
        "data": [b"ab", b"c"],
        "x": [0.5, -2.0],
        "neg": [-3],
    }
    # int64_list written unpacked (one varint field per value) parses the same
    unpacked = protobuf_field(3, 2, protobuf_field(1, 0, varint(7)) + protobuf_field(1, 0, varint(9)))
    entry = protobuf_field(1, 2, protobuf_field(1, 2, b"label") + protobuf_field(2, 2, unpacked))
    assert parse_example(protobuf_field(1, 2, entry)) == {"label": [7, 9]}
    with pytest.raises(DatasetError, match="malformed"):
        parse_example(b"\x0a\xff")

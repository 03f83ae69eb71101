"""Verified, resumable downloads of one remote file.

A file moves through three names in its dataset's raw folder, so that a name never lies about
its content:

* `<file>.part`: a download in progress; a later run resumes it with an HTTP Range request.
* `<file>.unverified`: complete, but its checksum has not matched the pinned one (yet).
* `<file>`: verified (or put there by hand, and then verified on every run).

A checksum must be pinned in params.yaml: a reproducibility pipeline must not silently
convert whatever bytes a mirror served. Where no checksum is published, the first download
prints the file's digest and asks the user to pin it, once, in git.
"""

from __future__ import annotations

import hashlib
import re
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlparse

from tqdm import tqdm

from sdn.errors import ChecksumError, DownloadError, local_write_error

ALGORITHMS = ("md5", "sha256")
_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def file_name(url: str) -> str:
    """The name a URL's file is stored under."""
    name = Path(urlparse(url).path).name
    if not name:
        raise DownloadError(f"cannot tell a file name from the URL {url!r}: it must end in one.")
    return name


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks with a progress bar."""
    digest = hashlib.new(algorithm)
    size = path.stat().st_size
    with (
        path.open("rb") as handle,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            mininterval=1.0,
            desc=f"{algorithm} {path.name}",
            leave=False,
        ) as bar,
    ):
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def fetch(
    url: str,
    dest: Path,
    algorithm: str,
    expected: str | None,
    *,
    rerun: str,
    pin_key: str,
    retries: int = 3,
    timeout: float = 60.0,
) -> Path:
    """Make `dest` hold the file at `url`, verified against `expected` (hex, or None: not pinned).

    Reuses a verified or hand-placed `dest` (checking it), resumes a partial download, and
    moves a download to `dest` only once it is verified. `rerun` is the command to suggest and
    `pin_key` the params.yaml key that holds the checksum (both for messages).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}")
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _raise_local(error, dest.parent, rerun)
    if dest.exists():
        verify_file(dest, algorithm, expected, rerun, pin_key)
        return dest
    unverified = dest.with_name(dest.name + ".unverified")
    if not unverified.exists():
        part = dest.with_name(dest.name + ".part")
        _download(url, part, dest, algorithm, expected, rerun, retries, timeout)
        part.rename(unverified)
    verify_file(unverified, algorithm, expected, rerun, pin_key)
    unverified.rename(dest)
    return dest


def verify_file(path: Path, algorithm: str, expected: str | None, rerun: str, pin_key: str) -> str:
    """The file's digest, once it matches the pinned `expected`; a ChecksumError otherwise (with
    the line to pin when nothing is pinned)."""
    actual = file_digest(path, algorithm)
    if expected is None:
        name = pin_key.split(".")[1]
        raise ChecksumError(
            f"{pin_key} is not set, so {path} ({path.stat().st_size} bytes) cannot be verified. Its "
            f"{algorithm} is {actual}. Compare it with a source you trust; if it is right, `sdn pin "
            f"{name}` writes it into the parameter file that defines {name}; then `{rerun}` goes on "
            "(the file is kept)."
        )
    if actual != expected.lower():
        raise ChecksumError(
            f"checksum mismatch for {path}: expected {algorithm} {expected.lower()}, got {actual}. "
            f"If the source changed on purpose, pin the new value under {pin_key} in params.yaml; "
            f"otherwise delete {path} and rerun `{rerun}` to download it again."
        )
    return actual


def _download(
    url: str,
    part: Path,
    dest: Path,
    algorithm: str,
    expected: str | None,
    rerun: str,
    retries: int,
    timeout: float,
) -> None:
    """Fill `part` with the whole file, resuming what is there; retry a cut transfer."""
    total: int | None = None
    for _ in range(retries):
        start = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"User-Agent": "sdn-data"})
        if start:
            request.add_header("Range", f"bytes={start}-")
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as error:
            if error.code == 416 and start:  # nothing left to send: the part is complete
                return
            raise DownloadError(
                f"{url} answered HTTP {error.code} {error.reason}: check "
                "the URL in params.yaml or try again later."
            ) from error
        except (urllib.error.URLError, OSError, HTTPException) as error:
            pin = f"{algorithm} {expected}" if expected else f"its {algorithm} pinned in params.yaml"
            raise DownloadError(
                f"cannot reach {url} ({getattr(error, 'reason', error)}). Without network access, "
                f"download the file on another machine, put it at {dest} and rerun `{rerun}`: it "
                f"is checked against {pin} and not downloaded again."
            ) from error
        with response:
            start = _resume_point(response, start, url)
            length = response.headers.get("Content-Length")
            total = start + int(length) if length is not None else None
            try:
                handle = part.open("ab" if start else "wb")
            except OSError as error:
                _raise_local(error, part, rerun)
            with (
                handle,
                tqdm(
                    total=total,
                    initial=start,
                    unit="B",
                    unit_scale=True,
                    desc=dest.name,
                    mininterval=1.0,
                ) as bar,
            ):
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except (OSError, HTTPException):
                        break  # a cut connection: what arrived is kept, the next attempt resumes
                    if not chunk:
                        break
                    try:
                        handle.write(chunk)
                        handle.flush()
                    except OSError as error:  # a local failure: another attempt cannot help
                        _raise_local(error, part, rerun)
                    bar.update(len(chunk))
        size = part.stat().st_size
        if total is None or size == total:  # without a length, EOF ends it and the checksum judges
            return
        if size > total:
            part.unlink()  # the server's file changed under us: start over
    raise DownloadError(
        f"the download of {url} stopped at {part.stat().st_size if part.exists() else 0} of "
        f"{total} bytes after {retries} attempts. The partial file {part} is kept: rerun "
        f"`{rerun}` to resume it."
    )


def _raise_local(error: OSError, path: Path, rerun: str) -> NoReturn:
    """Raise the named local write failure (full disk, file size limit, permissions), else `error`."""
    named = local_write_error(error, path, rerun)
    if named is None:
        raise error
    raise named from error


def _resume_point(response, start: int, url: str) -> int:
    """Where the response's body starts: `start` for a partial response, 0 for the whole file."""
    if not start or getattr(response, "status", None) != 206:
        return 0  # the server sent everything (it ignored the Range header)
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
    if not match or int(match.group(1)) != start:
        raise DownloadError(
            f"{url} answered a resumed download with an unexpected range "
            f"{response.headers.get('Content-Range')!r}; delete the .part file and rerun."
        )
    return start

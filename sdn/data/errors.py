"""The data layer's errors: each message names the file and says what to do next."""

from __future__ import annotations


class DataError(RuntimeError):
    """Base class of every data failure (download, checksum, conversion, reading)."""


class DownloadError(DataError):
    """A remote file could not be fetched completely (no network, HTTP error, cut transfer)."""


class ChecksumError(DownloadError):
    """A downloaded or hand-placed file does not match the checksum pinned in params.yaml."""


class DatasetError(DataError):
    """Raw or converted data that is corrupt, incomplete or not what the configuration expects."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A stage output that should exist does not: the message names the DVC stage that builds it."""

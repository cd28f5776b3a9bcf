"""The storage package's error tree: every failure here is a `StorageError`.

Messages say what went wrong and what to do about it, so adapters can show or log them as they are.
Errors that wrap a lower-level failure (sqlite3, OSError) keep it as `__cause__`.
"""

from __future__ import annotations


class StorageError(Exception):
    """Root of every error raised by `storage`."""


class InvalidBlobKey(StorageError):
    """A blob key, owner, kind or suffix is malformed (or tries to leave the blob root)."""


class BlobNotFound(StorageError):
    """No blob is stored under the key."""

    def __init__(self, key: str) -> None:
        super().__init__(
            f"blob {key!r} does not exist; it was never stored, was deleted, "
            "or the blob store points at another folder"
        )
        self.key = key


class MigrationError(StorageError):
    """The database schema could not be brought up to date."""


class RecordNotFound(StorageError):
    """A row that an update needs does not exist."""


class InvalidValue(StorageError):
    """A value is outside what the schema allows (unknown state, progress outside 0..1, ...)."""


class ConstraintViolation(StorageError):
    """The database refused a write: a unique or foreign-key constraint failed."""

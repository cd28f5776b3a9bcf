"""Content-addressed blob storage: photos, crops, embeddings, adapters, generated images.

Keys look like ``"u42/photo/<sha256>.png"``: owner, kind, then the content's SHA-256 and a suffix.
Equal content therefore has one key, and storing it twice is a no-op, which keeps re-run jobs
(arq is at-least-once) safe. The chat side and the workers share one store and pass keys only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from storage.errors import BlobNotFound, StorageError
from storage.keys import (
    KEY_RE,
    REF_SUFFIX,
    HashingWriter,
    check_key,
    check_name,
    check_suffix,
    checked_bucket,
    checked_prefix,
)

_log = logging.getLogger(__name__)

# Temp files start with a dot and end with .tmp, so they can never match a key.
_TEMP_PREFIX = ".incoming-"
_TEMP_SUFFIX = ".tmp"


def owner_for(user_id: int) -> str:
    """The blob owner name of a database user: ``"u{user_id}"``."""
    return f"u{user_id}"


class BlobStore(Protocol):
    """What the chat side and the workers need from a blob store."""

    def put(self, owner: str, kind: str, data: bytes, suffix: str) -> str:
        """Store `data` and return its key; storing the same content again returns the same key."""
        ...

    def put_written(self, owner: str, kind: str, suffix: str, write: Callable[[IO[bytes]], object]) -> str:
        """Store what `write` writes to the file it is given, streaming (for blobs too big to hold
        in memory, e.g. a DreamBooth checkpoint); returns the key, as `put` would for those bytes."""
        ...

    def get(self, key: str) -> bytes:
        """The bytes stored under `key`; raises `BlobNotFound`."""
        ...

    def exists(self, key: str) -> bool:
        """Whether a blob is stored under `key`."""
        ...

    def path(self, key: str) -> Path:
        """A local path to the blob (for libraries that want a file); raises `BlobNotFound`."""
        ...

    def delete(self, key: str) -> None:
        """Remove the blob; a missing blob is not an error."""
        ...

    def delete_owner(self, owner: str) -> int:
        """Remove every blob of `owner`; returns how many files were removed."""
        ...

    def set_ref(self, owner: str, kind: str, name: str, value: dict[str, Any]) -> None:
        """A small named JSON document beside the blobs (e.g. which checkpoint is a job's newest):
        replaced atomically, unlike blobs it can change; erased with the owner's blobs."""
        ...

    def get_ref(self, owner: str, kind: str, name: str) -> dict[str, Any] | None:
        """The named document, or None when there is none."""
        ...

    def delete_ref(self, owner: str, kind: str, name: str) -> None:
        """Remove the named document; a missing one is not an error."""
        ...

    def cached_owners(self) -> list[str]:
        """The owners whose blobs this host holds copies of, beside the store itself (none for a
        local store: its files are the blobs)."""
        ...

    def uncache_owner(self, owner: str) -> int:
        """Drop this host's copies of `owner`'s blobs, leaving the store as it is; returns how many."""
        ...


class LocalBlobStore:
    """A `BlobStore` in a local (or shared network) folder.

    Synchronous: file I/O is quick, and async callers move large files with `asyncio.to_thread`.
    The root folder is created on the first write, not in the constructor.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def put(self, owner: str, kind: str, data: bytes, suffix: str) -> str:
        """Store `data` atomically and return its key ``"{owner}/{kind}/{sha256}{suffix}"``."""
        check_name("owner", owner)
        check_name("kind", kind)
        check_suffix(suffix)
        key = f"{owner}/{kind}/{hashlib.sha256(data).hexdigest()}{suffix}"
        final = self.root / key
        if final.exists():  # same key means same content: nothing to write
            return key
        try:
            _write_atomically(final, data)
        except OSError as exc:
            raise StorageError(
                f"could not store blob {key!r} under {self.root}: {exc}; "
                "check free disk space and write permissions"
            ) from exc
        return key

    def put_written(self, owner: str, kind: str, suffix: str, write: Callable[[IO[bytes]], object]) -> str:
        """Stream `write`'s output into a temp file, hashing it as it goes, then rename it to its
        key; nothing of it is held in memory. A failing `write` leaves nothing behind."""
        check_name("owner", owner)
        check_name("kind", kind)
        check_suffix(suffix)
        folder = self.root / owner / kind
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, temp_name = tempfile.mkstemp(dir=folder, prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX)
        except OSError as exc:
            raise StorageError(f"could not create a blob under {folder}: {exc}; check write permissions") from exc
        temp = Path(temp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                hashing = HashingWriter(handle)
                write(hashing)  # type: ignore[arg-type]  # a write-only file, which is all it needs
                handle.flush()
                os.fsync(handle.fileno())
            key = f"{owner}/{kind}/{hashing.hexdigest()}{suffix}"
            final = self.root / key
            if final.exists():
                temp.unlink()
            else:
                os.replace(temp, final)
                _fsync_folder(folder)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise StorageError(
                f"could not store a blob under {folder}: {exc}; check free disk space and write permissions"
            ) from exc
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return key

    def get(self, key: str) -> bytes:
        """The bytes stored under `key`; raises `BlobNotFound` naming the key."""
        try:
            return self._file(key).read_bytes()
        except FileNotFoundError as exc:
            raise BlobNotFound(key) from exc

    def exists(self, key: str) -> bool:
        """Whether a blob is stored under `key` (raises `InvalidBlobKey` for a malformed key)."""
        return self._file(key).is_file()

    def path(self, key: str) -> Path:
        """The blob's file; raises `BlobNotFound` when it is missing. Do not modify the file."""
        file = self._file(key)
        if not file.is_file():
            raise BlobNotFound(key)
        return file

    def delete(self, key: str) -> None:
        """Remove the blob; deleting a missing blob is a no-op so that retries are safe."""
        self._file(key).unlink(missing_ok=True)

    def delete_owner(self, owner: str) -> int:
        """Remove the owner's whole folder (all kinds); returns how many blob files it held."""
        check_name("owner", owner)
        folder = self.root / owner
        if not folder.is_dir():
            return 0
        # Count blobs only: leftover temp files of a crashed writer are removed but not counted.
        count = sum(1 for p in folder.rglob("*") if self._is_blob(p))
        shutil.rmtree(folder)
        _log.info("deleted %d blobs of %s", count, owner)
        return count

    def set_ref(self, owner: str, kind: str, name: str, value: dict[str, Any]) -> None:
        file = self._ref_file(owner, kind, name)
        try:
            _write_atomically(file, json.dumps(value, sort_keys=True).encode())
        except OSError as exc:
            raise StorageError(f"could not write {file}: {exc}; check free disk space and write permissions") from exc

    def get_ref(self, owner: str, kind: str, name: str) -> dict[str, Any] | None:
        file = self._ref_file(owner, kind, name)
        try:
            value = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StorageError(f"could not read {file}: {exc}; delete it to start that job over") from exc
        if not isinstance(value, dict):
            raise StorageError(f"{file} does not hold a JSON object; delete it to start that job over")
        return value

    def delete_ref(self, owner: str, kind: str, name: str) -> None:
        self._ref_file(owner, kind, name).unlink(missing_ok=True)

    def cached_owners(self) -> list[str]:
        return []  # no copies: `path` hands out the blob's own file

    def uncache_owner(self, owner: str) -> int:
        check_name("owner", owner)
        return 0

    def _ref_file(self, owner: str, kind: str, name: str) -> Path:
        for what, value in (("owner", owner), ("kind", kind), ("reference name", name)):
            check_name(what, value)
        return self.root / owner / kind / f"{name}{REF_SUFFIX}"

    def _is_blob(self, path: Path) -> bool:
        key = path.relative_to(self.root).as_posix()
        return path.is_file() and KEY_RE.fullmatch(key) is not None

    def _file(self, key: str) -> Path:
        """The path a valid key maps to; refuses keys that could point outside the root."""
        return self.root / check_key(key)


BLOB_STORES = ("local", "s3")


@dataclass(frozen=True)
class BlobStoreSettings:
    """Which blob store to open (``[storage]`` in config.toml). S3's endpoint, region and keys are
    not settings: boto3 reads them from AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY itself."""

    local_dir: Path  # "local": the blobs' folder
    kind: str = "local"  # one of BLOB_STORES
    s3_bucket: str = ""
    s3_prefix: str = ""  # "" or folder names, e.g. "avatarbooth/prod"
    cache_dir: Path | None = None  # "s3": local copies for `path`; None: <local_dir>-cache
    cache_bytes: int = 20 * 2**30

    def __post_init__(self) -> None:
        if self.kind not in BLOB_STORES:
            raise ValueError(f"blob_store must be one of {', '.join(map(repr, BLOB_STORES))}, got {self.kind!r}")
        if self.kind == "s3" and not self.s3_bucket:
            raise ValueError('blob_store = "s3" needs s3_bucket, the name of an existing bucket')
        if self.s3_bucket:
            checked_bucket(self.s3_bucket)  # raises InvalidBlobKey saying what a name may hold
        checked_prefix(self.s3_prefix)
        if self.cache_bytes <= 0:
            raise ValueError(f"the blob cache needs a size above 0 bytes, got {self.cache_bytes}")


def open_blob_store(settings: BlobStoreSettings) -> BlobStore:
    """The configured store. An S3 store is checked first (the bucket exists and the keys may use
    it), so a wrong setting fails at start-up with a `StorageError` saying what to set."""
    if settings.kind == "local":
        return LocalBlobStore(settings.local_dir)
    from storage.cache import BlobCache  # boto3 is loaded only where S3 is used
    from storage.s3 import S3BlobStore

    cache_dir = settings.cache_dir or settings.local_dir.with_name(f"{settings.local_dir.name}-cache")
    store = S3BlobStore(settings.s3_bucket, BlobCache(cache_dir, settings.cache_bytes), prefix=settings.s3_prefix)
    store.check()
    store.prune_cache()
    return store


def _write_atomically(final: Path, data: bytes) -> None:
    """Write via a temp file in the same folder, fsync, then rename over the final name.

    A crash at any point leaves either no file or the complete file under the final name;
    the rename is atomic because source and target share a file system.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=final.parent, prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_folder(final.parent)


def _fsync_folder(folder: Path) -> None:
    """Persist the rename itself; some platforms cannot open folders, which is fine to skip."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

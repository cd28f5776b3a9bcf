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
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol

from storage.errors import BlobNotFound, InvalidBlobKey, StorageError

_log = logging.getLogger(__name__)

# Owners and kinds are single folder names: no dots (so no ".."), no separators.
_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
_SUFFIX = r"\.[a-z0-9]{1,16}"
_NAME_RE = re.compile(_NAME)
_SUFFIX_RE = re.compile(_SUFFIX)
_KEY_RE = re.compile(rf"(?P<owner>{_NAME})/(?P<kind>{_NAME})/[0-9a-f]{{64}}(?P<suffix>{_SUFFIX})")
# Temp files start with a dot and end with .tmp, so they can never match a key.
_TEMP_PREFIX = ".incoming-"
_TEMP_SUFFIX = ".tmp"
_REF_SUFFIX = ".ref.json"  # named references; never a key either (keys end in one suffix)


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


class LocalBlobStore:
    """A `BlobStore` in a local (or shared network) folder.

    Synchronous: file I/O is quick, and async callers move large files with `asyncio.to_thread`.
    The root folder is created on the first write, not in the constructor.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def put(self, owner: str, kind: str, data: bytes, suffix: str) -> str:
        """Store `data` atomically and return its key ``"{owner}/{kind}/{sha256}{suffix}"``."""
        _check_name("owner", owner)
        _check_name("kind", kind)
        _check_suffix(suffix)
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
        _check_name("owner", owner)
        _check_name("kind", kind)
        _check_suffix(suffix)
        folder = self.root / owner / kind
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, temp_name = tempfile.mkstemp(dir=folder, prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX)
        except OSError as exc:
            raise StorageError(f"could not create a blob under {folder}: {exc}; check write permissions") from exc
        temp = Path(temp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                hashing = _HashingWriter(handle)
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
        _check_name("owner", owner)
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

    def _ref_file(self, owner: str, kind: str, name: str) -> Path:
        for what, value in (("owner", owner), ("kind", kind), ("reference name", name)):
            _check_name(what, value)
        return self.root / owner / kind / f"{name}{_REF_SUFFIX}"

    def _is_blob(self, path: Path) -> bool:
        key = path.relative_to(self.root).as_posix()
        return path.is_file() and _KEY_RE.fullmatch(key) is not None

    def _file(self, key: str) -> Path:
        """The path a valid key maps to; refuses keys that could point outside the root."""
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise InvalidBlobKey(
                f"blob key {key!r} is invalid; keys look like 'u1/photo/<64 hex digits>.png' "
                "and come from BlobStore.put"
            )
        return self.root / key


def _check_name(what: str, value: str) -> None:
    """Owners and kinds become folder names, so they must be one plain path component."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise InvalidBlobKey(
            f"blob {what} {value!r} is invalid; use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit (no dots or slashes)"
        )


def _check_suffix(suffix: str) -> None:
    if not isinstance(suffix, str) or not _SUFFIX_RE.fullmatch(suffix):
        raise InvalidBlobKey(
            f"blob suffix {suffix!r} is invalid; use a dot and 1-16 lowercase letters "
            "or digits, such as '.png', '.json' or '.safetensors'"
        )


class _HashingWriter:
    """A write-only file that hashes what passes through it (what `torch.save` and friends need)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self._sha = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._sha.update(data)
        return self._handle.write(data)

    def flush(self) -> None:
        self._handle.flush()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


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

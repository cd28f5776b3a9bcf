"""A bounded local copy of remote blobs, for code that must open a file (`BlobStore.path`).

Files sit under the cache folder at their blob key, so ``root / key`` is a cached copy and an
owner's copies are one folder (erased with the owner). Every file is checked against the SHA-256
in its key when it arrives and again whenever its size, inode or time stamp changed since this
process last checked it, so a damaged copy is never handed out: it is dropped and fetched again.
Least-recently-used copies are evicted past ``max_bytes``; use order is each file's mtime, so
several worker processes may share one folder (each write is a temp file renamed into place).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from storage.errors import StorageError

_log = logging.getLogger(__name__)

_TEMP_PREFIX = ".incoming-"  # never a key: keys start with a letter or digit
_TEMP_SUFFIX = ".tmp"
_STALE_TEMP_S = 24 * 3600  # a temp file this old was left by a process that died mid-download
_READ_CHUNK = 1 << 20


class BlobDamaged(StorageError):
    """Bytes fetched for a key do not hash to the key's SHA-256."""


class BlobCache:
    """Verified local copies of blobs, at most ``max_bytes`` of them (least recently used go first).

    A path handed out stays valid until enough other blobs are fetched to evict it; size the cache
    to hold what one worker uses at once (a base model's adapters, a DreamBooth UNet).
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"the blob cache needs room for at least one blob, got max_bytes={max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._checked: dict[str, tuple[int, int, int]] = {}  # key → stat stamp when last verified
        self._last_use_ns = 0

    def lookup(self, key: str) -> Path | None:
        """The verified copy of `key` (marked as just used), or None when there is none or it was
        damaged (then it is removed)."""
        file = self.root / key
        try:
            stat = file.stat()
        except FileNotFoundError:
            return None
        with self._lock:
            verified = self._checked.get(key) == _stamp(stat)
        try:
            if not verified and _sha256_of(file) != _key_digest(key):
                _log.warning("the cached copy of blob %s was damaged; fetching it again", key)
                self.discard(key)
                return None
            self._mark_used(key, file)
        except FileNotFoundError:  # another process evicted it meanwhile
            return None
        return file

    def fill(self, key: str, download: Callable[[IO[bytes]], object]) -> Path:
        """Fetch `key` with `download` (which writes the blob into the file it is given), check it
        by its hash, and put it in place atomically; raises `BlobDamaged` when the bytes are wrong."""
        owner, kind, _ = key.split("/")
        temp = self.temp_file(owner, kind)
        try:
            with temp.open("r+b") as handle:
                download(handle)
            digest = _sha256_of(temp)
            if digest != _key_digest(key):
                raise BlobDamaged(
                    f"blob {key!r} arrived with content of SHA-256 {digest}, not the one in its key; "
                    "the stored object was changed outside AvatarBooth: delete it and store it again"
                )
            return self.adopt(key, temp)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def temp_file(self, owner: str, kind: str) -> Path:
        """A new empty temp file in the folder of `owner`'s `kind` (to `adopt` once its key is known)."""
        folder = self.root / owner / kind
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=folder, prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX)
        except OSError as exc:
            raise StorageError(f"could not write into the blob cache {self.root}: {exc}; check free disk "
                               "space and write permissions, or point the cache elsewhere") from exc
        os.close(fd)
        return Path(name)

    def adopt(self, key: str, temp: Path) -> Path:
        """Move `temp`, whose content the caller has checked to be `key`'s, into the cache; then
        evict least-recently-used copies until the cache fits ``max_bytes`` again."""
        file = self.root / key
        os.replace(temp, file)
        self._mark_used(key, file)
        self._evict(keep=file)
        return file

    def discard(self, key: str) -> None:
        """Remove the copy of `key`, if any."""
        (self.root / key).unlink(missing_ok=True)
        with self._lock:
            self._checked.pop(key, None)

    def discard_owner(self, owner: str) -> int:
        """Remove every copy (and temp file) of `owner`; returns how many copies there were."""
        folder = self.root / owner
        if not folder.is_dir():
            return 0
        count = sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.startswith(_TEMP_PREFIX))
        shutil.rmtree(folder, ignore_errors=True)
        with self._lock:
            for key in [k for k in self._checked if k.startswith(f"{owner}/")]:
                del self._checked[key]
        return count

    def owners(self) -> list[str]:
        """The owners that have copies (or temp files) here, e.g. to drop those a /forget erased."""
        if not self.root.is_dir():
            return []
        return sorted(entry.name for entry in self.root.iterdir() if entry.is_dir())

    def size(self) -> int:
        """Bytes held by cached copies now."""
        return sum(size for _, size, _ in self._copies())

    def _mark_used(self, key: str, file: Path) -> None:
        with self._lock:
            # mtime is the use order, shared by every process using the folder. Set from the clock
            # in nanoseconds, strictly increasing: the kernel's own file times tick every few ms.
            self._last_use_ns = max(time.time_ns(), self._last_use_ns + 1)
            os.utime(file, ns=(self._last_use_ns, self._last_use_ns))
            self._checked[key] = _stamp(file.stat())

    def _evict(self, keep: Path) -> None:
        with self._lock:
            copies = sorted(self._copies(), key=lambda c: c[2])  # oldest use first
            total = sum(size for _, size, _ in copies)
            for file, size, _ in copies:
                if total <= self.max_bytes:
                    break
                if file == keep:
                    continue
                file.unlink(missing_ok=True)
                self._checked.pop(file.relative_to(self.root).as_posix(), None)
                total -= size
                _remove_empty_folders(file.parent, self.root)
        if total > self.max_bytes:
            _log.warning(
                "blob cache %s holds %d bytes, over its %d: one blob is bigger than the whole cache; "
                "raise [storage] blob_cache_gib", self.root, total, self.max_bytes,
            )

    def _copies(self) -> list[tuple[Path, int, int]]:
        """(file, size, mtime_ns) of every cached copy; removes stale temp files on the way."""
        copies: list[tuple[Path, int, int]] = []
        now = time.time()
        for file in self.root.rglob("*"):
            try:
                stat = file.stat()
            except FileNotFoundError:  # evicted or renamed meanwhile
                continue
            if not file.is_file():
                continue
            if file.name.startswith(_TEMP_PREFIX):
                if now - stat.st_mtime > _STALE_TEMP_S:
                    file.unlink(missing_ok=True)
                continue
            copies.append((file, stat.st_size, stat.st_mtime_ns))
        return copies


def _key_digest(key: str) -> str:
    """The SHA-256 a blob key names: ``owner/kind/<sha256>.suffix``."""
    return key.rsplit("/", 1)[-1][:64]


def _sha256_of(file: Path) -> str:
    sha = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _stamp(stat: os.stat_result) -> tuple[int, int, int]:
    return (stat.st_size, stat.st_ino, stat.st_mtime_ns)


def _remove_empty_folders(folder: Path, root: Path) -> None:
    """An evicted owner's empty kind and owner folders go too (their names say whose they were)."""
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()
        except OSError:  # not empty, or already gone
            return
        folder = folder.parent

"""Blob keys, shared by every blob store: ``"{owner}/{kind}/{sha256}{suffix}"``.

One form in every store, so a key names the same content wherever it is stored. Owners and kinds
become folder names (or object-name segments), so each is one plain path component.
"""

from __future__ import annotations

import hashlib
import re
from typing import IO

from storage.errors import InvalidBlobKey

# Owners and kinds are single folder names: no dots (so no ".."), no separators.
NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
SUFFIX = r"\.[a-z0-9]{1,16}"
NAME_RE = re.compile(NAME)
SUFFIX_RE = re.compile(SUFFIX)
KEY_RE = re.compile(rf"(?P<owner>{NAME})/(?P<kind>{NAME})/[0-9a-f]{{64}}(?P<suffix>{SUFFIX})")
REF_SUFFIX = ".ref.json"  # named references; never a key (keys end in one suffix)
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_FOLDER = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # no "." or ".." folders: the first is a letter or digit
_PREFIX_RE = re.compile(rf"{_FOLDER}(/{_FOLDER})*")


def check_name(what: str, value: str) -> None:
    """Owners and kinds become folder names, so they must be one plain path component."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise InvalidBlobKey(
            f"blob {what} {value!r} is invalid; use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit (no dots or slashes)"
        )


def check_suffix(suffix: str) -> None:
    if not isinstance(suffix, str) or not SUFFIX_RE.fullmatch(suffix):
        raise InvalidBlobKey(
            f"blob suffix {suffix!r} is invalid; use a dot and 1-16 lowercase letters "
            "or digits, such as '.png', '.json' or '.safetensors'"
        )


def check_key(key: str) -> str:
    """`key` when it is a well-formed blob key; refuses anything that could point elsewhere."""
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise InvalidBlobKey(
            f"blob key {key!r} is invalid; keys look like 'u1/photo/<64 hex digits>.png' "
            "and come from BlobStore.put"
        )
    return key


def checked_bucket(bucket: str) -> str:
    """`bucket` when it is a valid S3 bucket name, else `InvalidBlobKey` saying what is allowed."""
    if not isinstance(bucket, str) or not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise InvalidBlobKey(
            f"S3 bucket name {bucket!r} is invalid; use 3-63 lowercase letters, digits, '.' or '-', "
            "starting and ending with a letter or digit"
        )
    return bucket


def checked_prefix(prefix: str) -> str:
    """The key prefix as stored: ``""`` or folder names joined by '/' with one '/' at the end."""
    stripped = prefix.strip("/") if isinstance(prefix, str) else prefix
    if stripped == "":
        return ""
    if not isinstance(stripped, str) or not _PREFIX_RE.fullmatch(stripped):
        raise InvalidBlobKey(
            f"S3 key prefix {prefix!r} is invalid; use folder names of letters, digits, '.', '_' "
            "or '-' joined by '/', like 'avatarbooth/prod'"
        )
    return f"{stripped}/"


class HashingWriter:
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

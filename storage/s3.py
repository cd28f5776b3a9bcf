"""A `BlobStore` in an S3-compatible bucket (AWS S3, MinIO, Ceph, R2, ...), for workers on many hosts.

Objects sit at ``{prefix}{key}`` with the very keys `LocalBlobStore` makes, so a key means the same
content in both stores; named references sit where the local store keeps their files. Writes are
atomic because S3's are: a PUT, or a multipart upload's final Complete, makes the whole object
visible at once, never a part of it. `path` serves files from a bounded local `BlobCache`.

boto3: AWS's own SDK, well kept and S3-compatible servers test against it; synchronous like the
`BlobStore` protocol (callers already move blob work to threads); multipart uploads and ranged,
parallel downloads are built in (s3transfer), so large blobs stream from and to files.

Endpoint, region and keys come only from the standard variables (AWS_ENDPOINT_URL,
AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, or boto3's other usual sources),
which boto3 reads itself; none of them ever reaches config.toml, a message of ours or a log.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import boto3
import boto3.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from storage.cache import BlobCache
from storage.errors import BlobNotFound, StorageError
from storage.keys import (
    KEY_RE,
    NAME_RE,
    REF_SUFFIX,
    HashingWriter,
    check_key,
    check_name,
    check_suffix,
    checked_bucket,
    checked_prefix,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_log = logging.getLogger(__name__)

MIB = 2**20
_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys
_ERASE_ROUNDS = 5  # list-and-delete rounds before an erasure is reported unfinished
_MISSING = {"404", "NoSuchKey", "NotFound"}


@contextmanager
def _missing_blob(key: str) -> Iterator[None]:
    """S3's "no such object" for ``key`` as ``BlobNotFound``; other errors pass on."""
    try:
        yield
    except ClientError as exc:
        if _code(exc) in _MISSING:
            raise BlobNotFound(key) from exc
        raise
_REFUSED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
            "InvalidToken", "AllAccessDisabled"}
_UNREACHABLE = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)
_CREDENTIALS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
# The SDK's debug logs hold the endpoint and the access key id (in signed headers).
_SDK_LOGGERS = ("boto3", "botocore", "s3transfer", "urllib3")
_TRANSFER_THREADS = 8
# Standard retries (3 tries, jittered back-off) unless AWS_MAX_ATTEMPTS says otherwise; one pool
# connection per transfer thread and then some, so urllib3 never warns (naming the host) of a full pool.
_CLIENT_CONFIG = Config(
    retries={"mode": "standard"}, connect_timeout=10, read_timeout=120,
    max_pool_connections=_TRANSFER_THREADS * 2,
)


class S3BlobStore:
    """A `BlobStore` in an S3 bucket, under an optional key prefix, with a local cache for `path`.

    Synchronous, like `LocalBlobStore`; boto3 clients are thread-safe, so one store may serve
    every thread. Nothing is sent in the constructor: `check` tells at start-up whether the bucket
    can be reached.
    """

    def __init__(
        self,
        bucket: str,
        cache: BlobCache,
        *,
        prefix: str = "",
        multipart_threshold: int = 64 * MIB,
        multipart_chunksize: int = 16 * MIB,
    ) -> None:
        self.bucket = checked_bucket(bucket)
        self.prefix = checked_prefix(prefix)
        self.cache = cache
        _quiet_sdk_logs()
        try:
            self._client: S3Client = boto3.session.Session().client("s3", config=_CLIENT_CONFIG)
        except ValueError:  # botocore's message quotes the URL; ours names the variable only
            raise StorageError(
                "AWS_ENDPOINT_URL is not a valid URL; set it to the S3 server's address, "
                "like https://s3.example.org, or unset it for AWS itself"
            ) from None
        except BotoCoreError as exc:
            raise self._failure(exc, "connect") from None
        # S3 takes parts of 5 MiB and more (but the last); s3transfer raises a smaller chunksize to that.
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=_TRANSFER_THREADS,
        )

    @property
    def location(self) -> str:
        """``s3://bucket/prefix`` (no endpoint: that stays out of messages and logs)."""
        return f"s3://{self.bucket}/{self.prefix}"

    def check(self) -> None:
        """Raise a `StorageError` saying what to set unless the bucket exists and these
        credentials may use it (call once at start-up, to fail then and not on a user's upload)."""
        with self._translated("reach the bucket"):
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    raise self._bucket_missing() from None
                raise
            try:
                versioning = self._client.get_bucket_versioning(Bucket=self.bucket).get("Status")
            except ClientError as exc:
                if _code(exc) not in _REFUSED:
                    raise
                _log.warning("may not read the versioning of %s; /forget erases nothing if it is on", self.location)
                versioning = None
        if versioning in ("Enabled", "Suspended"):
            raise StorageError(
                f"S3 bucket {self.bucket!r} has versioning {versioning.lower()}: a delete there keeps the old "
                "versions, so /forget could not erase a user; set [storage] s3_bucket to a bucket that never had "
                "versioning on"
            )

    def put(self, owner: str, kind: str, data: bytes, suffix: str) -> str:
        """Store `data` in one PUT and return its key ``"{owner}/{kind}/{sha256}{suffix}"``."""
        check_name("owner", owner)
        check_name("kind", kind)
        check_suffix(suffix)
        key = f"{owner}/{kind}/{hashlib.sha256(data).hexdigest()}{suffix}"
        with self._translated(f"store blob {key!r}"):
            if not self._object_exists(self._object(key)):  # same key means same content
                self._client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data)
        return key

    def put_written(self, owner: str, kind: str, suffix: str, write: Callable[[IO[bytes]], object]) -> str:
        """Stream `write`'s output into a temp file of the cache, hashing it as it goes, upload the
        file (in parts, past the multipart threshold) and keep it as the blob's cached copy; nothing
        of it is held in memory. A failing `write` or upload leaves no object and no file."""
        check_name("owner", owner)
        check_name("kind", kind)
        check_suffix(suffix)
        temp = self.cache.temp_file(owner, kind)
        try:
            with temp.open("r+b") as handle:
                hashing = HashingWriter(handle)
                write(hashing)  # type: ignore[arg-type]  # a write-only file, which is all it needs
            key = f"{owner}/{kind}/{hashing.hexdigest()}{suffix}"
            with self._translated(f"store blob {key!r}"):
                if not self._object_exists(self._object(key)):
                    self._client.upload_file(str(temp), self.bucket, self._object(key), Config=self._transfer)
            self.cache.adopt(key, temp)
        except OSError as exc:
            raise StorageError(
                f"could not write a blob into the cache {self.cache.root}: {exc}; check free disk space"
            ) from exc
        finally:
            temp.unlink(missing_ok=True)  # gone already once adopted
        return key

    def get(self, key: str) -> bytes:
        """The bytes stored under `key`, straight from the bucket; raises `BlobNotFound`."""
        name = self._object(key)
        with self._translated(f"read blob {key!r}"), _missing_blob(key):
            return self._client.get_object(Bucket=self.bucket, Key=name)["Body"].read()

    def exists(self, key: str) -> bool:
        """Whether a blob is stored under `key` (raises `InvalidBlobKey` for a malformed key)."""
        name = self._object(key)
        with self._translated(f"look up blob {key!r}"):
            return self._object_exists(name)

    def path(self, key: str) -> Path:
        """A verified local copy of the blob from the cache, fetched (in ranged parts when large)
        when the cache has none; raises `BlobNotFound`. Do not modify the file."""
        name = self._object(key)
        cached = self.cache.lookup(key)
        if cached is not None:
            return cached

        def download(handle: IO[bytes]) -> None:
            self._client.download_fileobj(self.bucket, name, handle, Config=self._transfer)

        with self._translated(f"fetch blob {key!r}"), _missing_blob(key):
            return self.cache.fill(key, download)

    def delete(self, key: str) -> None:
        """Remove the blob and this host's cached copy; deleting a missing blob is a no-op."""
        name = self._object(key)
        self.cache.discard(key)
        with self._translated(f"delete blob {key!r}"):
            self._client.delete_object(Bucket=self.bucket, Key=name)

    def delete_owner(self, owner: str) -> int:
        """Remove every object of `owner` (blobs, references, unfinished multipart uploads) and this
        host's cached copies, until a listing shows none left; returns how many blobs were removed.
        Raises `StorageError` when objects keep appearing (a job still writing): retry later."""
        check_name("owner", owner)
        where = f"{self.prefix}{owner}/"
        count = 0
        self.cache.discard_owner(owner)
        with self._translated(f"erase the blobs of {owner}"):
            for _ in range(_ERASE_ROUNDS):
                aborted = self._abort_uploads(where)
                names = self._list(where)
                if not names and not aborted:  # verified by listing: nothing of the owner is left
                    break
                count += sum(1 for n in names if KEY_RE.fullmatch(n[len(self.prefix):]))
                self._delete_objects(names)
            else:
                raise StorageError(
                    f"objects of {owner} kept appearing in {self.location} while they were erased "
                    "(a job still writing?); erase them again once it has stopped"
                )
        self.cache.discard_owner(owner)  # copies a concurrent `path` made meanwhile
        _log.info("deleted %d blobs of %s", count, owner)
        return count

    def set_ref(self, owner: str, kind: str, name: str, value: dict[str, Any]) -> None:
        """Replace the named JSON document in one PUT (S3 replaces an object whole)."""
        body = json.dumps(value, sort_keys=True).encode()
        with self._translated(f"write reference {name!r}"):
            self._client.put_object(
                Bucket=self.bucket, Key=self._ref(owner, kind, name), Body=body, ContentType="application/json"
            )

    def get_ref(self, owner: str, kind: str, name: str) -> dict[str, Any] | None:
        """The named document, or None when there is none."""
        where = self._ref(owner, kind, name)
        with self._translated(f"read reference {name!r}"):
            try:
                body = self._client.get_object(Bucket=self.bucket, Key=where)["Body"].read()
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    return None
                raise
        try:
            value = json.loads(body)
        except ValueError as exc:
            raise StorageError(
                f"s3://{self.bucket}/{where} is not valid JSON: {exc}; delete it to start that job over"
            ) from exc
        if not isinstance(value, dict):
            raise StorageError(f"s3://{self.bucket}/{where} does not hold a JSON object; delete it to start that job over")
        return value

    def delete_ref(self, owner: str, kind: str, name: str) -> None:
        """Remove the named document; a missing one is not an error."""
        where = self._ref(owner, kind, name)
        with self._translated(f"delete reference {name!r}"):
            self._client.delete_object(Bucket=self.bucket, Key=where)

    def cached_owners(self) -> list[str]:
        return self.cache.owners()

    def uncache_owner(self, owner: str) -> int:
        check_name("owner", owner)
        return self.cache.discard_owner(owner)

    def prune_cache(self) -> int:
        """Drop the cached copies of every owner with no object left in the bucket (erased while
        this host was down, so no /forget reached it); returns how many owners. Called at opening."""
        pruned = 0
        for owner in self.cache.owners():
            if not NAME_RE.fullmatch(owner):
                continue  # not an owner's folder: nothing of ours
            with self._translated(f"look up the blobs of {owner}"):
                page = self._client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}{owner}/", MaxKeys=1)
            if not page.get("Contents"):
                self.cache.discard_owner(owner)
                pruned += 1
        if pruned:
            _log.info("dropped the cached copies of %d erased owners", pruned)
        return pruned

    def _object(self, key: str) -> str:
        """The object name of a valid key; refuses malformed keys as the local store does."""
        return f"{self.prefix}{check_key(key)}"

    def _ref(self, owner: str, kind: str, name: str) -> str:
        for what, value in (("owner", owner), ("kind", kind), ("reference name", name)):
            check_name(what, value)
        return f"{self.prefix}{owner}/{kind}/{name}{REF_SUFFIX}"

    def _object_exists(self, name: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=name)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return False
            raise
        return True

    def _list(self, where: str) -> list[str]:
        names: list[str] = []
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=where):
            names += [item["Key"] for item in page.get("Contents", [])]
        return names

    def _delete_objects(self, names: list[str]) -> None:
        for start in range(0, len(names), _DELETE_BATCH):
            batch = [{"Key": name} for name in names[start:start + _DELETE_BATCH]]
            reply = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})  # type: ignore[typeddict-item]
            errors = reply.get("Errors", [])
            if errors:
                first = errors[0]
                raise StorageError(
                    f"{len(errors)} object(s) in {self.location} could not be deleted, e.g. "
                    f"{first.get('Key')!r}: {first.get('Code')} {first.get('Message')}; check that "
                    f"the credentials ({_CREDENTIALS}) may delete objects, then erase again"
                )

    def _abort_uploads(self, where: str) -> int:
        """Abort multipart uploads a crashed writer left: their parts hold the owner's data too."""
        aborted = 0
        for page in self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=where):
            for upload in page.get("Uploads", []):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
        return aborted

    @contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        """SDK failures become `StorageError`s that say what to set or fix."""
        try:
            yield
        except (ClientError, BotoCoreError, boto3.exceptions.Boto3Error) as exc:
            cause = _root_cause(exc)
            # Connection errors quote the endpoint URL: not kept as the cause, so no traceback shows it.
            raise self._failure(cause, doing) from (None if isinstance(cause, _UNREACHABLE) else exc)

    def _failure(self, exc: BaseException, doing: str) -> StorageError:
        if isinstance(exc, ClientError):
            code = _code(exc)
            if code == "NoSuchBucket":
                return self._bucket_missing()
            if code in _REFUSED:
                return StorageError(
                    f"S3 refused to {doing} in {self.location} ({code}); check {_CREDENTIALS} and that "
                    f"they may read, write, list and delete in bucket {self.bucket!r}"
                )
            message = exc.response.get("Error", {}).get("Message", "")
            return StorageError(f"could not {doing} in {self.location}: {code} {message}".rstrip())
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(f"no S3 credentials to {doing} in {self.location}; set {_CREDENTIALS}")
        if isinstance(exc, _UNREACHABLE):
            return StorageError(
                f"could not reach the S3 server to {doing} in {self.location} ({type(exc).__name__}); "
                "check AWS_ENDPOINT_URL (unset it for AWS itself), AWS_DEFAULT_REGION and that the server is up"
            )
        return StorageError(f"could not {doing} in {self.location}: {type(exc).__name__}: {exc}")

    def _bucket_missing(self) -> StorageError:
        return StorageError(
            f"S3 bucket {self.bucket!r} does not exist on the server AWS_ENDPOINT_URL points at "
            "(AWS itself when it is unset); create it, or set [storage] s3_bucket to an existing bucket"
        )


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _root_cause(exc: BaseException) -> BaseException:
    """The SDK error under s3transfer's wrappers (S3UploadFailedError, RetriesExceededError)."""
    seen = exc
    while isinstance(seen, boto3.exceptions.Boto3Error):
        inner = seen.__cause__ or seen.__context__
        if inner is None:
            break
        seen = inner
    return seen


def _quiet_sdk_logs() -> None:
    """Keep the SDK's debug records (endpoint, access key id, request details) out of the logs, even
    under ``-v``; a logger given its own level on purpose keeps it."""
    for name in _SDK_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


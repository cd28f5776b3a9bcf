"""Both blob stores, the same tests: LocalBlobStore on a real folder and S3BlobStore on a real S3
server (moto's, over HTTP). Keys, content addressing, atomic writes, references, erasure; then what
only the local store has (its temp files and renames)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import boto3
import pytest

from storage.blobs import BlobStore, LocalBlobStore, owner_for
from storage.errors import BlobNotFound, InvalidBlobKey, StorageError
from storage.s3 import S3BlobStore

PNG = b"\x89PNG\r\n\x1a\n fake image bytes"
HEX = "a" * 64
AnyStore = LocalBlobStore | S3BlobStore


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> AnyStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    s3: S3BlobStore = request.getfixturevalue("s3_store")
    return s3


@pytest.fixture
def local(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def stored(store: AnyStore) -> list[str]:
    """Every name the store's backend holds, seen behind its back: files under the root, or objects
    under the prefix (with unfinished multipart uploads and the cache's temp files)."""
    if isinstance(store, LocalBlobStore):
        return [p.relative_to(store.root).as_posix() for p in _files(store.root)]
    client = boto3.client("s3")
    objects = client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix).get("Contents", [])
    uploads = client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix).get("Uploads", [])
    temps = [p for p in _files(store.cache.root) if p.name.endswith(".tmp")]
    return sorted(
        [o["Key"].removeprefix(store.prefix) for o in objects]
        + [f"upload of {u['Key']}" for u in uploads]
        + [f"cache temp {p}" for p in temps]
    )


def write_raw(store: AnyStore, name: str, data: bytes) -> None:
    """Write a file or object under the store's root or prefix without going through the store."""
    if isinstance(store, LocalBlobStore):
        (store.root / name).parent.mkdir(parents=True, exist_ok=True)
        (store.root / name).write_bytes(data)
    else:
        boto3.client("s3").put_object(Bucket=store.bucket, Key=f"{store.prefix}{name}", Body=data)


def test_owner_for_names_the_user() -> None:
    assert owner_for(42) == "u42"


def test_put_then_get_round_trips_under_a_content_key(store: AnyStore) -> None:
    key = store.put("u1", "photo", PNG, ".png")

    assert key == f"u1/photo/{hashlib.sha256(PNG).hexdigest()}.png"  # the same key in every store
    assert store.get(key) == PNG
    assert store.exists(key)
    assert store.path(key).read_bytes() == PNG
    assert stored(store) == [key]


def test_every_store_satisfies_the_protocol(store: AnyStore) -> None:
    typed: BlobStore = store  # checked by mypy
    key = typed.put("u1", "embedding", b"[0.1, 0.2]", ".json")
    assert typed.get(key) == b"[0.1, 0.2]"


def test_same_content_gives_one_key_and_one_file(store: AnyStore) -> None:
    first = store.put("u1", "photo", PNG, ".png")
    second = store.put("u1", "photo", PNG, ".png")
    other = store.put("u1", "photo", PNG + b"!", ".png")

    assert first == second
    assert other != first
    assert stored(store) == sorted([first, other])


def test_missing_blob_raises_blob_not_found_naming_the_key(store: AnyStore) -> None:
    key = f"u1/photo/{'0' * 64}.png"

    with pytest.raises(BlobNotFound) as from_get:
        store.get(key)
    with pytest.raises(BlobNotFound) as from_path:
        store.path(key)

    assert key in str(from_get.value)
    assert from_get.value.key == key
    assert key in str(from_path.value)
    assert isinstance(from_get.value, StorageError)
    assert store.exists(key) is False
    assert stored(store) == []  # a failed fetch leaves no partial copy behind


def test_delete_removes_the_blob_and_is_idempotent(store: AnyStore) -> None:
    key = store.put("u1", "photo", PNG, ".png")
    kept = store.put("u1", "photo", b"other", ".png")
    copy = store.path(key)

    store.delete(key)
    store.delete(key)

    assert not store.exists(key)
    assert not copy.exists()  # the S3 store's cached copy goes too
    with pytest.raises(BlobNotFound):
        store.path(key)
    assert store.get(kept) == b"other"


def test_delete_owner_removes_one_owner_only(store: AnyStore) -> None:
    mine = [
        store.put("u1", "photo", PNG, ".png"),
        store.put("u1", "crop", b"crop", ".png"),
        store.put("u1", "lora", b"weights", ".safetensors"),
    ]
    copies = [store.path(key) for key in mine]
    theirs = store.put("u2", "photo", PNG, ".png")
    store.put("u10", "photo", PNG, ".png")  # "u1" is a prefix of its name, not its folder

    assert store.delete_owner("u1") == 3

    assert not any(store.exists(key) for key in mine)
    assert not any(copy.exists() for copy in copies)
    assert not any(name.startswith("u1/") for name in stored(store))
    assert store.get(theirs) == PNG
    assert store.delete_owner("u1") == 0
    assert store.delete_owner("u10") == 1


def test_dropping_an_owner_s_cached_copies_leaves_the_store_whole(store: AnyStore) -> None:
    key = store.put_written("u1", "lora", ".safetensors", lambda f: f.write(b"weights"))
    copy = store.path(key)
    other = store.path(store.put("u2", "photo", PNG, ".png"))
    is_copy = isinstance(store, S3BlobStore)  # a local store's path is the blob itself: nothing cached

    assert store.cached_owners() == (["u1", "u2"] if is_copy else [])
    assert store.uncache_owner("u1") == (1 if is_copy else 0)
    assert copy.exists() is not is_copy
    assert store.cached_owners() == (["u2"] if is_copy else [])
    assert store.get(key) == b"weights" and store.path(key).read_bytes() == b"weights"
    assert other.exists()
    with pytest.raises(InvalidBlobKey):
        store.uncache_owner("../u2")


@pytest.mark.parametrize(
    ("owner", "kind", "suffix"),
    [
        ("..", "photo", ".png"),
        ("u1/../u2", "photo", ".png"),
        ("/etc", "photo", ".png"),
        ("", "photo", ".png"),
        (".hidden", "photo", ".png"),
        ("u1", "..", ".png"),
        ("u1", "a/b", ".png"),
        ("u1", "a\\b", ".png"),
        ("u1", "photo", "png"),
        ("u1", "photo", ""),
        ("u1", "photo", ".png/../x"),
        ("u1", "photo", "./x"),
        ("u1", "photo", ".PNG"),
    ],
)
def test_put_rejects_unsafe_names(store: AnyStore, owner: str, kind: str, suffix: str) -> None:
    with pytest.raises(InvalidBlobKey):
        store.put(owner, kind, PNG, suffix)
    with pytest.raises(InvalidBlobKey):
        store.put_written(owner, kind, suffix, lambda file: file.write(PNG))
    assert stored(store) == []  # nothing was created on the way to the error
    if isinstance(store, LocalBlobStore):
        assert not store.root.exists()


@pytest.mark.parametrize(
    "key",
    [
        f"../u1/photo/{HEX}.png",
        f"/u1/photo/{HEX}.png",
        f"u1/../u2/{HEX}.png",
        f"u1/photo/../{HEX}.png",
        f"u1/photo/{HEX}.png/..",
        f"u1\\photo\\{HEX}.png",
        f"u1/photo/{HEX}",
        f"u1/photo/{'A' * 64}.png",
        f"u1/photo/{'a' * 63}.png",
        f"u1/photo/sub/{HEX}.png",
        "",
    ],
)
def test_malformed_keys_are_rejected_everywhere(store: AnyStore, key: str) -> None:
    for method in (store.get, store.exists, store.path, store.delete):
        with pytest.raises(InvalidBlobKey):
            method(key)


def test_delete_owner_rejects_unsafe_owner(store: AnyStore, tmp_path: Path) -> None:
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    kept = store.put("u2", "photo", PNG, ".png")

    for owner in ("..", "../..", "/", "", "u2/photo"):
        with pytest.raises(InvalidBlobKey):
            store.delete_owner(owner)

    assert outside.read_text() == "keep me"
    assert store.get(kept) == PNG


def test_a_streamed_blob_gets_the_key_and_bytes_put_would_give(store: AnyStore) -> None:
    chunks = [os.urandom(1 << 16) for _ in range(20)]

    def write(file: object) -> None:
        for chunk in chunks:  # written piece by piece, never joined in the store
            file.write(chunk)  # type: ignore[attr-defined]

    key = store.put_written("u1", "checkpoints", ".pt", write)
    whole = b"".join(chunks)
    assert key == f"u1/checkpoints/{hashlib.sha256(whole).hexdigest()}.pt"
    assert store.get(key) == whole
    assert store.path(key).read_bytes() == whole
    assert store.put_written("u1", "checkpoints", ".pt", write) == key  # same content, same key
    assert store.put("u1", "checkpoints", whole, ".pt") == key
    assert stored(store) == [key]


def test_a_stream_that_fails_midway_leaves_nothing(store: AnyStore) -> None:
    def write(file: object) -> None:
        file.write(b"half of it")  # type: ignore[attr-defined]
        raise RuntimeError("the trainer died")

    with pytest.raises(RuntimeError, match="trainer died"):
        store.put_written("u1", "checkpoints", ".pt", write)
    assert stored(store) == []


def test_named_references_are_replaced_whole_and_go_with_their_owner(store: AnyStore) -> None:
    assert store.get_ref("u1", "checkpoints", "train-1") is None
    store.set_ref("u1", "checkpoints", "train-1", {"key": "a", "step": 1})
    store.set_ref("u1", "checkpoints", "train-1", {"key": "b", "step": 2})
    assert store.get_ref("u1", "checkpoints", "train-1") == {"key": "b", "step": 2}
    assert store.get_ref("u2", "checkpoints", "train-1") is None
    blob = store.put("u1", "checkpoints", b"x", ".pt")
    assert stored(store) == sorted([blob, "u1/checkpoints/train-1.ref.json"])  # one layout for both
    assert store.delete_owner("u1") == 1  # the reference is not a blob, but goes with the owner
    assert store.get_ref("u1", "checkpoints", "train-1") is None and not store.exists(blob)
    assert stored(store) == []
    store.delete_ref("u1", "checkpoints", "train-1")  # a missing one: no error
    with pytest.raises(InvalidBlobKey):
        store.set_ref("u1", "checkpoints", "../escape", {})


def test_a_reference_can_be_deleted(store: AnyStore) -> None:
    store.set_ref("u1", "checkpoints", "train-2", {"key": "a"})
    store.delete_ref("u1", "checkpoints", "train-2")
    assert store.get_ref("u1", "checkpoints", "train-2") is None
    assert stored(store) == []


@pytest.mark.parametrize("damage", [b"{not json", b"[1, 2]"])
def test_a_damaged_reference_says_how_to_recover(store: AnyStore, damage: bytes) -> None:
    store.set_ref("u1", "checkpoints", "train-9", {"key": "a"})
    write_raw(store, "u1/checkpoints/train-9.ref.json", damage)
    with pytest.raises(StorageError, match="delete it to start that job over"):
        store.get_ref("u1", "checkpoints", "train-9")


# What only the local store has: its own temp files, renames and fsyncs.


def test_local_path_is_the_file_under_the_root(local: LocalBlobStore) -> None:
    key = local.put("u1", "photo", PNG, ".png")
    assert local.path(key) == local.root / key


def test_existing_content_is_not_rewritten(local: LocalBlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    key = local.put("u1", "photo", PNG, ".png")

    def no_replace(src: object, dst: object) -> None:
        raise AssertionError("an existing blob must not be written again")

    monkeypatch.setattr(os, "replace", no_replace)
    assert local.put("u1", "photo", PNG, ".png") == key


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_write_leaves_neither_final_nor_temp_file(
    local: LocalBlobStore, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    def crash(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, crash)
    with pytest.raises(StorageError, match="No space left") as caught:
        local.put("u1", "photo", PNG, ".png")
    monkeypatch.undo()

    key = f"u1/photo/{hashlib.sha256(PNG).hexdigest()}.png"
    assert key in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)
    assert not local.exists(key)
    assert _files(local.root) == []
    # The store still works after the failure.
    assert local.put("u1", "photo", PNG, ".png") == key
    assert local.get(key) == PNG


def test_a_crashed_writer_s_temp_file_goes_with_its_owner_uncounted(local: LocalBlobStore) -> None:
    local.put("u1", "photo", PNG, ".png")
    (local.root / "u1" / "photo" / ".incoming-abc.tmp").write_bytes(b"partial")

    assert local.delete_owner("u1") == 1
    assert not (local.root / "u1").exists()

"""LocalBlobStore on a real folder: keys, content addressing, atomic writes, erasure."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from storage.blobs import BlobStore, LocalBlobStore, owner_for
from storage.errors import BlobNotFound, InvalidBlobKey, StorageError

PNG = b"\x89PNG\r\n\x1a\n fake image bytes"


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_owner_for_names_the_user() -> None:
    assert owner_for(42) == "u42"


def test_put_then_get_round_trips_under_a_content_key(store: LocalBlobStore) -> None:
    key = store.put("u1", "photo", PNG, ".png")

    assert key == f"u1/photo/{hashlib.sha256(PNG).hexdigest()}.png"
    assert store.get(key) == PNG
    assert store.exists(key)
    assert store.path(key) == store.root / key
    assert store.path(key).read_bytes() == PNG


def test_local_store_satisfies_the_protocol(tmp_path: Path) -> None:
    store: BlobStore = LocalBlobStore(tmp_path)  # checked by mypy
    key = store.put("u1", "embedding", b"[0.1, 0.2]", ".json")
    assert store.get(key) == b"[0.1, 0.2]"


def test_same_content_gives_one_key_and_one_file(store: LocalBlobStore) -> None:
    first = store.put("u1", "photo", PNG, ".png")
    second = store.put("u1", "photo", PNG, ".png")
    other = store.put("u1", "photo", PNG + b"!", ".png")

    assert first == second
    assert other != first
    assert _files(store.root) == sorted([store.root / first, store.root / other])


def test_existing_content_is_not_rewritten(
    store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = store.put("u1", "photo", PNG, ".png")

    def no_replace(src: object, dst: object) -> None:
        raise AssertionError("an existing blob must not be written again")

    monkeypatch.setattr(os, "replace", no_replace)
    assert store.put("u1", "photo", PNG, ".png") == key


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_write_leaves_neither_final_nor_temp_file(
    store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    def crash(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, crash)
    with pytest.raises(StorageError, match="No space left") as caught:
        store.put("u1", "photo", PNG, ".png")
    monkeypatch.undo()

    key = f"u1/photo/{hashlib.sha256(PNG).hexdigest()}.png"
    assert key in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)
    assert not store.exists(key)
    assert _files(store.root) == []
    # The store still works after the failure.
    assert store.put("u1", "photo", PNG, ".png") == key
    assert store.get(key) == PNG


def test_missing_blob_raises_blob_not_found_naming_the_key(store: LocalBlobStore) -> None:
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


def test_delete_removes_the_blob_and_is_idempotent(store: LocalBlobStore) -> None:
    key = store.put("u1", "photo", PNG, ".png")
    kept = store.put("u1", "photo", b"other", ".png")

    store.delete(key)
    store.delete(key)

    assert not store.exists(key)
    assert store.get(kept) == b"other"


def test_delete_owner_removes_one_owner_only(store: LocalBlobStore) -> None:
    mine = [
        store.put("u1", "photo", PNG, ".png"),
        store.put("u1", "crop", b"crop", ".png"),
        store.put("u1", "lora", b"weights", ".safetensors"),
    ]
    theirs = store.put("u2", "photo", PNG, ".png")
    # A temp file left by a crashed writer is removed too, but it is not a blob.
    (store.root / "u1" / "photo" / ".incoming-abc.tmp").write_bytes(b"partial")

    assert store.delete_owner("u1") == 3

    assert not any(store.exists(key) for key in mine)
    assert not (store.root / "u1").exists()
    assert store.get(theirs) == PNG
    assert store.delete_owner("u1") == 0


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
def test_put_rejects_unsafe_names(
    store: LocalBlobStore, owner: str, kind: str, suffix: str
) -> None:
    with pytest.raises(InvalidBlobKey):
        store.put(owner, kind, PNG, suffix)
    assert not store.root.exists()  # nothing was created on the way to the error


HEX = "a" * 64


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
def test_malformed_keys_are_rejected_everywhere(store: LocalBlobStore, key: str) -> None:
    for method in (store.get, store.exists, store.path, store.delete):
        with pytest.raises(InvalidBlobKey):
            method(key)


def test_delete_owner_rejects_unsafe_owner(store: LocalBlobStore, tmp_path: Path) -> None:
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")

    for owner in ("..", "../..", "/", ""):
        with pytest.raises(InvalidBlobKey):
            store.delete_owner(owner)

    assert outside.read_text() == "keep me"



def test_a_streamed_blob_gets_the_key_and_bytes_put_would_give(store: LocalBlobStore) -> None:
    chunks = [os.urandom(1 << 16) for _ in range(20)]

    def write(file: object) -> None:
        for chunk in chunks:  # written piece by piece, never joined in the store
            file.write(chunk)  # type: ignore[attr-defined]

    key = store.put_written("u1", "checkpoints", ".pt", write)
    whole = b"".join(chunks)
    assert key == f"u1/checkpoints/{hashlib.sha256(whole).hexdigest()}.pt"
    assert store.get(key) == whole
    assert store.put_written("u1", "checkpoints", ".pt", write) == key  # same content, same key
    assert store.put("u1", "checkpoints", whole, ".pt") == key
    assert [p.name for p in (store.root / "u1" / "checkpoints").iterdir()] == [key.split("/")[-1]]


def test_a_stream_that_fails_midway_leaves_nothing(store: LocalBlobStore) -> None:
    def write(file: object) -> None:
        file.write(b"half of it")  # type: ignore[attr-defined]
        raise RuntimeError("the trainer died")

    with pytest.raises(RuntimeError, match="trainer died"):
        store.put_written("u1", "checkpoints", ".pt", write)
    assert list((store.root / "u1" / "checkpoints").iterdir()) == []


def test_named_references_are_replaced_whole_and_go_with_their_owner(store: LocalBlobStore) -> None:
    assert store.get_ref("u1", "checkpoints", "train-1") is None
    store.set_ref("u1", "checkpoints", "train-1", {"key": "a", "step": 1})
    store.set_ref("u1", "checkpoints", "train-1", {"key": "b", "step": 2})
    assert store.get_ref("u1", "checkpoints", "train-1") == {"key": "b", "step": 2}
    assert store.get_ref("u2", "checkpoints", "train-1") is None
    blob = store.put("u1", "checkpoints", b"x", ".pt")
    assert store.delete_owner("u1") == 1  # the reference is not a blob, but goes with the folder
    assert store.get_ref("u1", "checkpoints", "train-1") is None and not store.exists(blob)
    store.delete_ref("u1", "checkpoints", "train-1")  # a missing one: no error
    with pytest.raises(InvalidBlobKey):
        store.set_ref("u1", "checkpoints", "../escape", {})


def test_a_damaged_reference_says_how_to_recover(store: LocalBlobStore) -> None:
    store.set_ref("u1", "checkpoints", "train-9", {"key": "a"})
    (store.root / "u1" / "checkpoints" / "train-9.ref.json").write_text("{not json")
    with pytest.raises(StorageError, match="delete it to start that job over"):
        store.get_ref("u1", "checkpoints", "train-9")

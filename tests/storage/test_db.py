"""Database on real SQLite files: migrations, typed queries, erasure."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from storage.db import MIGRATIONS, Database, User
from storage.errors import (
    ConstraintViolation,
    InvalidValue,
    MigrationError,
    RecordNotFound,
    StorageError,
)

SHA = "ab" * 32
NEXT_VERSION = MIGRATIONS[-1][0] + 1  # a migration the code does not have yet


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "avatarbooth.sqlite3"


@pytest.fixture
async def db(db_path: Path, clock: FakeClock) -> AsyncIterator[Database]:
    async with Database.open(db_path, clock=clock) as database:
        yield database


def _query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """Look at the file with plain sqlite3, the way an operator would."""
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


# -- migrations and connection settings ---------------------------------------------------------


async def test_migrations_are_recorded_and_not_reapplied(db_path: Path, clock: FakeClock) -> None:
    async with Database.open(db_path, clock=clock) as db:
        await db.get_or_create_user("console", "alice")
    clock.now += 60
    async with Database.open(db_path, clock=clock) as db:
        assert (await db.get_or_create_user("console", "alice")).id == 1

    assert _query(db_path, "SELECT version, applied_at FROM schema_version ORDER BY version") == [
        (version, 1_000.0) for version, _ in MIGRATIONS
    ]
    tables = {name for (name,) in _query(db_path, "SELECT name FROM sqlite_master")}
    assert {"users", "consents", "photos", "jobs", "models", "images", "inbox"} <= tables


async def test_wal_mode_is_on(db: Database, db_path: Path) -> None:
    assert _query(db_path, "PRAGMA journal_mode") == [("wal",)]


async def test_foreign_keys_are_enforced(db: Database) -> None:
    with pytest.raises(ConstraintViolation, match="refers to exists") as caught:
        await db.add_photo(999, "u999/photo/x.png", SHA)
    assert isinstance(caught.value.__cause__, sqlite3.IntegrityError)
    # The failed write was rolled back, so the next one can start its own transaction.
    user = await db.get_or_create_user("console", "alice")
    with pytest.raises(ConstraintViolation):
        await db.add_model(user.id, "lora", "tiny", "k", "sks", "person", job_id=12345)
    assert await db.list_models(user.id) == []
    assert (await db.add_photo(user.id, "k", SHA)).user_id == user.id


async def test_new_migration_is_applied_on_reopen(db_path: Path, clock: FakeClock) -> None:
    async with Database.open(db_path, clock=clock):
        pass
    clock.now = 2_000.0
    new = NEXT_VERSION
    extended = [*MIGRATIONS, (new, "CREATE TABLE extra (x INTEGER);")]
    async with Database.open(db_path, clock=clock, migrations=extended):
        pass
    async with Database.open(db_path, clock=clock, migrations=extended):
        pass

    assert _query(db_path, "SELECT version, applied_at FROM schema_version ORDER BY version") == [
        *((version, 1_000.0) for version, _ in MIGRATIONS),
        (new, 2_000.0),
    ]
    assert _query(db_path, "SELECT COUNT(*) FROM extra") == [(0,)]


async def test_failed_migration_is_rolled_back(db_path: Path, clock: FakeClock) -> None:
    async with Database.open(db_path, clock=clock) as db:
        await db.get_or_create_user("console", "alice")
    broken = [*MIGRATIONS, (NEXT_VERSION, "CREATE TABLE extra (x INTEGER);\nCREATE TABLE users (x);")]

    with pytest.raises(MigrationError, match=f"migration {NEXT_VERSION} failed"):
        async with Database.open(db_path, clock=clock, migrations=broken):
            pass

    names = {row[0] for row in _query(db_path, "SELECT name FROM sqlite_master")}
    assert "extra" not in names
    assert _query(db_path, "SELECT version FROM schema_version ORDER BY version") == [
        (version,) for version, _ in MIGRATIONS
    ]
    async with Database.open(db_path, clock=clock) as db:
        assert await db.get_user(1) is not None


async def test_database_newer_than_the_code_is_refused(db_path: Path) -> None:
    async with Database.open(db_path, migrations=[*MIGRATIONS, (NEXT_VERSION, "SELECT 1;")]):
        pass
    with pytest.raises(MigrationError, match="newer"):
        async with Database.open(db_path):
            pass


async def test_a_file_that_is_not_a_database_is_reported(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(StorageError, match="not a database"):
        async with Database.open(db_path):
            pass


async def test_two_connections_wait_for_each_other(db_path: Path) -> None:
    # Without busy_timeout, one side would fail at once with "database is locked".
    async with Database.open(db_path) as first, Database.open(db_path) as second:
        users = await asyncio.gather(
            *(
                conn.get_or_create_user("console", str(n))
                for n in range(20)
                for conn in (first, second)
            )
        )
    assert len({user.id for user in users}) == 20


async def test_every_connection_commits_without_fsync_and_enforces_references(db: Database) -> None:
    # Per-connection settings: a connection that missed them would fsync every commit (FULL)
    # or let a row point at nothing. Reads, single writes and transactions each have their own.
    for connection in (db._conn, db._statements, db._reader):
        assert connection is not None
        assert [tuple(r) for r in await connection.execute_fetchall("PRAGMA synchronous")] == [(1,)]
        assert [tuple(r) for r in await connection.execute_fetchall("PRAGMA foreign_keys")] == [(1,)]


async def test_the_first_messages_of_one_user_at_once_make_one_user(db: Database) -> None:
    users = await asyncio.gather(*(db.get_or_create_user("telegram", "7") for _ in range(30)))
    assert len({user.id for user in users}) == 1


async def test_writes_racing_an_erasure_are_all_either_before_or_after_it(
    db: Database, db_path: Path
) -> None:
    """Single-statement writes run without the transaction lock, beside a transaction of several
    statements (erasure): SQLite's own lock must keep each one whole, before or after it."""
    user = await db.get_or_create_user("console", "racer")
    await db.record_consent(user.id, "1")
    photos = [db.add_photo(user.id, f"k{n}", SHA) for n in range(40)]
    jobs = [db.create_job(user.id, "draw", "q", {}) for _ in range(40)]
    written = await asyncio.gather(*photos, db.erase_user(user.id), *jobs)  # no "database is locked"
    photo_ids = sorted(p.id for p in written[:40])
    job_ids = sorted(j.id for j in written[41:])
    kept_photos = [p.id for p in await db.list_photos(user.id)]
    kept_jobs = [i for (i,) in _query(db_path, f"SELECT id FROM jobs WHERE user_id = {user.id} ORDER BY id")]
    # The erasure happened at one point: what was written before it is all gone, what came
    # after is all there (a suffix of each table's ids), and the reader sees just that.
    assert kept_photos == photo_ids[len(photo_ids) - len(kept_photos):]
    assert kept_jobs == job_ids[len(job_ids) - len(kept_jobs):]
    assert _query(db_path, f"SELECT COUNT(*) FROM consents WHERE user_id = {user.id}") == [(0,)]


async def test_the_inbox_keeps_events_until_dropped_and_across_a_reopen(db_path: Path) -> None:
    async with Database.open(db_path) as db:
        await db.put_inbound("telegram", "41", {"update_id": 41, "message": {"photo": [1]}})
        await db.put_inbound("telegram", "42", {"update_id": 42})
        await db.put_inbound("telegram", "41", {"update_id": 41, "changed": True})  # kept once
        await db.put_inbound("discord", "41", {"other": "platform"})
        await db.drop_inbound("telegram", "42")
        await db.drop_inbound("telegram", "404")  # nothing to drop: no error
    async with Database.open(db_path) as db:  # a restart
        assert await db.pending_inbound("telegram") == [("41", {"update_id": 41, "message": {"photo": [1]}})]
        assert await db.pending_inbound("discord") == [("41", {"other": "platform"})]
        with pytest.raises(InvalidValue):
            await db.put_inbound("telegram", "43", {"bad": float("nan")})


# -- users and consent ------------------------------------------------------------------------


async def test_users_are_unique_per_platform_identity(db: Database, clock: FakeClock) -> None:
    alice = await db.get_or_create_user("telegram", "42")
    clock.now += 5
    again = await db.get_or_create_user("telegram", "42")
    other_platform = await db.get_or_create_user("discord", "42")

    assert again == alice == User(id=alice.id, platform="telegram", platform_user_id="42",
                                  created_at=1_000.0)
    assert other_platform.id != alice.id
    assert await db.get_user(alice.id) == alice
    assert await db.get_user(12345) is None


async def test_empty_platform_identity_is_rejected(db: Database) -> None:
    with pytest.raises(InvalidValue, match="platform_user_id"):
        await db.get_or_create_user("console", "")


async def test_consent_is_per_user(db: Database) -> None:
    alice = await db.get_or_create_user("console", "alice")
    bob = await db.get_or_create_user("console", "bob")
    assert await db.has_consent(alice.id) is False

    await db.record_consent(alice.id, "v1")

    assert await db.has_consent(alice.id) is True
    assert await db.has_consent(bob.id) is False


# -- photos -----------------------------------------------------------------------------------


async def test_photo_lifecycle(db: Database, clock: FakeClock) -> None:
    user = await db.get_or_create_user("console", "alice")
    photo = await db.add_photo(user.id, "u1/photo/a.png", SHA)
    assert (photo.status, photo.refusal, photo.created_at) == ("pending", None, 1_000.0)

    clock.now += 3
    checked = await db.set_photo_result(
        photo.id, "accepted", embedding_key="u1/embedding/e.json", crop_key="u1/crop/c.png"
    )
    assert checked.status == "accepted"
    assert (checked.embedding_key, checked.crop_key) == ("u1/embedding/e.json", "u1/crop/c.png")
    assert (checked.created_at, checked.updated_at) == (1_000.0, 1_003.0)
    assert await db.find_photo_by_sha(user.id, SHA) == checked

    await db.delete_photo(photo.id)
    assert await db.find_photo_by_sha(user.id, SHA) is None
    with pytest.raises(RecordNotFound, match=f"photo {photo.id}"):
        await db.set_photo_result(photo.id, "refused", refusal="no face")


async def test_find_photo_by_sha_is_per_user_and_newest_first(db: Database) -> None:
    alice = await db.get_or_create_user("console", "alice")
    bob = await db.get_or_create_user("console", "bob")
    await db.add_photo(alice.id, "k1", SHA)
    newer = await db.add_photo(alice.id, "k2", SHA)

    assert await db.find_photo_by_sha(alice.id, SHA) == newer
    assert await db.find_photo_by_sha(bob.id, SHA) is None
    assert await db.find_photo_by_sha(alice.id, "cd" * 32) is None


async def test_list_photos_filters_by_status(db: Database) -> None:
    user = await db.get_or_create_user("console", "alice")
    first = await db.add_photo(user.id, "k1", "1" * 64)
    second = await db.add_photo(user.id, "k2", "2" * 64)
    third = await db.add_photo(user.id, "k3", "3" * 64, status="accepted")
    refused = await db.set_photo_result(second.id, "refused", refusal="two faces")

    assert [p.id for p in await db.list_photos(user.id)] == [first.id, second.id, third.id]
    assert await db.list_photos(user.id, status="refused") == [refused]
    assert refused.refusal == "two faces"
    assert [p.id for p in await db.list_photos(user.id, status="accepted")] == [third.id]


async def test_invalid_photo_status_is_rejected(db: Database) -> None:
    user = await db.get_or_create_user("console", "alice")
    photo = await db.add_photo(user.id, "k1", SHA)

    with pytest.raises(InvalidValue, match="photo status must be one of pending, accepted"):
        await db.set_photo_result(photo.id, "maybe")
    with pytest.raises(InvalidValue):
        await db.add_photo(user.id, "k2", SHA, status="ok")
    with pytest.raises(InvalidValue):
        await db.list_photos(user.id, status="ok")
    assert (await db.list_photos(user.id)) == [photo]


async def test_the_apparent_gender_is_kept_with_the_photo_and_across_a_reopen(db_path: Path) -> None:
    async with Database.open(db_path) as db:
        user = await db.get_or_create_user("console", "alice")
        photo = await db.add_photo(user.id, "k1", SHA)
        assert photo.apparent_gender is None
        checked = await db.set_photo_result(photo.id, "accepted", embedding_key="e", apparent_gender="female")
        assert checked.apparent_gender == "female"
        with pytest.raises(InvalidValue, match="apparent gender must be one of female, male"):
            await db.set_photo_result(photo.id, "accepted", apparent_gender="woman")
    async with Database.open(db_path) as db:
        assert [p.apparent_gender for p in await db.list_photos(user.id)] == ["female"]
        again = await db.set_photo_result(photo.id, "refused", refusal="no_face")
        assert again.apparent_gender is None  # a new outcome replaces the old one entirely


async def test_photos_from_before_the_apparent_gender_read_as_unknown(db_path: Path) -> None:
    async with Database.open(db_path, migrations=[m for m in MIGRATIONS if m[0] < 3]) as old:
        user = await old.get_or_create_user("console", "alice")
    with sqlite3.connect(db_path) as conn:  # a row as the code before the column wrote it
        conn.execute(
            "INSERT INTO photos (user_id, blob_key, sha256, status, created_at, updated_at)"
            " VALUES (?, 'k1', ?, 'accepted', 0, 0)",
            (user.id, SHA),
        )
    async with Database.open(db_path) as db:
        (photo,) = await db.list_photos(user.id)
        assert (photo.status, photo.apparent_gender) == ("accepted", None)


# -- jobs -------------------------------------------------------------------------------------


async def test_unfinished_image_jobs_reserve_their_images(db: Database, clock: FakeClock) -> None:
    user = await db.get_or_create_user("console", "alice")
    other = await db.get_or_create_user("console", "bob")
    old = await db.create_job(user.id, "draw", "interactive", {"request": {"num_images": 8}})
    clock.now += 100
    queued = await db.create_job(user.id, "draw", "interactive", {"request": {"num_images": 2}})
    running = await db.create_job(user.id, "preview", "interactive", {"request": {"num_images": 3}})
    await db.update_job(running.id, state="running")
    done = await db.create_job(user.id, "draw", "interactive", {"request": {"num_images": 5}})
    await db.update_job(done.id, state="done")
    await db.create_job(user.id, "train", "training", {"request": {}})  # makes no images
    await db.create_job(other.id, "draw", "interactive", {"request": {"num_images": 7}})
    kinds = ("preview", "draw")
    assert await db.count_reserved_images(user.id, clock.now - 10, kinds) == 2 + 3
    assert await db.count_reserved_images(user.id, old.created_at, kinds) == 8 + 2 + 3
    assert await db.count_reserved_images(user.id, 0, ()) == 0
    assert queued.state == "queued"


async def test_job_lifecycle(db: Database, clock: FakeClock) -> None:
    user = await db.get_or_create_user("console", "alice")
    job = await db.create_job(user.id, "train", "training", {"method": "lora", "steps": 4})
    assert (job.state, job.attempts, job.progress, job.result) == ("queued", 0, 0.0, None)
    assert job.payload == {"method": "lora", "steps": 4}
    assert await db.active_job(user.id, "train") == job

    clock.now += 1
    running = await db.update_job(job.id, state="running", progress=0.5, message="step 2/4",
                                  attempts_delta=1)
    assert (running.state, running.progress, running.attempts) == ("running", 0.5, 1)
    assert running.message == "step 2/4"
    assert (running.created_at, running.updated_at) == (1_000.0, 1_001.0)
    assert await db.active_job(user.id, "train") == running

    done = await db.update_job(job.id, state="done", progress=1.0, result={"model_key": "k"})
    assert done.result == {"model_key": "k"}
    assert done.message == "step 2/4"  # fields not given are left alone
    assert done.attempts == 1
    assert await db.get_job(job.id) == done
    assert await db.active_job(user.id, "train") is None


async def test_list_jobs_by_state_and_active_job_by_kind(db: Database) -> None:
    user = await db.get_or_create_user("console", "alice")
    other = await db.get_or_create_user("console", "bob")
    failed = await db.create_job(user.id, "faces", "interactive", {})
    await db.update_job(failed.id, state="failed", error="no face")
    queued = await db.create_job(user.id, "draw", "interactive", {"prompt": "astronaut"})
    running = await db.create_job(user.id, "train", "training", {})
    await db.update_job(running.id, state="running")
    await db.create_job(other.id, "draw", "interactive", {})

    assert [j.id for j in await db.list_jobs(user.id)] == [failed.id, queued.id, running.id]
    active = await db.list_jobs(user.id, states=("queued", "running"))
    assert [j.id for j in active] == [queued.id, running.id]
    assert [j.error for j in await db.list_jobs(user.id, states=["failed"])] == ["no face"]
    assert await db.list_jobs(user.id, states=[]) == []
    assert (await db.active_job(user.id, "draw")) == queued
    assert await db.active_job(user.id, "faces") is None


async def test_invalid_job_updates_are_rejected_and_change_nothing(db: Database) -> None:
    user = await db.get_or_create_user("console", "alice")
    job = await db.create_job(user.id, "draw", "interactive", {})

    with pytest.raises(InvalidValue, match="job state must be one of"):
        await db.update_job(job.id, state="finished")
    with pytest.raises(InvalidValue, match="between 0 and 1"):
        await db.update_job(job.id, progress=1.5)
    with pytest.raises(InvalidValue, match="between 0 and 1"):
        await db.update_job(job.id, progress=float("nan"))
    with pytest.raises(InvalidValue, match="attempts_delta"):
        await db.update_job(job.id, attempts_delta=-1)
    with pytest.raises(InvalidValue, match="job state"):
        await db.list_jobs(user.id, states=["finished"])

    assert await db.get_job(job.id) == job


async def test_update_of_unknown_job_raises(db: Database) -> None:
    with pytest.raises(RecordNotFound, match="job 77 does not exist") as caught:
        await db.update_job(77, state="running")
    assert isinstance(caught.value, StorageError)


async def test_job_payload_must_be_json(db: Database) -> None:
    user = await db.get_or_create_user("console", "alice")
    with pytest.raises(InvalidValue, match="not JSON-serializable"):
        await db.create_job(user.id, "draw", "interactive", {"data": b"bytes"})
    assert await db.list_jobs(user.id) == []


# -- models and images ------------------------------------------------------------------------


async def test_model_versions_count_up_per_user(db: Database) -> None:
    alice = await db.get_or_create_user("console", "alice")
    bob = await db.get_or_create_user("console", "bob")
    job = await db.create_job(alice.id, "train", "training", {})
    assert await db.latest_model(alice.id) is None

    first = await db.add_model(alice.id, "lora", "tiny", "u1/lora/a.safetensors", "sks", "person",
                               job.id)
    second = await db.add_model(alice.id, "ti", "tiny", "u1/ti/b.safetensors", "<u1>", "person",
                                None)
    bobs = await db.add_model(bob.id, "lora", "tiny", "u2/lora/c.safetensors", "sks", "person",
                              None)

    assert (first.version, second.version, bobs.version) == (1, 2, 1)
    assert first.job_id == job.id
    assert await db.latest_model(alice.id) == second
    assert await db.list_models(alice.id) == [first, second]
    assert await db.list_models(bob.id) == [bobs]


async def test_concurrent_model_adds_get_distinct_versions(db: Database) -> None:
    user = await db.get_or_create_user("console", "alice")
    models = await asyncio.gather(
        *(db.add_model(user.id, "lora", "tiny", f"k{n}", "sks", "person", None) for n in range(8))
    )
    assert sorted(m.version for m in models) == list(range(1, 9))


async def test_images_and_count_since(db: Database, clock: FakeClock) -> None:
    alice = await db.get_or_create_user("console", "alice")
    bob = await db.get_or_create_user("console", "bob")
    job = await db.create_job(alice.id, "draw", "interactive", {})
    model = await db.add_model(alice.id, "lora", "tiny", "k", "sks", "person", None)

    old = await db.add_image(alice.id, job.id, "u1/image/1.png", "astronaut", 7, 0.8)
    clock.now = 2_000.0
    new = await db.add_image(alice.id, job.id, "u1/image/2.png", "pirate", 8, None,
                             model_id=model.id)
    await db.add_image(bob.id, None, "u2/image/3.png", "cat", 9, 0.1)

    assert (old.model_id, old.score, old.created_at) == (None, 0.8, 1_000.0)
    assert (new.model_id, new.seed, new.prompt) == (model.id, 8, "pirate")
    assert await db.count_images_since(alice.id, 0) == 2
    assert await db.count_images_since(alice.id, 2_000.0) == 1
    assert await db.count_images_since(alice.id, 2_000.5) == 0
    assert await db.count_images_since(bob.id, 0) == 1


async def test_finish_images_records_the_images_and_the_job_done_together_once(db: Database) -> None:
    alice = await db.get_or_create_user("console", "alice")
    job = await db.create_job(alice.id, "draw", "interactive", {})
    keys = [("u1/images/a.png", 0.7), ("u1/images/b.png", None)]

    # A statement failing half-way (the second image has no key) leaves neither images nor a done job.
    with pytest.raises(StorageError):
        await db.finish_images(job.id, [keys[0], (None, 0.1)], "me", 3, {"n": 1})  # type: ignore[list-item]
    assert await db.images_of_job(job.id) == []
    assert (await db.get_job(job.id)).state == "queued"  # type: ignore[union-attr]

    first = await db.finish_images(job.id, keys, "me", 3, {"n": 2}, model_id=None)
    again = await db.finish_images(job.id, [("u1/images/c.png", 0.9)], "me", 3, {"n": 3})

    assert [(image.blob_key, image.score, image.job_id) for image in first] == [(*keys[0], job.id), (*keys[1], job.id)]
    assert again == first == await db.images_of_job(job.id)  # a retried write adds nothing
    done = await db.get_job(job.id)
    assert done is not None and done.state == "done" and done.progress == 1.0
    with pytest.raises(RecordNotFound):
        await db.finish_images(job.id + 99, keys, "me", 3, {})


# -- erasure ----------------------------------------------------------------------------------


async def _populate(db: Database, name: str) -> User:
    user = await db.get_or_create_user("console", name)
    await db.record_consent(user.id, "v1")
    photo = await db.add_photo(user.id, f"{name}/photo", SHA)
    await db.set_photo_result(photo.id, "accepted", apparent_gender="male")
    job = await db.create_job(user.id, "train", "training", {"who": name})
    model = await db.add_model(
        user.id, "lora", "tiny", f"{name}/lora", "sks", "person", job.id
    )
    await db.add_image(user.id, job.id, f"{name}/image", "astronaut", 1, 0.5, model_id=model.id)
    return user


def _rows_per_user(path: Path, user_id: int) -> dict[str, int]:
    tables = ("consents", "photos", "jobs", "models", "images")
    return {
        table: _query(path, f"SELECT COUNT(*) FROM {table} WHERE user_id = {user_id}")[0][0]
        for table in tables
    }


async def test_erase_user_removes_everything_of_that_user_only(
    db: Database, db_path: Path
) -> None:
    alice = await _populate(db, "alice")
    bob = await _populate(db, "bob")
    bobs_before = _rows_per_user(db_path, bob.id)
    assert set(bobs_before.values()) == {1}

    await db.erase_user(alice.id)

    assert _rows_per_user(db_path, alice.id) == dict.fromkeys(bobs_before, 0)
    assert _rows_per_user(db_path, bob.id) == bobs_before
    assert _query(db_path, "SELECT user_id, apparent_gender FROM photos") == [(bob.id, "male")]
    tombstone = await db.get_user(alice.id)  # a row without the identity: work in flight still refers to it
    assert tombstone is not None and tombstone.platform_user_id == f"erased:{alice.id}"
    assert _query(db_path, "SELECT COUNT(*) FROM users WHERE platform_user_id = 'alice'") == [(0,)]
    assert await db.has_consent(alice.id) is False
    assert await db.latest_model(alice.id) is None
    assert await db.has_consent(bob.id) is True
    assert (await db.latest_model(bob.id)) is not None
    # The user can start over, under a new id (ids are never reused): versions restart, consent again.
    again = await db.get_or_create_user("console", "alice")
    assert again.id > bob.id
    await db.record_consent(again.id, "v2")
    model = await db.add_model(again.id, "lora", "tiny", "k", "sks", "person", None)
    assert model.version == 1


async def test_an_erased_users_prompts_and_keys_are_in_no_byte_of_the_database_files(
    db: Database, db_path: Path
) -> None:
    alice = await db.get_or_create_user("console", "alice")
    bob = await db.get_or_create_user("console", "bob")
    secret, key = "me as a lighthouse keeper in Tromsø", "u1/photos/" + "ab" * 32 + ".jpg"
    job = await db.create_job(alice.id, "draw", "interactive", {"request": {"prompt": secret}})
    await db.add_image(alice.id, job.id, key, secret, 7, 0.5)
    await db.add_photo(alice.id, key, "cd" * 32)
    await db.add_image(bob.id, None, "u2/images/x.png", "bob's own prompt", 1, None)

    await db.erase_user(alice.id)

    files = [p for p in db_path.parent.iterdir() if p.name.startswith(db_path.name)]  # .sqlite3, -wal, -shm
    for needle in (secret.encode(), key.encode(), b"cd" * 32):
        assert [p.name for p in files if needle in p.read_bytes()] == []
    assert any(b"bob's own prompt" in p.read_bytes() for p in files)  # the scan can see what is there


async def test_every_connection_overwrites_deleted_rows(tmp_path: Path) -> None:
    # Many SQLite builds (Debian's among them) default to secure_delete on, others (python.org's) to
    # off: the database must not depend on which one it runs on.
    import aiosqlite

    from storage.db import _configure_connection

    async with aiosqlite.connect(tmp_path / "x.sqlite3") as connection:
        await connection.execute("PRAGMA secure_delete = OFF")
        await _configure_connection(connection)
        async with connection.execute("PRAGMA secure_delete") as cursor:
            assert tuple(await cursor.fetchone() or ()) == (1,)


async def test_job_ids_are_never_reused_after_an_erase(tmp_path: Path) -> None:
    # Queue job ids are derived from row ids: a reused id would be answered with an old result.
    async with Database.open(tmp_path / "db.sqlite3") as db:
        user = await db.get_or_create_user("console", "reuse")
        first = await db.create_job(user.id, "draw", "q", {})
        await db.erase_user(user.id)
        second = await db.create_job(user.id, "draw", "q", {})
        assert second.id > first.id


async def test_users_with_active_jobs_lists_only_queued_or_running(tmp_path: Path) -> None:
    async with Database.open(tmp_path / "db.sqlite3") as db:
        busy = await db.get_or_create_user("console", "busy")
        idle = await db.get_or_create_user("console", "idle")
        await db.create_job(busy.id, "train", "q", {})
        done = await db.create_job(idle.id, "draw", "q", {})
        await db.update_job(done.id, state="done")
        assert await db.users_with_active_jobs() == [busy.id]


async def test_an_image_can_be_read_back_and_deleted_alone(tmp_path: Path) -> None:
    async with Database.open(tmp_path / "db.sqlite3") as db:
        user = await db.get_or_create_user("console", "img")
        first = await db.add_image(user.id, None, "u1/images/a.png", "me", 1, 0.5)
        second = await db.add_image(user.id, None, "u1/images/a.png", "me", 2, None)
        assert await db.get_image(first.id) == first
        assert await db.count_images_with_blob(user.id, "u1/images/a.png") == 2
        await db.delete_image(first.id)
        assert await db.get_image(first.id) is None
        assert await db.get_image(second.id) == second
        assert await db.count_images_with_blob(user.id, "u1/images/a.png") == 1

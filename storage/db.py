"""The chat side's SQLite database: users, consent, photos, jobs, personal models, images.

`Database` is the only way in: callers use its typed async methods and get frozen dataclasses back;
no SQL lives outside this module and `storage.migrations`. The schema is built by versioned
migrations (`storage.migrations`) recorded in the `schema_version` table, so opening a database
brings it up to date and never applies a step twice. The rows come back as the dataclasses of
`storage.records`, re-exported here.

Only the chat side opens the database; workers are stateless and get ids and blob keys instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import aiosqlite

from storage.errors import (
    ConstraintViolation,
    InvalidValue,
    MigrationError,
    RecordNotFound,
    StorageError,
)
from storage.migrations import (
    MIGRATIONS,
    SCHEMA_VERSION_TABLE,
    Migration,
    check_migrations,
    split_statements,
)
from storage.records import (
    ACTIVE_JOB_STATES,
    APPARENT_GENDERS,
    ERASED_PREFIX,
    JOB_STATES,
    PHOTO_STATUSES,
    Erasure,
    GeneratedImage,
    Job,
    JobState,
    PersonalModel,
    Photo,
    PhotoStatus,
    User,
)

# The records and the migrations are re-exported: callers import them from here.
__all__ = [
    "ACTIVE_JOB_STATES",
    "BUSY_TIMEOUT_MS",
    "MIGRATIONS",
    "Clock",
    "Database",
    "Erasure",
    "GeneratedImage",
    "Job",
    "JobState",
    "Migration",
    "PersonalModel",
    "Photo",
    "PhotoStatus",
    "User",
]

_log = logging.getLogger(__name__)

Clock = Callable[[], float]

# How long a write waits for another process's write lock before failing with "database is locked".
BUSY_TIMEOUT_MS = 5000


def _columns(row_type: type[Any]) -> str:
    """The SELECT list for a row dataclass, so queries and dataclasses cannot drift apart."""
    return ", ".join(field.name for field in fields(row_type))


_USER = _columns(User)
_PHOTO = _columns(Photo)
_JOB = _columns(Job)
_MODEL = _columns(PersonalModel)
_IMAGE = _columns(GeneratedImage)


class Database:
    """Typed access to the chat side's SQLite database; open it with `Database.open`."""

    def __init__(self, connection: aiosqlite.Connection, clock: Clock = time.time) -> None:
        # Three connections to one file, each with its own aiosqlite thread:
        # - `_conn` runs the transactions of several statements (migrations, erasure), one at a
        #   time under `_lock`, because a coroutine's statements must not interleave with another's;
        # - `_statements` runs every other write: each is one statement, atomic by itself, sent
        #   without a lock, so aiosqlite runs them back to back;
        # - `_reader` runs reads, without a lock; it sees only committed data.
        # SQLite's own write lock orders the two writing connections (BEGIN IMMEDIATE takes it
        # up front; busy_timeout makes the other wait). Behind one asyncio lock every statement
        # had to wait for each coroutine ahead of it to be resumed by a busy event loop: 200
        # Telegram users agreeing at once waited seconds (bench/telegram_load.py).
        self._conn = connection
        self._clock = clock
        self._lock = asyncio.Lock()
        self._statements: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        path: Path | str,
        *,
        clock: Clock = time.time,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> AsyncIterator[Database]:
        """Open (creating if needed) and migrate the database; closes it on leaving the block."""
        db = await cls.connect(path, clock=clock, migrations=migrations)
        try:
            yield db
        finally:
            await db.close()

    @classmethod
    async def connect(
        cls,
        path: Path | str,
        *,
        clock: Clock = time.time,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> Database:
        """Open and migrate the database; the caller must `await db.close()`."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions, `_transaction` says where they are.
            connection = await aiosqlite.connect(path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(
                f"cannot open the database {path}: {exc}; check that the data folder "
                "exists and is writable"
            ) from exc
        db = cls(connection, clock)
        try:
            with _translate_errors():  # e.g. the file is not a database
                await db._configure()
                await db._migrate(migrations)
                db._statements = await _open_connection(path)
                db._reader = await _open_connection(path, read_only=True)
        except BaseException:
            await db.close()
            raise
        return db

    async def close(self) -> None:
        """Close the connections; the object is unusable afterwards."""
        for extra in (self._reader, self._statements):
            if extra is not None:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await extra.close()
        await self._conn.close()

    # -- users and consent ---------------------------------------------------------------------

    async def get_or_create_user(self, platform: str, platform_user_id: str) -> User:
        """The user with this platform identity, created on first sight."""
        _require_text("platform", platform)
        _require_text("platform_user_id", platform_user_id)
        known = await self._read_one(  # the common case, and a read: no write lock taken
            f"SELECT {_USER} FROM users WHERE platform = ? AND platform_user_id = ?",
            (platform, platform_user_id),
        )
        if known is not None:
            return User(**_fields(known))
        # One statement: a racing first message of the same user gets the same row back
        # (the no-op update makes RETURNING return it), never a second one.
        row = await self._write_one(
            "INSERT INTO users (platform, platform_user_id, created_at) VALUES (?, ?, ?)"
            " ON CONFLICT (platform, platform_user_id) DO UPDATE SET platform = excluded.platform"
            f" RETURNING {_USER}",
            (platform, platform_user_id, self._clock()),
        )
        return User(**_fields(_present(row)))

    async def get_user(self, user_id: int) -> User | None:
        """The user with this id, or None."""
        row = await self._read_one(f"SELECT {_USER} FROM users WHERE id = ?", (user_id,))
        return None if row is None else User(**_fields(row))

    async def record_consent(self, user_id: int, text_version: str) -> None:
        """Record that the user agreed to the consent text of this version (history is kept)."""
        _require_text("text_version", text_version)
        await self._write_one(
            "INSERT INTO consents (user_id, text_version, given_at) VALUES (?, ?, ?)",
            (user_id, text_version, self._clock()),
        )

    async def has_consent(self, user_id: int) -> bool:
        """Whether the user has given consent (and not erased their data since)."""
        row = await self._read_one("SELECT 1 FROM consents WHERE user_id = ? LIMIT 1", (user_id,))
        return row is not None

    # -- photos --------------------------------------------------------------------------------

    async def add_photo(
        self, user_id: int, blob_key: str, sha256: str, status: str = PhotoStatus.PENDING
    ) -> Photo:
        """Record an uploaded photo stored under `blob_key`."""
        _require_choice("photo status", status, PHOTO_STATUSES)
        now = self._clock()
        row = await self._write_one(
            "INSERT INTO photos (user_id, blob_key, sha256, status, created_at, updated_at)"
            f" VALUES (?, ?, ?, ?, ?, ?) RETURNING {_PHOTO}",
            (user_id, blob_key, sha256, status, now, now),
        )
        return Photo(**_fields(_present(row)))

    async def set_photo_result(
        self,
        photo_id: int,
        status: str,
        refusal: str | None = None,
        embedding_key: str | None = None,
        crop_key: str | None = None,
        apparent_gender: str | None = None,
    ) -> Photo:
        """Store the outcome of a face check; it replaces any earlier outcome entirely."""
        _require_choice("photo status", status, PHOTO_STATUSES)
        if apparent_gender is not None:
            _require_choice("apparent gender", apparent_gender, APPARENT_GENDERS)
        row = await self._write_one(
            "UPDATE photos SET status = ?, refusal = ?, embedding_key = ?, crop_key = ?,"
            f" apparent_gender = ?, updated_at = ? WHERE id = ? RETURNING {_PHOTO}",
            (status, refusal, embedding_key, crop_key, apparent_gender, self._clock(), photo_id),
        )
        if row is None:
            raise RecordNotFound(
                f"photo {photo_id} does not exist; it was deleted or erased with its user"
            )
        return Photo(**_fields(row))

    async def find_photo_by_sha(self, user_id: int, sha256: str) -> Photo | None:
        """The user's newest photo with this content hash (to answer re-sent photos at once)."""
        row = await self._read_one(
            f"SELECT {_PHOTO} FROM photos WHERE user_id = ? AND sha256 = ?"
            " ORDER BY id DESC LIMIT 1",
            (user_id, sha256),
        )
        return None if row is None else Photo(**_fields(row))

    async def list_photos(self, user_id: int, status: str | None = None) -> list[Photo]:
        """The user's photos, oldest first, optionally only those with `status`."""
        if status is None:
            rows = await self._read_all(
                f"SELECT {_PHOTO} FROM photos WHERE user_id = ? ORDER BY id", (user_id,)
            )
        else:
            _require_choice("photo status", status, PHOTO_STATUSES)
            rows = await self._read_all(
                f"SELECT {_PHOTO} FROM photos WHERE user_id = ? AND status = ? ORDER BY id",
                (user_id, status),
            )
        return [Photo(**_fields(row)) for row in rows]

    async def delete_photo(self, photo_id: int) -> None:
        """Delete the photo's row (not its blobs); deleting a missing photo is a no-op."""
        await self._write_one("DELETE FROM photos WHERE id = ?", (photo_id,))

    # -- jobs ----------------------------------------------------------------------------------

    async def create_job(
        self, user_id: int, kind: str, queue: str, payload: dict[str, Any]
    ) -> Job:
        """Record a new job in state "queued"; `payload` must be JSON-serializable."""
        _require_text("job kind", kind)
        _require_text("job queue", queue)
        encoded = _encode_json("job payload", payload)
        now = self._clock()
        row = await self._write_one(
            "INSERT INTO jobs (user_id, kind, queue, state, payload, created_at, updated_at)"
            f" VALUES (?, ?, ?, 'queued', ?, ?, ?) RETURNING {_JOB}",
            (user_id, kind, queue, encoded, now, now),
        )
        return _job(_present(row))

    async def update_job(
        self,
        job_id: int,
        *,
        state: str | None = None,
        progress: float | None = None,
        message: str | None = None,
        error: str | None = None,
        result: dict[str, Any] | None = None,
        attempts_delta: int = 0,
    ) -> Job:
        """Change the given fields (None leaves a field as it is); raises `RecordNotFound`."""
        changes = _job_changes(state, progress, message, error, result)
        if attempts_delta < 0:
            raise InvalidValue(f"attempts_delta must be 0 or more, not {attempts_delta}")
        assignments = [f"{column} = ?" for column in changes]
        assignments += ["attempts = attempts + ?", "updated_at = ?"]
        params = (*changes.values(), attempts_delta, self._clock(), job_id)
        row = await self._write_one(
            f"UPDATE jobs SET {', '.join(assignments)} WHERE id = ? RETURNING {_JOB}",
            params,
        )
        if row is None:
            raise RecordNotFound(
                f"job {job_id} does not exist; it may have been erased with its user"
            )
        return _job(row)

    async def get_job(self, job_id: int) -> Job | None:
        """The job with this id, or None."""
        row = await self._read_one(f"SELECT {_JOB} FROM jobs WHERE id = ?", (job_id,))
        return None if row is None else _job(row)

    async def list_jobs(self, user_id: int, states: Iterable[str] | None = None) -> list[Job]:
        """The user's jobs, oldest first, optionally only those in one of `states`."""
        if states is None:
            rows = await self._read_all(
                f"SELECT {_JOB} FROM jobs WHERE user_id = ? ORDER BY id", (user_id,)
            )
            return [_job(row) for row in rows]
        wanted = tuple(states)
        for state in wanted:
            _require_choice("job state", state, JOB_STATES)
        marks = ", ".join("?" * len(wanted))
        rows = await self._read_all(
            f"SELECT {_JOB} FROM jobs WHERE user_id = ? AND state IN ({marks}) ORDER BY id",
            (user_id, *wanted),
        )
        return [_job(row) for row in rows]

    async def active_job(self, user_id: int, kind: str) -> Job | None:
        """The user's newest queued or running job of this kind, or None."""
        row = await self._read_one(
            f"SELECT {_JOB} FROM jobs WHERE user_id = ? AND kind = ?"
            " AND state IN ('queued', 'running') ORDER BY id DESC LIMIT 1",
            (user_id, kind),
        )
        return None if row is None else _job(row)

    async def users_with_active_jobs(self) -> list[int]:
        """Ids of users with a queued or running job: what a restarted chat side must pick up."""
        rows = await self._read_all(
            "SELECT DISTINCT user_id FROM jobs WHERE state IN ('queued', 'running') ORDER BY user_id", ()
        )
        return [int(row[0]) for row in rows]

    # -- personal models and images ------------------------------------------------------------

    async def add_model(
        self,
        user_id: int,
        method: str,
        base_preset: str,
        blob_key: str,
        token: str,
        class_word: str,
        job_id: int | None,
    ) -> PersonalModel:
        """Record a trained model as the user's next version (1 for the first)."""
        _require_text("model method", method)
        # One statement computes and claims the version, so concurrent adds cannot collide.
        row = await self._write_one(
            "INSERT INTO models (user_id, method, version, base_preset, blob_key, token,"
            " class_word, job_id, created_at)"
            " SELECT ?, ?, COALESCE(MAX(version), 0) + 1, ?, ?, ?, ?, ?, ?"
            f" FROM models WHERE user_id = ? RETURNING {_MODEL}",
            (user_id, method, base_preset, blob_key, token, class_word, job_id,
             self._clock(), user_id),
        )
        return PersonalModel(**_fields(_present(row)))

    async def finish_training(
        self,
        job_id: int,
        method: str,
        base_preset: str,
        blob_key: str,
        token: str,
        class_word: str,
        result: dict[str, Any],
    ) -> PersonalModel:
        """Record the model a training job made and mark the job done, in one transaction; a second
        call for the same job returns the model the first recorded (a retried write adds nothing)."""
        _require_text("model method", method)
        encoded = _encode_json("job result", result)
        now = self._clock()
        async with self._write() as conn:
            job = await _fetch_one(conn, "SELECT user_id FROM jobs WHERE id = ?", (job_id,))
            if job is None:
                raise RecordNotFound(f"job {job_id} does not exist; it may have been erased with its user")
            row = await _fetch_one(conn, f"SELECT {_MODEL} FROM models WHERE job_id = ?", (job_id,))
            if row is None:
                row = await _fetch_one(
                    conn,
                    "INSERT INTO models (user_id, method, version, base_preset, blob_key, token,"
                    " class_word, job_id, created_at)"
                    " SELECT ?, ?, COALESCE(MAX(version), 0) + 1, ?, ?, ?, ?, ?, ?"
                    f" FROM models WHERE user_id = ? RETURNING {_MODEL}",
                    (job[0], method, base_preset, blob_key, token, class_word, job_id, now, job[0]),
                )
            await conn.execute(
                "UPDATE jobs SET state = 'done', progress = 1, result = ?, updated_at = ? WHERE id = ?",
                (encoded, now, job_id),
            )
        return PersonalModel(**_fields(_present(row)))

    async def latest_model(self, user_id: int) -> PersonalModel | None:
        """The user's highest-version model, or None."""
        row = await self._read_one(
            f"SELECT {_MODEL} FROM models WHERE user_id = ? ORDER BY version DESC LIMIT 1",
            (user_id,),
        )
        return None if row is None else PersonalModel(**_fields(row))

    async def list_models(self, user_id: int) -> list[PersonalModel]:
        """The user's models, oldest version first."""
        rows = await self._read_all(
            f"SELECT {_MODEL} FROM models WHERE user_id = ? ORDER BY version", (user_id,)
        )
        return [PersonalModel(**_fields(row)) for row in rows]

    async def add_image(
        self,
        user_id: int,
        job_id: int | None,
        blob_key: str,
        prompt: str,
        seed: int,
        score: float | None,
        model_id: int | None = None,
    ) -> GeneratedImage:
        """Record a generated image; `model_id` is None for zero-shot (InstantID) images."""
        row = await self._write_one(
            "INSERT INTO images (user_id, job_id, model_id, blob_key, prompt, seed, score,"
            f" created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING {_IMAGE}",
            (user_id, job_id, model_id, blob_key, prompt, seed, score, self._clock()),
        )
        return GeneratedImage(**_fields(_present(row)))

    async def finish_images(
        self,
        job_id: int,
        images: Sequence[tuple[str, float | None]],
        prompt: str,
        seed: int,
        result: dict[str, Any],
        model_id: int | None = None,
    ) -> list[GeneratedImage]:
        """Record a job's images (blob key and score, best first) and mark the job done, in one
        transaction, so a job is never done without its images nor has images while still active.
        A second call for the same job returns the images the first recorded (nothing is added)."""
        encoded = _encode_json("job result", result)
        now = self._clock()
        async with self._write() as conn:
            job = await _fetch_one(conn, "SELECT user_id FROM jobs WHERE id = ?", (job_id,))
            if job is None:
                raise RecordNotFound(f"job {job_id} does not exist; it may have been erased with its user")
            rows = list(await conn.execute_fetchall(
                f"SELECT {_IMAGE} FROM images WHERE job_id = ? ORDER BY id", (job_id,)
            ))
            if not rows:
                for blob_key, score in images:
                    row = await _fetch_one(
                        conn,
                        "INSERT INTO images (user_id, job_id, model_id, blob_key, prompt, seed, score,"
                        f" created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING {_IMAGE}",
                        (job[0], job_id, model_id, blob_key, prompt, seed, score, now),
                    )
                    rows.append(_present(row))
            await conn.execute(
                "UPDATE jobs SET state = 'done', progress = 1, result = ?, updated_at = ? WHERE id = ?",
                (encoded, now, job_id),
            )
        return [GeneratedImage(**_fields(row)) for row in rows]

    async def images_of_job(self, job_id: int) -> list[GeneratedImage]:
        """The images a job made, in the order they were recorded (best first)."""
        rows = await self._read_all(f"SELECT {_IMAGE} FROM images WHERE job_id = ? ORDER BY id", (job_id,))
        return [GeneratedImage(**_fields(row)) for row in rows]

    async def get_image(self, image_id: int) -> GeneratedImage | None:
        """One generated image by id, or None."""
        row = await self._read_one(f"SELECT {_IMAGE} FROM images WHERE id = ?", (image_id,))
        return None if row is None else GeneratedImage(**_fields(row))

    async def delete_image(self, image_id: int) -> None:
        """Remove one image row (its blob is the caller's to delete). A missing id does nothing."""
        await self._write_one("DELETE FROM images WHERE id = ?", (image_id,))

    async def count_enrolled_users(self) -> int:
        """How many users have an accepted photo or a personal model (for the operator's metrics)."""
        row = await self._read_one(
            "SELECT COUNT(*) FROM users u WHERE EXISTS (SELECT 1 FROM photos p WHERE p.user_id = u.id"
            " AND p.status = 'accepted') OR EXISTS (SELECT 1 FROM models m WHERE m.user_id = u.id)", (),
        )
        return int(_present(row)[0])

    async def count_images_with_blob(self, user_id: int, blob_key: str) -> int:
        """How many of the user's image rows point at ``blob_key`` (equal images share one blob)."""
        row = await self._read_one(
            "SELECT COUNT(*) FROM images WHERE user_id = ? AND blob_key = ?", (user_id, blob_key)
        )
        return int(_present(row)[0])

    async def count_images_since(self, user_id: int, since: float) -> int:
        """How many images the user got at or after `since` (Unix seconds), for quotas."""
        row = await self._read_one(
            "SELECT COUNT(*) FROM images WHERE user_id = ? AND created_at >= ?", (user_id, since)
        )
        return int(_present(row)[0])

    async def count_reserved_images(self, user_id: int, since: float, kinds: Sequence[str]) -> int:
        """Images that the user's unfinished jobs of ``kinds`` (created at or after ``since``) will
        make: their payloads' ``request.keep`` (best-of-N keeps that many), else ``request.num_images``. Quotas count them with the images already made,
        so that requests sent at once cannot all pass the check before any image exists."""
        if not kinds:
            return 0
        marks = ", ".join("?" for _ in kinds)
        row = await self._read_one(
            "SELECT COALESCE(SUM(COALESCE(json_extract(payload, '$.request.keep'),"
            " json_extract(payload, '$.request.num_images'), 1)), 0) FROM jobs"
            f" WHERE user_id = ? AND created_at >= ? AND state IN ('queued', 'running') AND kind IN ({marks})",
            (user_id, since, *kinds),
        )
        return int(_present(row)[0])

    # -- inbox: platform events received, not yet handled ---------------------------------------

    async def put_inbound(self, platform: str, event_key: str, payload: dict[str, Any]) -> None:
        """Keep one received event until `drop_inbound`; the same key twice keeps the first."""
        _require_text("platform", platform)
        _require_text("event_key", event_key)
        await self._write_one(
            "INSERT INTO inbox (platform, event_key, payload, received_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (platform, event_key) DO NOTHING",
            (platform, event_key, _encode_json("inbound event", payload), self._clock()),
        )

    async def pending_inbound(self, platform: str) -> list[tuple[str, dict[str, Any]]]:
        """The platform's kept events as (key, payload), oldest first."""
        rows = await self._read_all(
            "SELECT event_key, payload FROM inbox WHERE platform = ? ORDER BY id", (platform,)
        )
        return [(str(row["event_key"]), json.loads(row["payload"])) for row in rows]

    async def drop_inbound(self, platform: str, event_key: str) -> None:
        """The event was handled; a missing key does nothing."""
        await self._write_one(
            "DELETE FROM inbox WHERE platform = ? AND event_key = ?", (platform, event_key)
        )

    # -- erasure -------------------------------------------------------------------------------

    async def erase_user(self, user_id: int, job_ids: Sequence[str] = ()) -> Erasure:
        """Delete all of the user's rows and their platform id, in one transaction, and record the
        erasure as pending (`Erasure`): the caller removes blobs and queue entries (``job_ids``),
        then calls `erasure_done`, which drops the last of the identity.

        The user row stays as a tombstone without the identity (``platform_user_id`` becomes
        ``erased:<id>``): writes of work still in flight for the id keep a row to refer to, and the
        returning person gets a new row, a new id (AUTOINCREMENT never reuses one) and so a new blob
        folder. Blobs are not touched here: the caller removes them with `BlobStore.delete_owner`.
        """
        now = self._clock()
        async with self._write() as conn:
            user = await _fetch_one(conn, "SELECT platform, platform_user_id FROM users WHERE id = ?", (user_id,))
            if user is None:
                raise RecordNotFound(f"user {user_id} does not exist")
            # Children first, although SET NULL references would cope with any order.
            for table in ("images", "models", "jobs", "photos", "consents"):
                await conn.execute(f"DELETE FROM {table} WHERE user_id = ?", (user_id,))
            await conn.execute(
                "UPDATE users SET platform_user_id = ? WHERE id = ?", (f"{ERASED_PREFIX}{user_id}", user_id)
            )
            pending = await _fetch_one(conn, "SELECT job_ids FROM erasures WHERE user_id = ?", (user_id,))
            identity = (str(user[0]), str(user[1]))
            if pending is not None:  # erased again before the first finished: one erasure, all jobs
                job_ids = sorted({*json.loads(pending[0]), *job_ids})
            if not identity[1].startswith(ERASED_PREFIX):
                await conn.execute(
                    "INSERT INTO erasures (user_id, platform, platform_user_id, job_ids, requested_at)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET job_ids = excluded.job_ids",
                    (user_id, *identity, json.dumps(list(job_ids)), now),
                )
            else:
                await conn.execute(
                    "UPDATE erasures SET job_ids = ? WHERE user_id = ?", (json.dumps(list(job_ids)), user_id)
                )
        # secure_delete (every connection) zeroed the freed space; the WAL still holds the pages as
        # they were before the delete until a checkpoint copies the new ones back and empties it.
        await self.checkpoint_wal()
        _log.info("erased all rows of user %d", user_id)
        erasure = await self.pending_erasure(user_id)
        assert erasure is not None
        return erasure

    async def pending_erasure(self, user_id: int) -> Erasure | None:
        row = await self._read_one(f"SELECT {_ERASURE} FROM erasures WHERE user_id = ?", (user_id,))
        return None if row is None else _erasure(row)

    async def pending_erasures(self) -> list[Erasure]:
        """Erasures not yet done, oldest first."""
        rows = await self._read_all(f"SELECT {_ERASURE} FROM erasures ORDER BY requested_at", ())
        return [_erasure(row) for row in rows]

    async def erasure_pending_for(self, platform: str, platform_user_id: str) -> bool:
        """Whether this person's /forget is still being completed."""
        row = await self._read_one(
            "SELECT 1 FROM erasures WHERE platform = ? AND platform_user_id = ?", (platform, platform_user_id)
        )
        return row is not None

    async def erasure_done(self, user_id: int) -> None:
        """The erasure's files and queue entries are gone: drop its row (and with it the identity)."""
        await self._write_one("DELETE FROM erasures WHERE user_id = ?", (user_id,))
        await self.checkpoint_wal()

    async def checkpoint_wal(self) -> None:
        """Copy the WAL into the database file and truncate it (what erasure needs to be complete)."""
        row = await self._write_one("PRAGMA wal_checkpoint(TRUNCATE)", ())  # autocommit: never mid-transaction
        if row is not None and int(row[0]) != 0:  # busy: a reader holds an old snapshot
            _log.warning("the WAL checkpoint after an erasure was blocked; it completes on the next one")

    # -- plumbing ------------------------------------------------------------------------------

    async def _configure(self) -> None:
        await _configure_connection(self._conn)
        row = await _fetch_one(self._conn, "PRAGMA journal_mode = WAL", ())
        if row is None or str(row[0]).lower() != "wal":
            _log.warning("SQLite refused WAL mode (got %r); concurrent access will be slower", row)

    async def _migrate(self, migrations: Sequence[Migration]) -> None:
        check_migrations(migrations)
        await self._conn.execute(SCHEMA_VERSION_TABLE)
        current = await self._schema_version()
        newest = migrations[-1][0] if migrations else 0
        if current > newest:
            raise MigrationError(
                f"the database is at schema version {current}, newer than this AvatarBooth "
                f"knows ({newest}); upgrade AvatarBooth or point it at another data folder"
            )
        for version, sql in migrations:
            if version > current:
                await self._apply_migration(version, sql)

    async def _apply_migration(self, version: int, sql: str) -> None:
        try:
            async with self._transaction():
                # Another process may have applied it while this one waited for the lock.
                if await self._schema_version() >= version:
                    return
                for statement in split_statements(sql):
                    await self._conn.execute(statement)
                await self._conn.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (version, self._clock()),
                )
        except sqlite3.Error as exc:
            raise MigrationError(
                f"database migration {version} failed and was rolled back: {exc}; "
                "restore the database from a backup or report this as a bug"
            ) from exc
        _log.info("applied database migration %d", version)

    async def _schema_version(self) -> int:
        row = await _fetch_one(self._conn, "SELECT MAX(version) FROM schema_version", ())
        return 0 if row is None or row[0] is None else int(row[0])

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        """Hold the lock and an IMMEDIATE transaction (the write lock is taken up front)."""
        async with self._lock:
            try:
                await self._conn.execute("BEGIN IMMEDIATE")
                yield
                await self._conn.execute("COMMIT")
            except BaseException:
                # Unconditional: after a cancellation BEGIN may still run on aiosqlite's thread,
                # and a ROLLBACK queued behind it is the only way to be sure it is undone.
                with contextlib.suppress(sqlite3.Error):
                    await self._conn.execute("ROLLBACK")
                raise

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        with _translate_errors():
            async with self._transaction():
                yield self._conn

    async def _write_one(self, sql: str, params: Sequence[Any]) -> sqlite3.Row | None:
        """One statement on its own, atomic by itself in autocommit mode: one trip to
        aiosqlite's thread, no lock. Returns its first row (for RETURNING), if any."""
        with _translate_errors():
            rows = await _require(self._statements).execute_fetchall(sql, params)
        return next(iter(rows), None)

    async def _read_one(self, sql: str, params: Sequence[Any]) -> sqlite3.Row | None:
        rows = await self._read_all(sql, params)
        return rows[0] if rows else None

    async def _read_all(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        # execute_fetchall: one trip to aiosqlite's thread (execute, fetch and close would be three).
        with _translate_errors():
            return list(await _require(self._reader).execute_fetchall(sql, params))


async def _open_connection(path: Path, *, read_only: bool = False) -> aiosqlite.Connection:
    """Another connection to the database file (WAL mode is a property of the file)."""
    connection = await aiosqlite.connect(path, isolation_level=None)
    try:
        await _configure_connection(connection)
        if read_only:  # a reader can then never take a lock the writers would wait for
            await connection.execute("PRAGMA query_only = ON")
    except BaseException:
        await connection.close()
        raise
    return connection


async def _configure_connection(connection: aiosqlite.Connection) -> None:
    """What every connection needs: rows by name, waiting for locks, enforced references."""
    connection.row_factory = aiosqlite.Row
    await connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    await connection.execute("PRAGMA foreign_keys = ON")
    # Deleted rows are overwritten with zeros, not left in free pages: /forget must leave no trace.
    await connection.execute("PRAGMA secure_delete = ON")
    # Per connection, like the two above. NORMAL is durable across application crashes in WAL
    # mode and much faster than FULL (no fsync per commit).
    await connection.execute("PRAGMA synchronous = NORMAL")


def _require(connection: aiosqlite.Connection | None) -> aiosqlite.Connection:
    if connection is None:
        raise StorageError("the database is still opening or already closed; open it with Database.open")
    return connection


async def _fetch_one(
    conn: aiosqlite.Connection, sql: str, params: Sequence[Any]
) -> sqlite3.Row | None:
    async with conn.execute(sql, params) as cursor:
        row: sqlite3.Row | None = await cursor.fetchone()
        return row


@contextlib.contextmanager
def _translate_errors() -> Iterator[None]:
    """Turn sqlite3 errors into StorageErrors, keeping the original as the cause."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        raise ConstraintViolation(
            f"the database refused the change ({exc}); check that the user, job or model "
            "it refers to exists"
        ) from exc
    except sqlite3.Error as exc:
        raise StorageError(
            f"database error: {exc}; check that the data folder is writable and has free space"
        ) from exc


def _fields(row: sqlite3.Row) -> dict[str, Any]:
    return {name: row[name] for name in row.keys()}


def _present(row: sqlite3.Row | None) -> sqlite3.Row:
    """For queries that always return a row (INSERT ... RETURNING, COUNT)."""
    if row is None:
        raise StorageError("the database returned no row where one was expected; report this bug")
    return row


_ERASURE = "user_id, platform, platform_user_id, job_ids, requested_at"


def _erasure(row: sqlite3.Row) -> Erasure:
    fields = _fields(row)
    fields["job_ids"] = [str(j) for j in json.loads(fields["job_ids"])]
    return Erasure(**fields)


def _job(row: sqlite3.Row) -> Job:
    values = _fields(row)
    for column in ("payload", "result"):
        if values[column] is not None:
            values[column] = json.loads(values[column])
    return Job(**values)


def _job_changes(
    state: str | None,
    progress: float | None,
    message: str | None,
    error: str | None,
    result: dict[str, Any] | None,
) -> dict[str, Any]:
    """Validate update_job's arguments and map the given ones to column values."""
    changes: dict[str, Any] = {}
    if state is not None:
        changes["state"] = _require_choice("job state", state, JOB_STATES)
    if progress is not None:
        if not isinstance(progress, (int, float)) or math.isnan(progress) or not 0 <= progress <= 1:
            raise InvalidValue(f"job progress must be between 0 and 1, not {progress!r}")
        changes["progress"] = float(progress)
    if message is not None:
        changes["message"] = message
    if error is not None:
        changes["error"] = error
    if result is not None:
        changes["result"] = _encode_json("job result", result)
    return changes


def _encode_json(what: str, value: dict[str, Any]) -> str:
    if not isinstance(value, dict):
        raise InvalidValue(f"{what} must be a dict, not {type(value).__name__}")
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidValue(f"{what} is not JSON-serializable: {exc}") from exc


def _require_choice(what: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise InvalidValue(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _require_text(what: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidValue(f"{what} must be a non-empty string, got {value!r}")

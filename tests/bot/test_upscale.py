"""The upscale button's refusals (bot.upscale through BotService), each before any job is created:
someone else's image, an image enlarged as often as allowed, and the hourly quota. No worker runs:
nothing may be drawn. The upscales themselves run end to end in test_telegram, test_discord and
test_console."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot import texts
from bot.errors import NotYourImage, RateLimited, UpscaleLimit
from bot.jobs import JobClient
from bot.service import BotService, UserRef
from bot.settings import BotSettings
from bot.upscale import MAX_UPSCALES
from engine.api import QUEUE_INTERACTIVE
from storage.blobs import LocalBlobStore, owner_for
from storage.db import Database, GeneratedImage
from tests.bot.test_service import FakeClock, make_service

ALICE = UserRef("console", "alice")
MALLORY = UserRef("console", "mallory")


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    async with Database.open(tmp_path / "db.sqlite3", clock=FakeClock()) as database:
        yield database


@pytest.fixture
async def jobs(valkey_url: str) -> AsyncIterator[JobClient]:
    async with await JobClient.connect(valkey_url, poll_delay=0.02) as client:
        yield client


@pytest.fixture
def service(db: Database, jobs: JobClient, tmp_path: Path) -> BotService:
    return make_service(db, LocalBlobStore(tmp_path / "blobs"), jobs, FakeClock())


async def user_id(db: Database, user: UserRef) -> int:
    return (await db.get_or_create_user(user.platform, user.platform_user_id)).id


async def drawn_image(db: Database, user: UserRef, *, upscales: int | None = None) -> GeneratedImage:
    """An image row of ``user``'s, made by a finished draw (an upscale's when ``upscales`` is given)."""
    uid = await user_id(db, user)
    meta = {"prompt": "me"} | ({} if upscales is None else {"upscales": upscales})
    job = await db.create_job(uid, "draw", QUEUE_INTERACTIVE, {"request": {"aspect": "1:1"}, "meta": meta})
    await db.update_job(job.id, state="done")
    return await db.add_image(uid, job.id, f"{owner_for(uid)}/images/{job.id:064x}.png", "me", 1, None)


async def test_someone_elses_image_or_none_is_refused_before_any_job(service: BotService, db: Database) -> None:
    await service.agree(ALICE)
    theirs = await drawn_image(db, MALLORY)
    jobs_before = await db.list_jobs(await user_id(db, MALLORY))

    for image_id in (theirs.id, theirs.id + 1000):
        with pytest.raises(NotYourImage) as refused:
            await service.upscale(ALICE, image_id)
        assert refused.value.user_message == texts.NOT_YOUR_IMAGE

    assert await db.list_jobs(await user_id(db, ALICE)) == []
    assert await db.list_jobs(await user_id(db, MALLORY)) == jobs_before


async def test_an_image_upscaled_as_often_as_allowed_is_refused_saying_what_to_do(
    service: BotService, db: Database
) -> None:
    await service.agree(ALICE)
    largest = await drawn_image(db, ALICE, upscales=MAX_UPSCALES)
    jobs_before = await db.list_jobs(await user_id(db, ALICE))

    with pytest.raises(UpscaleLimit) as refused:
        await service.upscale(ALICE, largest.id)

    assert refused.value.user_message == texts.UPSCALE_LIMIT.format(factor=4)
    assert "4×" in refused.value.user_message and "press 2× upscale under" in refused.value.user_message
    assert await db.list_jobs(await user_id(db, ALICE)) == jobs_before


async def test_an_upscale_counts_against_the_hourly_image_quota(
    db: Database, jobs: JobClient, tmp_path: Path
) -> None:
    settings = BotSettings(interactive_timeout_s=30, draws_per_hour=1)
    service = BotService(db, LocalBlobStore(tmp_path / "blobs"), jobs, settings, preset_name="tiny", clock=FakeClock())
    await service.agree(ALICE)
    image = await drawn_image(db, ALICE)  # the hour's one image
    jobs_before = await db.list_jobs(await user_id(db, ALICE))

    with pytest.raises(RateLimited):
        await service.upscale(ALICE, image.id)
    assert await db.list_jobs(await user_id(db, ALICE)) == jobs_before

"""Avatar packs (/pack): the packs file, and packs made through the real service and worker on the
tiny preset, including one interrupted by a restart and finished by the next service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot import texts
from bot.errors import PackNeedsModel, RateLimited, UnknownPack
from bot.jobs import JobClient
from bot.packs import PACKS_FILE, PackFileError, find_pack, load_packs
from bot.service import BotService
from bot.settings import BotSettings
from storage.blobs import LocalBlobStore
from storage.db import Database
from tests.bot.test_service import ALICE, consented, enrol
from tests.support import running_worker

# --- the packs file ----------------------------------------------------------------------------------


def test_the_shipped_packs_are_valid_and_each_makes_at_least_eight_images() -> None:
    packs = load_packs(PACKS_FILE)
    assert len(packs) >= 3
    for pack in packs.values():
        assert pack.count >= 8 and pack.prompts and pack.title
        subjects = {pack.prompt_for(index).subject() for index in range(pack.count)}
        assert len(subjects) == min(pack.count, len(pack.prompts))  # every prompt is used in turn


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('[x]\ncount = 8\nprompts = [{ prompt = "me", style = "nope" }]', "unknown style 'nope'"),
        ('[x]\ncount = 8\naspect = "5:4"\nprompts = [{ prompt = "me" }]', "aspect '5:4' is not one of"),
        ("[x]\ncount = 8\nprompts = []", "prompts must be a list"),
        ('[x]\ncount = 0\nprompts = [{ prompt = "me" }]', "count must be a whole number from 1 to 40"),
        ('[x]\ncount = 8\nprompts = [{ prompt = "  " }]', "needs a prompt"),
        ('[x]\ncount = 8\ncolour = "red"\nprompts = [{ prompt = "me" }]', "unknown keys ['colour']"),
        ('["Big Pack"]\ncount = 8\nprompts = [{ prompt = "me" }]', "one lower-case word"),
        ("[x\n", "is not valid TOML"),
        ("", "defines no pack"),
    ],
)
def test_a_packs_file_that_cannot_work_is_refused_with_what_to_fix(tmp_path: Path, content: str, says: str) -> None:
    path = tmp_path / "packs.toml"
    path.write_text(content)
    with pytest.raises(PackFileError) as refused:
        load_packs(path)
    assert says in str(refused.value)
    assert str(path) in str(refused.value)


def test_an_unknown_pack_name_lists_the_packs() -> None:
    packs = load_packs()
    assert find_pack(packs, "  Portraits ").name == "portraits"
    with pytest.raises(UnknownPack) as unknown:
        find_pack(packs, "wedding")
    assert unknown.value.user_message == texts.UNKNOWN_PACK.format(name="wedding", names=", ".join(packs))


# --- packs made ----------------------------------------------------------------------------------------


@pytest.fixture
async def stack(tmp_path: Path, valkey_url: str, tiny_preset_dir: Path) -> AsyncIterator[tuple[BotService, Database]]:
    blobs_dir = tmp_path / "blobs"
    settings = BotSettings(interactive_timeout_s=30, training_timeout_s=60, draws_per_hour=12)
    async with (
        Database.open(tmp_path / "db.sqlite3") as db,
        await JobClient.connect(valkey_url, poll_delay=0.02) as jobs,
        running_worker(valkey_url, blobs_dir, tiny_preset_dir.parent),
    ):
        yield BotService(db, LocalBlobStore(blobs_dir), jobs, settings, preset_name="tiny"), db


def service_like(service: BotService, db: Database) -> BotService:
    """A second service over the same database, blobs and queue: the chat side after a restart."""
    return BotService(
        db, service._blobs, service._jobs, service.settings, preset_name="tiny"  # noqa: SLF001
    )


@pytest.mark.slow
async def test_a_pack_renders_each_image_best_of_n_with_its_score_in_one_progress_stream(
    stack: tuple[BotService, Database],
) -> None:
    service, db = stack
    user_id = await consented(service, db)
    await enrol(service, 3)
    with pytest.raises(PackNeedsModel):
        await service.pack(ALICE, "portraits")
    listed = await service.pack(ALICE, None)
    assert listed.text.splitlines()[1].startswith("  portraits: Portraits, 8 images.")
    await service.train(ALICE, None)

    progress: list[str] = []

    async def on_progress(line: str) -> None:
        progress.append(line)

    pack = find_pack(service.packs, "portraits")
    reply = await service.pack(ALICE, "portraits", on_progress=on_progress)

    assert len(reply.images) == pack.count == 8 and reply.album
    lines = reply.text.splitlines()
    assert lines[0] == texts.PACK_DONE.format(title="Portraits", count=8, method="lora", version=1, best_of=2)
    for index, (line, image) in enumerate(zip(lines[1:9], reply.images, strict=True), start=1):
        # Each line names the image's score (the tiny preset's noise has no face: "no face found").
        assert line == texts.pack_image_line(index, pack.prompt_for(index - 1).subject(), image.score)
    assert all(image.path.is_file() for image in reply.images)
    # One job per image, each rendering 2 and keeping the best; jobs ran one after another.
    draws = [job for job in await db.list_jobs(user_id) if job.kind == "draw"]
    assert len(draws) == 8
    assert all(job.payload and job.payload["request"]["num_images"] == 2 and job.payload["request"]["keep"] == 1
               for job in draws)
    assert all(job.result and len(job.result["image_keys"]) == 1 for job in draws)
    heads = [line.split(";")[0].rstrip(".") for line in progress]  # the pack's, then the image's own
    assert list(dict.fromkeys(heads)) == [f"Pack Portraits: {n} of 8 images done" for n in range(8)]
    # The pack counts against the hourly quota as the images it delivers: 8 of 12 used, 4 left.
    assert await db.count_images_since(user_id, 0) == 8
    with pytest.raises(RateLimited):
        await service.pack(ALICE, "headshots")
    assert len([job for job in await db.list_jobs(user_id) if job.kind == "draw"]) == 8  # refused before any row


@pytest.mark.slow
async def test_a_pack_cut_off_by_a_restart_is_finished_without_making_an_image_twice(
    stack: tuple[BotService, Database],
) -> None:
    service, db = stack
    user_id = await consented(service, db)
    await enrol(service, 3)
    await service.train(ALICE, None)

    making = asyncio.create_task(service.pack(ALICE, "fantasy"))
    async with asyncio.timeout(60):
        while await db.count_images_since(user_id, 0) < 3:
            await asyncio.sleep(0.02)
    making.cancel()  # the chat side stops here; the rows stay
    with pytest.raises(asyncio.CancelledError):
        await making
    before = {image.id for job in await db.list_jobs(user_id) for image in await db.images_of_job(job.id)}
    assert 3 <= len(before) < 8

    resumed = await service_like(service, db).resume_pending(ALICE)

    assert resumed is not None and resumed.album
    assert len(resumed.images) == 8
    assert before <= {image.image_id for image in resumed.images}  # the first ones read back, not redrawn
    assert await db.count_images_since(user_id, 0) == 8
    draws = [job for job in await db.list_jobs(user_id) if job.kind == "draw"]
    assert len(draws) == 8 and all(job.state == "done" for job in draws)
    assert texts.PACK_RESUMED_NOTE.format(done=len(before)) in resumed.text

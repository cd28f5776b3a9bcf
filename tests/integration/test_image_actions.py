"""The actions behind the result buttons (reroll, more like this, delete, full resolution), through the
real service, database, blob store, queue and worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bot.errors import NotYourImage
from bot.jobs import JobClient
from bot.service import BotService, Upload, UserRef
from bot.settings import BotSettings
from storage.blobs import LocalBlobStore
from storage.db import Database
from tests.support import face_photo, running_worker

pytestmark = pytest.mark.slow
ALICE = UserRef(platform="test", platform_user_id="alice")
MALLORY = UserRef(platform="test", platform_user_id="mallory")


@dataclass
class Stack:
    service: BotService
    db: Database
    blobs: LocalBlobStore


@pytest.fixture
async def stack(tmp_path: Path, valkey_url: str, tiny_preset_dir: Path) -> AsyncIterator[Stack]:
    blobs = LocalBlobStore(tmp_path / "blobs")
    async with (
        running_worker(valkey_url, blobs.root, tiny_preset_dir.parent),
        Database.open(tmp_path / "db.sqlite3") as db,
        await JobClient.connect(valkey_url) as jobs,
    ):
        service = BotService(db, blobs, jobs, BotSettings(), preset_name="tiny")
        yield Stack(service, db, blobs)


async def enrolled(stack: Stack, user: UserRef) -> None:
    await stack.service.agree(user)
    uploads = [Upload(filename=f"selfie-{n}.jpg", data=face_photo(n)) for n in range(3)]
    reply = await stack.service.add_photos(user, uploads)
    assert reply.text.count("accepted") >= 3, reply.text


async def test_reroll_and_more_like_this_make_new_images_of_the_same_prompt(stack: Stack) -> None:
    await enrolled(stack, ALICE)
    first = await stack.service.draw(ALICE, "me in a garden")
    original = first.images[0]

    rerolled = await stack.service.reroll(ALICE, original.image_id)
    varied = await stack.service.more_like(ALICE, original.image_id)

    new_ids = {i.image_id for i in rerolled.images + varied.images}
    assert len(new_ids) == len(rerolled.images) + len(varied.images)
    assert original.image_id not in new_ids
    for out in rerolled.images + varied.images:
        image = await stack.db.get_image(out.image_id)
        assert image is not None and image.prompt == "me in a garden"
    # "More like this" starts from the chosen image (engine/test_render checks what that does to
    # the pixels); a reroll starts from noise with a new seed.
    original_row = await stack.db.get_image(original.image_id)
    assert original_row is not None
    requests = [job.payload["request"] for job in await stack.db.list_jobs(1) if job.kind == "draw" and job.payload]
    assert [r.get("variation_of") for r in requests] == [None, None, original_row.blob_key]
    assert len({r["seed"] for r in requests}) == 3


async def test_only_the_requester_can_use_an_image(stack: Stack) -> None:
    await enrolled(stack, ALICE)
    await enrolled(stack, MALLORY)
    image_id = (await stack.service.draw(ALICE, "me at the beach")).images[0].image_id
    for action in (stack.service.reroll, stack.service.more_like, stack.service.delete_image):
        with pytest.raises(NotYourImage):
            await action(MALLORY, image_id)
    with pytest.raises(NotYourImage):
        await stack.service.image_file(MALLORY, image_id)
    assert await stack.db.get_image(image_id) is not None  # untouched


async def test_delete_removes_the_row_and_the_file(stack: Stack) -> None:
    await enrolled(stack, ALICE)
    out = (await stack.service.draw(ALICE, "me on a mountain")).images[0]
    path = await stack.service.image_file(ALICE, out.image_id)
    assert path.is_file() and path == out.path

    await stack.service.delete_image(ALICE, out.image_id)

    assert await stack.db.get_image(out.image_id) is None
    assert not path.exists()
    with pytest.raises(NotYourImage):
        await stack.service.image_file(ALICE, out.image_id)


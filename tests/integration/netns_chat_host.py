"""The chat host of the two-host test (`test_netns.py`): ``python -m tests.integration.netns_chat_host CONFIG``,
run inside that test's chat namespace, beside its Valkey and S3 server.

It serves the chat side as `avatarbooth run` composes it (``serve_chat`` without a worker of its
own, metrics on), walks the journey through the service, and tells the test what happened as one
JSON object per line on stdout: ``up``; ``alice`` (Alice's enrol → preview → train → draw, all
run by the first worker host); ``checkpointed`` (Bob's training has stored a checkpoint: the test's
cue to kill that host); ``bob`` (his model came, and a drawing from it). Then it keeps serving,
for the test to scrape its metrics, until stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from avatarbooth.config import load_config
from avatarbooth.runtime import Running, serve_chat
from bot.service import Upload, UserRef
from engine.api import arq_job_id
from engine.train.checkpoints import CHECKPOINT_KIND
from storage.blobs import BlobStore, open_blob_store, owner_for
from tests.support import face_photo

ALICE = UserRef("console", "alice")
BOB = UserRef("console", "bob")


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def enrol(running: Running, user: UserRef, first_variant: int) -> int:
    await running.service.agree(user)
    photos = [Upload(f"selfie-{n}.jpg", face_photo(first_variant + n)) for n in range(3)]
    return (await running.service.add_photos(user, photos)).text.count(": accepted")


async def checkpointed(running: Running, bucket: BlobStore, user: UserRef) -> bool:
    """Whether the user's training job has stored a checkpoint (its pointer, in the bucket)."""
    account = await running.database.get_or_create_user(user.platform, user.platform_user_id)
    jobs = [job for job in await running.database.list_jobs(account.id) if job.kind == "train"]
    if not jobs:
        return False
    pointer = arq_job_id("train", jobs[-1].id)
    return await asyncio.to_thread(bucket.get_ref, owner_for(account.id), CHECKPOINT_KIND, pointer) is not None


async def journey(config_path: Path) -> None:
    config = load_config(config_path)
    async with serve_chat(config, start_worker=False, serve_metrics=True, status=sys.stderr) as running:
        service = running.service
        bucket = open_blob_store(config.blob_store)  # the test's own view of the bucket
        say("up")
        accepted = await enrol(running, ALICE, 0)
        preview = await service.preview(ALICE)
        trained = await service.train(ALICE, "lora")
        drawn = await service.draw(ALICE, "me as an astronaut")
        say("alice", accepted=accepted, preview_images=len(preview.images), trained=trained.text,
            drawn=drawn.text, drawn_images=len(drawn.images))

        accepted = await enrol(running, BOB, 3)
        training = asyncio.create_task(service.train(BOB, "lora"))
        while not await checkpointed(running, bucket, BOB):
            if training.done():
                break
            await asyncio.sleep(0.05)
        say("checkpointed", before_the_end=not training.done())
        trained = await training
        drawn = await service.draw(BOB, "me as an astronaut")
        say("bob", accepted=accepted, trained=trained.text, drawn=drawn.text, drawn_images=len(drawn.images))
        await asyncio.to_thread(sys.stdin.read)  # the test scrapes the metrics meanwhile


if __name__ == "__main__":
    asyncio.run(journey(Path(sys.argv[1])))

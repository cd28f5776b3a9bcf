"""The Discord adapter end to end: the real discord.py client (REST, gateway, CommandTree, views)
against a fake Discord that speaks HTTPS and the gateway protocol (tests/bot/discord_http.py),
over the real BotService, SQLite, blob store, Valkey queue and, where jobs must finish, the real
engine worker on the tiny preset.

Interactions arrive the way Discord sends them: raw INTERACTION_CREATE payloads over the gateway.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import io
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import pytest
from PIL import Image

from bot import texts
from bot.chat.actions import Action, Verb, decode
from bot.discord.bot import serve_discord
from bot.discord.replies import fit_under
from bot.discord.settings import DiscordSettings
from bot.jobs import JobClient
from bot.packs import load_packs
from bot.service import BotService, Reply, ResumedWork, Upload, UserRef
from bot.settings import BotSettings
from engine.api import ASPECT_RATIOS, Refusal
from bot.styles import STYLES
from storage.blobs import LocalBlobStore, owner_for
from storage.db import Database
from tests.bot.discord_http import (
    EPHEMERAL,
    FakeDiscord,
    Person,
    Place,
    Recorded,
    command_interaction,
    component_interaction,
    custom_ids,
    dm_message,
)
from tests.support import face_photo, running_worker

TOKEN = "MTA5OTk5.fake-discord-bot-token.do-not-log-me"
COMMANDS = {
    "start", "agree", "enroll", "photo", "photos", "preview", "train", "draw", "pack", "status", "forget", "help"
}
MIB = 1024 * 1024


@dataclass
class Stack:
    service: BotService
    db: Database
    blobs_dir: Path
    valkey_url: str
    models_dir: Path

    def worker(self) -> Any:
        return running_worker(self.valkey_url, self.blobs_dir, self.models_dir)


@pytest.fixture
async def stack(tmp_path: Path, valkey_url: str, tiny_preset_dir: Path) -> AsyncIterator[Stack]:
    blobs_dir = tmp_path / "blobs"
    async with (
        Database.open(tmp_path / "avatarbooth.sqlite3") as db,
        await JobClient.connect(valkey_url, poll_delay=0.02) as jobs,
    ):
        settings = BotSettings(interactive_timeout_s=60, training_timeout_s=120)
        service = BotService(db, LocalBlobStore(blobs_dir), jobs, settings, preset_name="tiny")
        yield Stack(service, db, blobs_dir, valkey_url, tiny_preset_dir.parent)


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(tmp_path, token=TOKEN) as server:
        yield server


@pytest.fixture(autouse=True)
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Neither the adapter nor discord.py may log an error (e.g. a swallowed callback exception)."""
    yield
    errors = [
        r for r in caplog.get_records("setup") + caplog.get_records("call")
        if r.levelno >= logging.ERROR and r.name.split(".")[0] in ("bot", "discord", "asyncio")
    ]
    assert errors == [], [r.getMessage() for r in errors]


@pytest.fixture
def place() -> Place:
    return Place.guild_channel()


@pytest.fixture
def alice() -> Person:
    return Person.new("alice")


@asynccontextmanager
async def serving(
    fake: FakeDiscord,
    service: BotService,
    place: Place,
    *,
    dm_uploads: bool = True,
    resumed: ResumedWork | None = None,
) -> AsyncIterator[None]:
    """`serve_discord` (the entry point `avatarbooth run` uses) connected to the fake, until exit."""
    stop = asyncio.Event()
    settings = DiscordSettings(enabled=True, guild_ids=(place.guild_id or 1,), dm_uploads=dm_uploads)
    task = asyncio.create_task(
        serve_discord(
            service, settings, TOKEN, stop=stop, connector=fake.connector(), progress_interval_s=0.0,
            resumed=resumed,
        )
    )
    connected = asyncio.create_task(fake.wait_connected())
    await asyncio.wait({task, connected}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        connected.cancel()
        task.result()
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def user_of(person: Person) -> UserRef:
    return UserRef("discord", str(person.id))


async def enrolled(stack: Stack, person: Person) -> None:
    """Consent and three accepted selfies, through the service (a worker must be running)."""
    await stack.service.agree(user_of(person))
    uploads = [Upload(f"selfie-{n}.jpg", face_photo(n)) for n in range(3)]
    reply = await stack.service.add_photos(user_of(person), uploads)
    assert reply.text.count(": accepted.") == 3, reply.text


# --- what the bot sent -----------------------------------------------------------------------------


def callback_of(payload: dict[str, Any]) -> Callable[[Recorded], bool]:
    return lambda r: r.method == "POST" and r.path.startswith(f"/interactions/{payload['id']}/")


def edit_of(payload: dict[str, Any], containing: str = "") -> Callable[[Recorded], bool]:
    """A PATCH of the interaction's original response whose content contains `containing`."""

    def matches(r: Recorded) -> bool:
        return (
            r.method == "PATCH"
            and r.path.endswith(f"/{payload['token']}/messages/@original")
            and containing in ((r.json or {}).get("content") or "")
        )

    return matches


def followup_of(payload: dict[str, Any]) -> Callable[[Recorded], bool]:
    """A follow-up message sent with the interaction's token."""
    path = f"/webhooks/{payload['application_id']}/{payload['token']}"
    return lambda r: r.method == "POST" and r.path == path


def image_ids(message: dict[str, Any]) -> list[int]:
    """The image ids the message's buttons carry, in order."""
    return list(dict.fromkeys(action_of(custom_id).image_id for custom_id in custom_ids(message)))


def action_of(custom_id: str) -> Action:
    action = decode(custom_id)
    assert action is not None, custom_id
    return action


async def command(
    fake: FakeDiscord, person: Person, place: Place, name: str, **kwargs: Any
) -> dict[str, Any]:
    payload = command_interaction(fake, person, place, name, **kwargs)
    await fake.dispatch("INTERACTION_CREATE", payload)
    return payload


async def press(
    fake: FakeDiscord, person: Person, place: Place, message: dict[str, Any], custom_id: str
) -> dict[str, Any]:
    payload = component_interaction(fake, person, place, copy.deepcopy(message), custom_id)
    await fake.dispatch("INTERACTION_CREATE", payload)
    return payload


async def account_id(stack: Stack, person: Person) -> int:
    return (await stack.db.get_or_create_user("discord", str(person.id))).id


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# --- start-up, consent, help ------------------------------------------------------------------------


async def test_commands_sync_to_the_guild_and_the_token_is_never_logged(
    fake: FakeDiscord, stack: Stack, place: Place, alice: Person, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving(fake, stack.service, place):
        help_call = await command(fake, alice, place, "help")
        await fake.wait_for(edit_of(help_call, "/enroll photo1"))

    assert {c["name"] for c in fake.commands[str(place.guild_id)]} == COMMANDS
    enroll = next(c for c in fake.commands[str(place.guild_id)] if c["name"] == "enroll")
    assert [(o["name"], o["type"], o.get("required", False)) for o in enroll["options"]] == [
        ("photo1", 11, True), *((f"photo{n}", 11, False) for n in range(2, 6))
    ]
    draw = next(c for c in fake.commands[str(place.guild_id)] if c["name"] == "draw")
    assert [(o["name"], o["type"], o.get("required", False)) for o in draw["options"]] == [
        ("prompt", 3, True), ("style", 3, False), ("aspect", 3, False), ("boost", 5, False), ("fast", 5, False)
    ]
    preview = next(c for c in fake.commands[str(place.guild_id)] if c["name"] == "preview")
    assert [(o["name"], o["type"], o.get("required", False)) for o in preview["options"]] == [
        ("prompt", 3, False), ("style", 3, False), ("aspect", 3, False), ("fast", 5, False)
    ]
    train = next(c for c in fake.commands[str(place.guild_id)] if c["name"] == "train")
    assert [(o["name"], [c["value"] for c in o["choices"]]) for o in train["options"]] == [
        ("method", ["lora", "ti", "dreambooth"]), ("subject", ["woman", "man", "person"])
    ]
    (aspect,) = [o for o in draw["options"] if o["name"] == "aspect"]
    assert [c["value"] for c in aspect["choices"]] == list(ASPECT_RATIOS)
    (identify,) = fake.identified
    privileged = (1 << 1) | (1 << 8) | (1 << 15)  # members, presences, message content
    assert identify["intents"] & privileged == 0
    assert TOKEN not in caplog.text
    assert fake.unknown == []


async def test_a_wrong_token_fails_login_without_logging_it(
    fake: FakeDiscord, stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "MTA5OTk5.wrong-token.secret"
    with pytest.raises(discord.LoginFailure):
        await serve_discord(
            stack.service, DiscordSettings(enabled=True), wrong, stop=asyncio.Event(),
            connector=fake.connector(),
        )
    assert wrong not in caplog.text


async def test_start_then_the_consent_button_records_consent(
    fake: FakeDiscord, stack: Stack, place: Place, alice: Person
) -> None:
    async with serving(fake, stack.service, place):
        start = await command(fake, alice, place, "start")
        shown = await fake.wait_for(edit_of(start, "Faces are biometric data"))
        ack = await fake.wait_for(callback_of(start))
        assert ack.json == {"type": 5, "data": {"flags": EPHEMERAL}}  # deferred, private
        assert texts.DISCORD_CONSENT_BUTTON_HINT in shown.json["content"]
        message = fake.original_response(int(start["id"]))
        agree = Action(Verb.AGREE, alice.id).encode()
        assert custom_ids(message) == [agree]
        account = await stack.db.get_or_create_user("discord", str(alice.id))
        assert not await stack.db.has_consent(account.id)

        pressed = await press(fake, alice, place, message, agree)
        recorded = await fake.wait_for(followup_of(pressed))
        assert recorded.json["content"].startswith("Thank you, your consent is recorded.")
        assert recorded.json["flags"] & EPHEMERAL
        assert await stack.db.has_consent(account.id)
        assert custom_ids(fake.messages[int(message["id"])]) == []  # the button is gone


async def test_help_status_photos_and_forget_answer_privately_despite_a_rate_limit(
    fake: FakeDiscord, stack: Stack, place: Place, alice: Person
) -> None:
    await stack.service.agree(user_of(alice))
    async with serving(fake, stack.service, place):
        fake.rate_limit_next("PATCH", r"/webhooks/\d+/[^/]+/messages/@original")  # discord.py retries
        expected = {
            "status": "Photos: 0 accepted (3 more needed).",
            "photos": "You have no photos yet.",
            "help": "/enroll photo1 .. photo5",
            "forget": "Done: I erased your photos",
        }
        for name, text in expected.items():
            payload = await command(fake, alice, place, name)
            await fake.wait_for(edit_of(payload, text))
            assert fake.original_response(int(payload["id"]))["flags"] & EPHEMERAL
    assert any(r.status == 429 for r in fake.requests)
    account = await stack.db.get_or_create_user("discord", str(alice.id))
    assert not await stack.db.has_consent(account.id)


async def test_mistakes_get_replies_that_say_what_to_do(
    fake: FakeDiscord, stack: Stack, place: Place, alice: Person
) -> None:
    async with serving(fake, stack.service, place):
        draw = await command(fake, alice, place, "draw", options={"prompt": "me as an astronaut"})
        await fake.wait_for(edit_of(draw, texts.CONSENT_REQUIRED))
        await stack.service.agree(user_of(alice))
        preview = await command(fake, alice, place, "preview")
        await fake.wait_for(edit_of(preview, "You have 0 accepted photo(s); 3 are needed."))
        train = await command(fake, alice, place, "train", options={"method": "dreambooth"})
        # /train answers as a new message mentioning the user, failures included.
        failed = await fake.wait_for(followup_of(train))
        assert failed.json["content"].startswith(f"<@{alice.id}> 'dreambooth' is a valid method")


# --- photos ----------------------------------------------------------------------------------------


async def test_enroll_downloads_after_the_defer_and_checks_content_not_names(
    fake: FakeDiscord, stack: Stack, place: Place, alice: Person
) -> None:
    await stack.service.agree(user_of(alice))
    attachments = {
        "photo1": fake.attachment(place.channel_id, "selfie.txt", face_photo(0), "text/plain"),
        "photo2": fake.attachment(place.channel_id, "holiday.jpg", b"my holiday notes", "image/jpeg"),
        "photo3": fake.attachment(place.channel_id, "me", face_photo(1), "application/octet-stream"),
        "photo4": {**fake.attachment(place.channel_id, "huge.jpg", b"...", "image/jpeg"), "size": 30 * MIB},
    }
    async with stack.worker(), serving(fake, stack.service, place):
        start = len(fake.requests)
        enroll = await command(fake, alice, place, "enroll", attachments=attachments)
        result = await fake.wait_for(edit_of(enroll, "of 3 photos"))
        downloads = [i for i, r in enumerate(fake.requests) if r.path.startswith("/attachments/")]
        defer = next(i for i, r in enumerate(fake.requests) if callback_of(enroll)(r))
        assert start <= defer < min(downloads) and len(downloads) == 3  # not the 30 MiB one

        photos = await command(fake, alice, place, "photos")
        listed = await fake.wait_for(edit_of(photos, "Your photos:"))

    not_an_image = texts.refusal(Refusal.NOT_AN_IMAGE, stack.service.settings)
    too_large = texts.refusal(Refusal.FILE_TOO_LARGE, stack.service.settings)
    assert result.json["content"].splitlines() == [
        "photo 1 (selfie.txt): accepted.",
        f"photo 2 (holiday.jpg): refused, {not_an_image}",
        "photo 3 (me): accepted.",
        f"photo 4 (huge.jpg): refused, {too_large}",  # numbered as sent, though never downloaded
        "2 of 3 photos: send 1 more with /photo.",
    ]
    assert fake.original_response(int(enroll["id"]))["flags"] & EPHEMERAL
    assert listed.json["content"].splitlines()[1:3] == ["  1. accepted", "  2. accepted"]


async def test_selfies_sent_by_dm_are_enrolled(
    fake: FakeDiscord, stack: Stack, place: Place, alice: Person
) -> None:
    await stack.service.agree(user_of(alice))
    attachments = [
        fake.attachment(alice.dm_channel_id, f"selfie-{n}.jpg", face_photo(n), "image/jpeg")
        for n in range(3)
    ]
    async with stack.worker(), serving(fake, stack.service, place):
        await fake.dispatch("MESSAGE_CREATE", dm_message(fake, alice, "", attachments))
        created = await fake.wait_for(
            lambda r: r.method == "POST" and r.path == f"/channels/{alice.dm_channel_id}/messages"
        )
        assert created.json["content"] == "Checking 3 photo(s)..."
        final = await fake.wait_for(
            lambda r: r.method == "PATCH" and "of 3 photos" in ((r.json or {}).get("content") or ""),
            after=fake.requests.index(created),
        )
    assert final.json["content"].count(": accepted.") == 3
    assert final.path.startswith(f"/channels/{alice.dm_channel_id}/messages/")


async def test_work_finished_while_the_bot_was_down_reaches_its_user_by_dm(
    fake: FakeDiscord, stack: Stack, place: Place, alice: Person
) -> None:
    ref = user_of(alice)
    await stack.service.agree(ref)
    async with stack.worker():
        await stack.service.add_photos(ref, [Upload(None, face_photo(n)) for n in range(3)])
        # A preview whose chat process "died" while waiting: its row stays running, as after a crash.
        interrupted = asyncio.create_task(stack.service.preview(ref))
        uid = await account_id(stack, alice)
        while not await stack.db.list_jobs(uid, states=("queued", "running")):
            await asyncio.sleep(0.02)
        interrupted.cancel()
        await asyncio.gather(interrupted, return_exceptions=True)
        resumed = await stack.service.resume_all()  # what `avatarbooth run` does before serving
    assert list(resumed) == [ref]

    dm = f"/channels/{alice.dm_channel_id}/messages"
    async with serving(fake, stack.service, place, resumed=ResumedWork.of(resumed)):
        sent = await fake.wait_for(lambda r: r.method == "POST" and r.path == dm)
    assert texts.RESUMED in sent.json["content"]
    (image,) = sent.files
    assert decoded(image[1]).format == "PNG"
    buttons = [c["custom_id"] for row in sent.json["components"] for c in row["components"]]
    assert buttons and all(action_of(b).owner == alice.id for b in buttons)  # only Alice's to press


async def test_direct_messages_without_photos_or_with_dm_uploads_off_get_pointers(
    fake: FakeDiscord, stack: Stack, place: Place, alice: Person
) -> None:
    selfie = fake.attachment(alice.dm_channel_id, "selfie.jpg", face_photo(0), "image/jpeg")
    replies = f"/channels/{alice.dm_channel_id}/messages"
    async with serving(fake, stack.service, place, dm_uploads=False):
        await fake.dispatch("MESSAGE_CREATE", dm_message(fake, alice, "hello?", []))
        hint = await fake.wait_for(lambda r: r.method == "POST" and r.path == replies)
        await fake.dispatch("MESSAGE_CREATE", dm_message(fake, alice, "", [selfie]))
        off = await fake.wait_for(
            lambda r: r.method == "POST" and r.path == replies, after=fake.requests.index(hint) + 1
        )
    assert hint.json["content"] == texts.DISCORD_DM_HINT
    assert off.json["content"] == texts.DISCORD_DM_UPLOADS_OFF
    assert not any(r.path.startswith("/attachments/") for r in fake.requests)  # never downloaded


# --- results and buttons --------------------------------------------------------------------------


async def test_preview_and_draw_send_images_with_buttons_for_the_requester_only(
    fake: FakeDiscord, stack: Stack, place: Place, alice: Person
) -> None:
    mallory = Person.new("mallory")
    async with stack.worker(), serving(fake, stack.service, place):
        await enrolled(stack, alice)
        preview = await command(fake, alice, place, "preview")
        shown = await fake.wait_for(edit_of(preview, texts.PREVIEW_DONE))
        (image,) = shown.files
        assert decoded(image[1]).format == "PNG"
        previewed = fake.original_response(int(preview["id"]))
        (image_id,) = image_ids(previewed)
        assert custom_ids(previewed) == [
            Action(verb, alice.id, image_id).encode()
            for verb in (Verb.REROLL, Verb.MORE, Verb.UPSCALE, Verb.DELETE)
        ]

        draw = await command(
            fake, alice, place, "draw",
            options={"prompt": "me as an astronaut", "style": "anime", "aspect": "3:4"},
        )
        drawn = await fake.wait_for(edit_of(draw, "image 2:"))
        width, height = decoded(drawn.files[0][1]).size
        assert abs(width / height - 3 / 4) < 0.05  # the shape asked for (sides are multiples of 16)
        (draw_job,) = [j for j in await stack.db.list_jobs(await account_id(stack, alice)) if j.kind == "draw"]
        assert draw_job.payload is not None
        assert draw_job.payload["request"]["prompt"] == STYLES["anime"].apply("me as an astronaut")[0]
        message = fake.original_response(int(draw["id"]))
        assert not message["flags"] & EPHEMERAL  # results are public, so their buttons last
        assert len(drawn.files) == 2 and len(message["attachments"]) == 2
        assert [action_of(i).verb for i in custom_ids(message)] == [Verb.REROLL, Verb.MORE, Verb.UPSCALE, Verb.DELETE] * 2
        first, second = image_ids(message)

        jobs_before = len(await stack.db.list_jobs(await account_id(stack, alice)))
        stranger = await press(fake, mallory, place, message, Action(Verb.REROLL, alice.id, first).encode())
        refused = await fake.wait_for(callback_of(stranger))
        assert refused.json["type"] == 4
        assert refused.json["data"]["content"] == texts.NOT_YOUR_IMAGE
        assert refused.json["data"]["flags"] & EPHEMERAL

        deleting = await press(fake, alice, place, message, Action(Verb.DELETE, alice.id, first).encode())
        deleted = await fake.wait_for(followup_of(deleting))
        assert deleted.json["content"] == texts.IMAGE_DELETED
        after = fake.messages[int(message["id"])]
        assert [a["filename"] for a in after["attachments"]] == [f"avatarbooth-{second}.png"]
        assert image_ids(after) == [second]
    assert await stack.db.get_image(first) is None
    assert await stack.db.get_image(second) is not None
    assert len(await stack.db.list_jobs(await account_id(stack, alice))) == jobs_before  # nothing new


async def test_buttons_still_work_after_the_bot_is_rebuilt(
    fake: FakeDiscord, stack: Stack, place: Place, alice: Person
) -> None:
    async with stack.worker():
        await enrolled(stack, alice)
        async with serving(fake, stack.service, place):
            draw = await command(fake, alice, place, "draw", options={"prompt": "me on a boat"})
            await fake.wait_for(edit_of(draw, "image 2:"))
            message = fake.original_response(int(draw["id"]))
        async with serving(fake, stack.service, place):  # a new bot, as after a restart
            image_id = action_of(custom_ids(message)[0]).image_id
            for verb in (Verb.REROLL, Verb.MORE):
                pressed = await press(fake, alice, place, message, Action(verb, alice.id, image_id).encode())
                ack = await fake.wait_for(callback_of(pressed))
                assert ack.json == {"type": 5}  # a new, public "thinking" message
                result = await fake.wait_for(edit_of(pressed, "image 2:"))
                assert len(result.files) == 2
    assert len(fake.identified) == 2
    image = await stack.db.get_image(image_id)
    assert image is not None and image.prompt == "me on a boat"


async def test_the_upscale_button_posts_twice_the_size_as_an_attachment_with_its_buttons(
    fake: FakeDiscord, stack: Stack, place: Place, alice: Person
) -> None:
    mallory = Person.new("mallory")
    async with stack.worker(), serving(fake, stack.service, place):
        await enrolled(stack, alice)
        preview = await command(fake, alice, place, "preview")
        await fake.wait_for(edit_of(preview, texts.PREVIEW_DONE), timeout=120)
        previewed = fake.original_response(int(preview["id"]))
        (source_id,) = image_ids(previewed)
        upscale = Action(Verb.UPSCALE, alice.id, source_id).encode()
        assert upscale in custom_ids(previewed)

        stranger = await press(fake, mallory, place, previewed, upscale)  # not hers: refused, nothing made
        refused = await fake.wait_for(callback_of(stranger))
        assert refused.json["data"]["content"] == texts.NOT_YOUR_IMAGE
        pressed = await press(fake, alice, place, previewed, upscale)
        ack = await fake.wait_for(callback_of(pressed))
        assert ack.json == {"type": 5}  # a public "thinking..." that becomes the result
        result = await fake.wait_for(edit_of(pressed, "2× its drawn size"), timeout=120)

    lines = result.json["content"].splitlines()
    assert lines[0] == texts.upscaled(256, 256, 1) and lines[1].startswith("image 1: ")
    (attachment,) = result.files
    image = decoded(attachment[1])
    assert (image.format, image.size) == ("PNG", (256, 256))  # the stored file as it is: not re-encoded
    message = fake.original_response(int(pressed["id"]))
    (upscaled_id,) = image_ids(message)
    assert upscaled_id != source_id
    assert custom_ids(message) == [
        Action(verb, alice.id, upscaled_id).encode() for verb in (Verb.REROLL, Verb.MORE, Verb.UPSCALE, Verb.DELETE)
    ]
    source, upscaled = await stack.db.get_image(source_id), await stack.db.get_image(upscaled_id)
    assert source is not None and upscaled is not None and upscaled.prompt == source.prompt
    assert (await stack.service.image_file(user_of(alice), upscaled_id)).read_bytes() == attachment[1]
    jobs = await stack.db.list_jobs(await account_id(stack, alice))
    assert [j.payload["request"]["upscale_of"] for j in jobs if j.kind == "draw" and j.payload] == [source.blob_key]


async def test_the_defer_goes_out_before_any_slow_call_and_a_stop_is_announced(
    fake: FakeDiscord, stack: Stack, place: Place, alice: Person
) -> None:
    async with stack.worker():
        await enrolled(stack, alice)
    async with serving(fake, stack.service, place):  # and no worker: a drawing never finishes
        draw = await command(fake, alice, place, "draw", options={"prompt": "me in the rain"})
        ack = await fake.wait_for(callback_of(draw), timeout=3)
        assert ack.json == {"type": 5}
        acknowledged = fake.interaction(int(draw["id"]))
        assert acknowledged.acknowledged_at is not None
        assert acknowledged.acknowledged_at - acknowledged.dispatched_at < 3.0
        account = await stack.db.get_or_create_user("discord", str(alice.id))
        async with asyncio.timeout(5):
            while not any(job.attempts for job in await stack.db.list_jobs(account.id)):
                await asyncio.sleep(0.02)  # the slow call (submitted, no worker) began after the acknowledgement
        assert not any(edit_of(draw)(r) for r in fake.requests)
    # Stopping the bot tells the user instead of leaving "thinking..." up.
    await fake.wait_for(edit_of(draw, texts.DISCORD_INTERRUPTED), timeout=1)


async def test_training_progress_is_edited_in_and_the_result_mentions_the_user(
    fake: FakeDiscord, stack: Stack, place: Place, alice: Person
) -> None:
    async with stack.worker(), serving(fake, stack.service, place):
        await enrolled(stack, alice)
        train = await command(fake, alice, place, "train")
        await fake.wait_for(edit_of(train, "Training your lora model on 3 photos"))
        done = await fake.wait_for(followup_of(train), timeout=60)
    assert done.json["content"].startswith(f"<@{alice.id}> Your lora model v1 is ready.")
    assert done.json["allowed_mentions"] == {"parse": [], "users": [alice.id]}  # no one else
    (announced,) = [m for m in fake.messages.values() if m["content"] == done.json["content"]]
    assert [u["id"] for u in announced["mentions"]] == [str(alice.id)]


async def test_after_the_token_expires_the_result_is_a_new_message_in_the_channel(
    fake: FakeDiscord, stack: Stack, place: Place, alice: Person
) -> None:
    async with stack.worker(), serving(fake, stack.service, place):
        await enrolled(stack, alice)
        # Delivered now, but created 14.5 minutes ago: less than the adapter's safety margin is left.
        payload = command_interaction(
            fake, alice, place, "draw", {"prompt": "me at dusk"}, at=_minutes_ago(14.5)
        )
        await fake.dispatch("INTERACTION_CREATE", payload)
        await fake.wait_for(edit_of(payload, texts.DISCORD_HANDOFF))
        posted = await fake.wait_for(
            lambda r: r.method == "POST" and r.path == f"/channels/{place.channel_id}/messages"
        )
    assert posted.json["content"].startswith(f"<@{alice.id}> Drawn with the instant preview model")
    assert len(posted.files) == 2
    (announced,) = [m for m in fake.messages.values() if m["content"] == posted.json["content"]]
    assert len(custom_ids(announced)) == 8  # the buttons come along: four under each image


def _minutes_ago(minutes: float) -> float:
    return time.time() - minutes * 60


# --- the upload limit ------------------------------------------------------------------------------


def test_an_image_over_10_mib_is_reencoded_under_the_limit() -> None:
    side = 2000
    noise = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    out = io.BytesIO()
    noise.save(out, format="PNG", compress_level=1)
    big = out.getvalue()
    assert len(big) > 10 * MIB

    data, suffix = fit_under(big, 10 * MIB)

    assert len(data) <= 10 * MIB and suffix == ".jpg"
    assert decoded(data).format == "JPEG"
    assert fit_under(data, 10 * MIB) == (data, ".jpg")  # what fits is sent as it is


async def test_outputs_respect_the_interactions_attachment_size_limit(
    fake: FakeDiscord, stack: Stack, place: Place, alice: Person
) -> None:
    limit = 6000  # below the tiny preset's PNGs of noise
    async with stack.worker(), serving(fake, stack.service, place):
        await enrolled(stack, alice)
        draw = await command(
            fake, alice, place, "draw", options={"prompt": "me"}, attachment_size_limit=limit
        )
        drawn = await fake.wait_for(edit_of(draw, "image 2:"))
    assert len(drawn.files) == 2
    for filename, data in drawn.files:
        assert len(data) <= limit and filename.endswith(".jpg")
        assert decoded(data).format == "JPEG"
    for image_id in image_ids(fake.original_response(int(draw["id"]))):
        image = await stack.db.get_image(image_id)
        assert image is not None
        stored = LocalBlobStore(stack.blobs_dir).path(image.blob_key).read_bytes()
        assert len(stored) > limit and decoded(stored).format == "PNG"  # the kept file is untouched


def test_guild_ids_must_be_server_ids() -> None:
    with pytest.raises(ValueError, match="guild_ids"):
        DiscordSettings(guild_ids=(0,))
    assert DiscordSettings().guild_ids == ()




# --- button ids ------------------------------------------------------------------------------------


def with_buttons(message: dict[str, Any], rows: list[list[str]]) -> dict[str, Any]:
    """A public copy of `message` carrying buttons with these custom ids (one list per row), as a
    previous release or a forger would have them."""
    shown = copy.deepcopy(message)
    shown["flags"] = 0
    shown["components"] = [
        {
            "type": 1,
            "components": [
                {"type": 2, "style": 2, "label": f"button {n}", "custom_id": custom_id}
                for n, custom_id in enumerate(row, start=1)
            ],
        }
        for row in rows
    ]
    return shown


async def help_message(fake: FakeDiscord, person: Person, place: Place) -> dict[str, Any]:
    """A message the bot sent (the answer to /help), to put buttons on."""
    payload = await command(fake, person, place, "help")
    await fake.wait_for(edit_of(payload, "/enroll photo1"))
    return fake.original_response(int(payload["id"]))


def tiny_png(shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, shade, shade)).save(out, format="PNG")
    return out.getvalue()


async def test_a_forged_button_on_someone_elses_image_is_refused_before_any_drawing(
    fake: FakeDiscord, stack: Stack, place: Place, alice: Person
) -> None:
    mallory = Person.new("mallory")
    await stack.service.agree(user_of(alice))
    theirs = await stack.db.add_image(
        await account_id(stack, mallory), None, "u0/images/" + "0" * 64 + ".png", "mallory", 1, None
    )
    forged = [
        Action(Verb.REROLL, alice.id, theirs.id).encode(),  # her own id on Mallory's image
        Action(Verb.MORE, alice.id, theirs.id).encode(),
        Action(Verb.REROLL, alice.id, theirs.id + 1000).encode(),  # an image that does not exist
        f"ab2:reroll:{alice.id}:{2**63}",  # beyond 64 bits: matches the template, decodes to nothing
    ]
    async with serving(fake, stack.service, place):
        message = with_buttons(await help_message(fake, alice, place), [forged])
        presses = []
        for custom_id in forged:
            pressed = await press(fake, alice, place, message, custom_id)
            refused = await fake.wait_for(callback_of(pressed))
            assert refused.json["type"] == 4, custom_id  # answered at once, no "thinking..."
            assert refused.json["data"]["content"] == texts.NOT_YOUR_IMAGE
            assert refused.json["data"]["flags"] & EPHEMERAL
            presses.append(pressed)
        await help_message(fake, alice, place)  # anything the presses still sent has arrived by now

    for pressed in presses:
        sent = [r for r in fake.requests if f"/{pressed['token']}/" in r.path]
        assert len(sent) == 1  # the refusal, and no progress, drawing or follow-up
    assert await stack.db.list_jobs(await account_id(stack, alice)) == []


async def test_buttons_sent_with_the_previous_id_format_still_work(
    fake: FakeDiscord, stack: Stack, place: Place, alice: Person
) -> None:
    await stack.service.agree(user_of(alice))
    uid = await account_id(stack, alice)
    blobs = LocalBlobStore(stack.blobs_dir)
    keys = [blobs.put(owner_for(uid), "images", tiny_png(shade), ".png") for shade in (10, 20)]
    first, second = [await stack.db.add_image(uid, None, key, "me", 1, None) for key in keys]
    old_ids = [  # as the previous release wrote them: image, then owner
        [f"ab:{verb}:{image.id}:{alice.id}" for verb in ("reroll", "more", "delete")]
        for image in (first, second)
    ]
    async with serving(fake, stack.service, place):
        message = with_buttons(await help_message(fake, alice, place), old_ids)
        deleting = await press(fake, alice, place, message, f"ab:delete:{first.id}:{alice.id}")
        deleted = await fake.wait_for(followup_of(deleting))
        assert deleted.json["content"] == texts.IMAGE_DELETED
        assert deleted.json["flags"] & EPHEMERAL
        # The buttons left are rewritten in the current format (no upscale: the message had none).
        assert custom_ids(fake.messages[int(message["id"])]) == [
            Action(verb, alice.id, second.id).encode() for verb in (Verb.REROLL, Verb.MORE, Verb.DELETE)
        ]
    assert await stack.db.get_image(first.id) is None
    assert await stack.db.get_image(second.id) is not None


@pytest.mark.slow
async def test_a_pack_is_one_progress_message_then_messages_of_at_most_ten_images(
    fake: FakeDiscord, stack: Stack, place: Place, alice: Person
) -> None:
    portraits = load_packs()["portraits"]
    packs = {"portraits": dataclasses.replace(portraits, count=12)}  # more than one message holds
    service = BotService(
        stack.db, LocalBlobStore(stack.blobs_dir), stack.service._jobs,  # noqa: SLF001
        stack.service.settings, preset_name="tiny", packs=packs,
    )
    async with stack.worker(), serving(fake, service, place):
        await enrolled(stack, alice)
        await service.train(user_of(alice))
        start = len(fake.requests)
        pack = await command(fake, alice, place, "pack", options={"name": "portraits"})
        done = await fake.wait_for(edit_of(pack, "Your pack Portraits: 12 images"))
        rest = await fake.wait_for(followup_of(pack))

    assert len(done.files) == 10 and len(rest.files) == 2
    message = fake.original_response(int(pack["id"]))
    assert custom_ids(message) == [] and len(message["attachments"]) == 10  # no buttons under a pack
    lines = done.json["content"].splitlines()
    assert [line.split(" (")[0] for line in lines[1:13]] == [f"image {n}" for n in range(1, 13)]
    progress = [
        r for r in fake.requests[start:]
        if r.method == "PATCH" and r.path.endswith(f"/{pack['token']}/messages/@original")
    ]
    assert len(progress) > 1
    assert all((r.json or {}).get("content", "").startswith("Pack Portraits: ") for r in progress[:-1])
    assert progress[-1] is done  # the progress message became the result: no second message

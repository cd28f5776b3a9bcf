"""The Telegram adapter end to end: the real python-telegram-bot Application against a fake Bot API
server on 127.0.0.1 (`tests.bot.fake_telegram`), over the real service, SQLite, blob store, Valkey
and, where images are made, the real worker on the tiny preset."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image
from telegram import Bot

from bot import texts
from bot.chat.actions import Action, Verb
from bot.inbox import Inbox
from bot.jobs import JobClient
from bot.service import BotService, ResumedWork, Upload, UserRef
from bot.settings import BotSettings
from bot.telegram.adapter import PLATFORM, serve_telegram
from bot.telegram.channel import Channel
from bot.telegram.settings import TELEGRAM_DOWNLOAD_LIMIT, TelegramSettings
from storage.blobs import LocalBlobStore, owner_for
from storage.db import Database
from tests.bot.fake_telegram import TOKEN, FakeTelegram, FakeUser
from tests.support import face_photo, faceless_photo, gps_jpeg, pixels, running_worker

GROUP = -100500


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    async with Database.open(tmp_path / "avatarbooth.sqlite3") as database:
        yield database


@pytest.fixture
def blobs_dir(tmp_path: Path) -> Path:
    return tmp_path / "blobs"


@pytest.fixture
async def service(db: Database, blobs_dir: Path, valkey_url: str) -> AsyncIterator[BotService]:
    settings = BotSettings(interactive_timeout_s=60, training_timeout_s=120)
    async with await JobClient.connect(valkey_url, poll_delay=0.02) as jobs:
        yield BotService(db, LocalBlobStore(blobs_dir), jobs, settings, preset_name="tiny")


@pytest.fixture
def inbox(db: Database) -> Inbox:
    return Inbox(db, PLATFORM)


@pytest.fixture
async def worker(valkey_url: str, blobs_dir: Path, tiny_preset_dir: Path) -> AsyncIterator[None]:
    async with running_worker(valkey_url, blobs_dir, tiny_preset_dir.parent):
        yield


def telegram_settings(tg: FakeTelegram, **changes: Any) -> TelegramSettings:
    base = TelegramSettings(
        enabled=True,
        base_url=tg.base_url,
        base_file_url=tg.base_file_url,
        max_download_bytes=TELEGRAM_DOWNLOAD_LIMIT,  # as on Telegram's own server
        album_wait_s=0.3,
        progress_interval_s=0.2,
        poll_timeout_s=1,
        shutdown_grace_s=5.0,
    )
    return replace(base, **changes)


@asynccontextmanager
async def serving(
    service: BotService, inbox: Inbox, settings: TelegramSettings, **options: Any
) -> AsyncIterator[asyncio.Task[None]]:
    """The adapter in a task; a graceful stop (and its errors) when the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve_telegram(service, inbox, settings, TOKEN, stop=stop, **options))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def user_id(db: Database, user: FakeUser) -> int:
    return (await db.get_or_create_user("telegram", str(user.id))).id


def button(message: dict[str, Any], label: str) -> str:
    for row in message["reply_markup"]["inline_keyboard"]:
        for key in row:
            if key["text"] == label:
                return str(key["callback_data"])
    raise AssertionError(f"no {label!r} button under {message}")


def photos_in(tg: FakeTelegram, chat_id: int) -> list[dict[str, Any]]:
    return [m for m in tg.sent_to(chat_id) if "photo" in m]


async def listening(http: aiohttp.ClientSession, url: str) -> None:
    """Wait until the adapter's webhook server accepts connections (it starts after setWebhook)."""
    for _ in range(100):
        try:
            async with http.get(url):
                return
        except aiohttp.ClientConnectorError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"nothing listens on {url}")


# --- the journey -----------------------------------------------------------------------------------


async def test_the_whole_journey(
    tg: FakeTelegram,
    service: BotService,
    inbox: Inbox,
    db: Database,
    blobs_dir: Path,
    worker: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    ann = tg.user(1001, "Ann")
    async with serving(service, inbox, telegram_settings(tg)):
        # /start, and consent through the button
        tg.send_text(ann, "/start")
        consent = await tg.wait_text(ann.id, "Welcome to AvatarBooth")
        assert consent["text"] == texts.CONSENT
        tg.press(ann, consent, button(consent, texts.BUTTON_LABELS[Verb.AGREE]))
        await tg.wait_text(ann.id, "your consent is recorded")
        await tg.wait_for(lambda: "reply_markup" not in tg.messages[consent["message_id"]])

        # an album of three selfies (files with GPS in their EXIF) and one bad file: one answer
        originals = [gps_jpeg(n) for n in range(3)]
        for n, data in enumerate(originals):
            tg.send_document(ann, data, file_name=f"selfie-{n}.jpg", media_group_id="album-1")
        tg.send_document(ann, b"meeting notes", file_name="notes.txt", mime_type="text/plain",
                         media_group_id="album-1")
        answer = await tg.wait_text(ann.id, "3 of 3 photos")
        assert answer["text"].splitlines() == [
            "photo 1 (selfie-0.jpg): accepted.",
            "photo 2 (selfie-1.jpg): accepted.",
            "photo 3 (selfie-2.jpg): accepted.",
            "photo 4 (notes.txt): refused, not a photo I can read: send a JPEG, PNG or WebP image.",
            texts.enrollment_standing(3, 3, 5),
        ]
        assert sum("photo 1 (selfie-0.jpg)" in t for t in tg.texts_in(ann.id)) == 1

        # stored without EXIF, and losslessly (same pixels as sent)
        uid = await user_id(db, ann)
        blobs = LocalBlobStore(blobs_dir)
        stored = [blobs.get(p.blob_key) for p in await db.list_photos(uid, "accepted")]
        assert len(stored) == 3
        for data, original in zip(stored, originals):
            assert b"Exif" not in data and b"PhoneCo" not in data
            with Image.open(io.BytesIO(data)) as image:
                assert not image.getexif()
            assert pixels(data) == pixels(original)

        # a compressed photo comes in several sizes: the largest is the one fetched
        update = tg.send_photo(ann, face_photo(3))
        sizes = update["message"]["photo"]
        assert len(sizes) == 3
        await tg.wait_text(ann.id, texts.enrollment_standing(4, 3, 5))
        largest = max(sizes, key=lambda s: s["width"] * s["height"])
        assert [tg.file_id_of_path(p) for p in tg.downloads][-1:] == [largest["file_id"]]

        # preview: a progress message edited into the result, then the image with its buttons
        tg.send_text(ann, "/preview")
        await tg.wait_text(ann.id, texts.PREVIEW_DONE)
        await tg.wait_for(lambda: len(photos_in(tg, ann.id)) == 1)

        # training: progress edited in place, at most once per progress_interval_s
        tg.send_text(ann, "/train")
        await tg.wait_text(ann.id, "Your lora model v1 is ready")
        progress = await tg.wait_text(ann.id, texts.TELEGRAM_PROGRESS_DONE.format(what="training"))
        edits = [
            c for c in tg.calls_of("editMessageText") if c.params["message_id"] == progress["message_id"]
        ]
        shown = [c.params["text"] for c in edits]
        assert any(line.startswith("training: step") for line in shown), shown
        progress_edits = edits[:-1]  # the last one shows "done"
        gaps = [b.at - a.at for a, b in zip(progress_edits, progress_edits[1:])]
        assert all(gap >= 0.19 for gap in gaps), gaps

        # draw: two images from the model, each with buttons, in the shape asked for
        tg.send_text(ann, "/draw --ar 3:4 me as an astronaut")
        await tg.wait_text(ann.id, "Drawn by your lora model v1.")
        await tg.wait_for(lambda: len(photos_in(tg, ann.id)) == 3)
        drawn = photos_in(tg, ann.id)[-1]
        assert drawn["caption"].startswith("image 2:")
        with Image.open(io.BytesIO(tg.calls_of("sendPhoto")[-1].files["photo"][1])) as image:
            assert abs(image.width / image.height - 3 / 4) < 0.05  # sides are multiples of 16

        # buttons: full size, draw again, more like this, delete
        tg.press(ann, drawn, button(drawn, texts.BUTTON_LABELS[Verb.FULL]))
        document = await tg.wait_for(lambda: tg.calls_of("sendDocument"))
        image_id = int(button(drawn, texts.BUTTON_LABELS[Verb.DELETE]).split(":")[-1])
        full = await service.image_file(UserRef("telegram", str(ann.id)), image_id)
        assert document[0].files["document"][1] == full.read_bytes()

        tg.press(ann, drawn, button(drawn, texts.BUTTON_LABELS[Verb.REROLL]))
        await tg.wait_for(lambda: len(photos_in(tg, ann.id)) == 5)
        tg.press(ann, drawn, button(drawn, texts.BUTTON_LABELS[Verb.MORE]))
        await tg.wait_for(lambda: len(photos_in(tg, ann.id)) == 7)

        tg.press(ann, drawn, button(drawn, texts.BUTTON_LABELS[Verb.DELETE]))
        await tg.wait_text(ann.id, texts.IMAGE_DELETED)
        assert drawn["message_id"] in tg.deleted
        assert await db.get_image(image_id) is None

        # /forget leaves nothing
        tg.send_text(ann, "/forget")
        await tg.wait_text(ann.id, "Done: I erased")
        assert await db.list_photos(uid) == []
        assert await db.list_jobs(uid) == []
        assert await db.list_models(uid) == []
        assert not await db.has_consent(uid)
        folder = blobs_dir / owner_for(uid)
        assert not [p for p in folder.rglob("*") if p.is_file()]

    assert not [m for m in tg.texts_in(ann.id) if m == texts.SOMETHING_BROKE]
    # The library logs its Bot API URL at DEBUG; the token in it is replaced, here and everywhere.
    assert "<TELEGRAM_TOKEN>" in caplog.text
    assert TOKEN not in caplog.text
    assert not [r for r in caplog.records if TOKEN in r.getMessage()]


async def test_a_restart_in_the_middle_of_enrolment_loses_no_photo(
    tg: FakeTelegram, service: BotService, inbox: Inbox, db: Database, worker: None
) -> None:
    ann = tg.user(1001, "Ann")
    await service.agree(UserRef("telegram", str(ann.id)))
    first = [tg.send_photo(ann, face_photo(n), media_group_id="album-7") for n in range(2)]

    # The first process fetches two album items and keeps them in the database, which lets it
    # tell Telegram at once that they arrived; then it dies while it waits for the rest.
    stop = asyncio.Event()
    crashed = asyncio.create_task(
        serve_telegram(service, inbox, telegram_settings(tg, album_wait_s=30.0), TOKEN, stop=stop)
    )
    await tg.wait_for(lambda: {u["update_id"] for u in first} <= tg.delivered)
    await tg.wait_for(lambda: tg.pending_updates() == 0)  # confirmed: Telegram will not resend them
    assert [key for key, _ in await inbox.replay()] == [
        str(u["update_id"]) for u in first
    ]
    crashed.cancel()
    await asyncio.gather(crashed, return_exceptions=True)
    assert await db.list_photos(await user_id(db, ann)) == []

    tg.send_photo(ann, face_photo(2), media_group_id="album-7")  # arrives while the bot is down
    async with serving(service, inbox, telegram_settings(tg)):
        answer = await tg.wait_text(ann.id, "3 of 3 photos")
    assert answer["text"].splitlines()[:3] == [f"photo {n}: accepted." for n in (1, 2, 3)]
    assert len(await db.list_photos(await user_id(db, ann), "accepted")) == 3
    assert tg.pending_updates() == 0  # the graceful stop confirmed every handled update
    assert await inbox.replay() == []  # and the answered uploads left the inbox


async def test_a_graceful_stop_answers_an_album_still_gathering(
    tg: FakeTelegram, service: BotService, inbox: Inbox, db: Database, worker: None
) -> None:
    ann = tg.user(1001, "Ann")
    await service.agree(UserRef("telegram", str(ann.id)))
    sent = [tg.send_photo(ann, face_photo(n), media_group_id="album-8") for n in range(2)]
    async with serving(service, inbox, telegram_settings(tg, album_wait_s=30.0)):
        await tg.wait_for(lambda: {u["update_id"] for u in sent} <= tg.delivered)
        await tg.wait_text(ann.id, "photo check...")
    # The stop answered the album at once instead of after album_wait_s, and confirmed it.
    answer = ["photo 1: accepted.", "photo 2: accepted.", texts.enrollment_standing(2, 3, 5)]
    assert tg.texts_in(ann.id) == ["\n".join(answer)]
    assert len(await db.list_photos(await user_id(db, ann), "accepted")) == 2
    assert tg.pending_updates() == 0


async def test_work_finished_at_start_up_reaches_its_user(
    tg: FakeTelegram, service: BotService, inbox: Inbox, db: Database, worker: None
) -> None:
    ann = tg.user(1001, "Ann")
    ann_ref = UserRef("telegram", str(ann.id))
    await service.agree(ann_ref)
    await service.add_photos(ann_ref, [Upload(None, face_photo(n)) for n in range(3)])
    tg.send_text(ann, "/help")  # Ann's private chat is open; the bot is not serving yet
    # A preview whose process "died" while waiting: its row stays running, as after a crash.
    interrupted = asyncio.create_task(service.preview(ann_ref))
    uid = await user_id(db, ann)
    while not await db.list_jobs(uid, states=("queued", "running")):
        await asyncio.sleep(0.02)
    interrupted.cancel()
    await asyncio.gather(interrupted, return_exceptions=True)

    resumed = await service.resume_all()  # what `avatarbooth run` does before serving
    assert list(resumed) == [ann_ref]
    async with serving(service, inbox, telegram_settings(tg), resumed=ResumedWork.of(resumed)):
        await tg.wait_text(ann.id, texts.RESUMED)
        await tg.wait_for(lambda: photos_in(tg, ann.id))


async def test_a_restarted_bot_answers_at_once_and_sends_interrupted_work_when_it_is_done(
    tg: FakeTelegram,
    service: BotService,
    inbox: Inbox,
    db: Database,
    valkey_url: str,
    blobs_dir: Path,
    tiny_preset_dir: Path,
) -> None:
    """Start-up used to wait for every interrupted job before answering anyone (hours with real
    training): now the resume runs beside the adapter, which sends each result as it comes."""
    ann, bob = tg.user(1001, "Ann"), tg.user(1002, "Bob")
    ann_ref = UserRef("telegram", str(ann.id))
    await service.agree(ann_ref)
    tg.send_text(ann, "/help")  # Ann's private chat is open
    # A photo check whose process "died" while no worker ran: its row stays queued, as after a crash.
    interrupted = asyncio.create_task(service.add_photos(ann_ref, [Upload(None, face_photo(0))]))
    uid = await user_id(db, ann)
    while not any(job.attempts for job in await db.list_jobs(uid)):
        await asyncio.sleep(0.02)
    interrupted.cancel()
    await asyncio.gather(interrupted, return_exceptions=True)

    resumed = ResumedWork()
    resuming = asyncio.create_task(service.resume_all(deliver=resumed.put))  # as `avatarbooth run` does
    async with serving(service, inbox, telegram_settings(tg), resumed=resumed):
        tg.send_text(bob, "/start")
        await tg.wait_text(bob.id, "Welcome")  # answered while Ann's check still waits for a worker
        assert not resuming.done() and not any(texts.RESUMED in t for t in tg.texts_in(ann.id))
        async with running_worker(valkey_url, blobs_dir, tiny_preset_dir.parent):
            await tg.wait_text(ann.id, texts.RESUMED)
            await asyncio.wait_for(resuming, 30)
    (photo,) = await db.list_photos(uid)
    assert photo.status == "accepted"


async def test_a_button_pressed_by_another_user_does_nothing(
    tg: FakeTelegram, service: BotService, inbox: Inbox, db: Database, blobs_dir: Path, worker: None
) -> None:
    ann, eve = tg.user(1001, "Ann"), tg.user(1002, "Eve")
    ann_ref = UserRef("telegram", str(ann.id))
    await service.agree(ann_ref)
    await service.add_photos(ann_ref, [Upload(None, face_photo(n)) for n in range(3)])
    tg.send_text(eve, "/start")
    async with serving(service, inbox, telegram_settings(tg)):
        tg.send_text(ann, "/preview")
        await tg.wait_for(lambda: photos_in(tg, ann.id))
        image = photos_in(tg, ann.id)[0]
        image_id = int(button(image, texts.BUTTON_LABELS[Verb.DELETE]).split(":")[-1])
        await tg.wait_text(eve.id, "Welcome")
        before = len(tg.calls)

        for label in (texts.BUTTON_LABELS[Verb.DELETE], texts.BUTTON_LABELS[Verb.REROLL],
                      texts.BUTTON_LABELS[Verb.FULL]):
            tg.press(eve, image, button(image, label))
        # Forged: Eve's own id with Ann's image id. The service refuses it too.
        tg.press(eve, image, f"ab1:d:{eve.id}:{image_id}")
        tg.press(eve, image, f"ab1:d:{eve.id}:{2**70}")  # no id at all: out of SQLite's range
        await tg.wait_for(lambda: len(tg.calls_of("answerCallbackQuery")) == 5)
        await tg.wait_text(eve.id, texts.NOT_YOUR_IMAGE)
        await asyncio.sleep(0.3)

    after = [c for c in tg.calls[before:] if c.method not in ("getUpdates", "answerCallbackQuery")]
    assert [(c.method, c.params["chat_id"], c.params.get("text")) for c in after] == [
        ("sendMessage", eve.id, texts.NOT_YOUR_IMAGE)
    ]
    alerts = [c.params.get("text") for c in tg.calls_of("answerCallbackQuery")]
    assert alerts[:3] == [texts.NOT_YOUR_IMAGE] * 3
    assert texts.TELEGRAM_UNKNOWN_BUTTON in alerts[3:]
    assert image["message_id"] not in tg.deleted
    assert (await service.image_file(ann_ref, image_id)).exists()
    assert await db.count_images_since(await user_id(db, ann), 0) == 1


async def test_a_forged_draw_button_is_refused_before_any_drawing_message(
    tg: FakeTelegram, service: BotService, inbox: Inbox, db: Database
) -> None:
    """Eve's own id on a button with Ann's image id (or no image at all): refused at once, with no
    "drawing..." message opened first (no worker runs: nothing may be drawn)."""
    ann, eve = tg.user(1001, "Ann"), tg.user(1002, "Eve")
    ann_id = await user_id(db, ann)
    ann_image = await db.add_image(ann_id, None, f"{owner_for(ann_id)}/images/{0:064x}.png", "me", 1, None)
    drawing = texts.progress("drawing", {})
    tg.send_text(eve, "/start")
    async with serving(service, inbox, telegram_settings(tg)):
        welcome = await tg.wait_text(eve.id, "Welcome")
        before = len(tg.calls)
        for data in (
            Action(Verb.REROLL, eve.id, ann_image.id).encode(),
            Action(Verb.MORE, eve.id, ann_image.id).encode(),
            f"ab1:r:{eve.id}:{ann_image.id}",  # the previous release's ids are checked the same way
            Action(Verb.MORE, eve.id, ann_image.id + 1000).encode(),  # an image that does not exist
        ):
            tg.press(eve, welcome, data)
        await tg.wait_for(lambda: tg.texts_in(eve.id).count(texts.NOT_YOUR_IMAGE) == 4)
        await asyncio.sleep(0.3)

    after = [c for c in tg.calls[before:] if c.method not in ("getUpdates", "answerCallbackQuery")]
    assert [(c.method, c.params["chat_id"], c.params.get("text")) for c in after] == [
        ("sendMessage", eve.id, texts.NOT_YOUR_IMAGE)
    ] * 4
    shown = [str(c.params.get("text")) for c in tg.calls_of("sendMessage", "editMessageText")]
    assert not [text for text in shown if drawing in text], shown
    assert await db.list_jobs(await user_id(db, eve)) == []


async def test_the_upscale_button_sends_twice_the_size_as_a_document_until_the_limit(
    tg: FakeTelegram, service: BotService, inbox: Inbox, db: Database, blobs_dir: Path, worker: None
) -> None:
    ann = tg.user(1001, "Ann")
    user = UserRef("telegram", str(ann.id))
    await service.agree(user)
    await service.add_photos(user, [Upload(f"selfie-{n}.jpg", face_photo(n)) for n in range(3)])
    upscale = texts.BUTTON_LABELS[Verb.UPSCALE]
    async with serving(service, inbox, telegram_settings(tg)):
        tg.send_text(ann, "/preview")
        preview = (await tg.wait_for(lambda: photos_in(tg, ann.id), timeout=120))[0]
        rows = [[key["text"] for key in row] for row in preview["reply_markup"]["inline_keyboard"]]
        assert rows == [[texts.BUTTON_LABELS[v] for v in pair] for pair in (
            (Verb.REROLL, Verb.MORE), (Verb.UPSCALE, Verb.FULL), (Verb.DELETE,))]

        tg.press(ann, preview, button(preview, upscale))
        done = await tg.wait_text(ann.id, "2× its drawn size", timeout=120)
        (first,) = await tg.wait_for(lambda: tg.calls_of("sendDocument"), timeout=30)
        documents = lambda: [m for m in tg.sent_to(ann.id) if "document" in m]  # noqa: E731
        document = documents()[0]
        # The second upscale starts from the first one's own button.
        tg.press(ann, document, button(document, upscale))
        await tg.wait_text(ann.id, "4× its drawn size", timeout=120)
        second = (await tg.wait_for(lambda: documents()[1:], timeout=30))[0]
        tg.press(ann, second, button(second, upscale))
        await tg.wait_text(ann.id, texts.UPSCALE_LIMIT.format(factor=4), timeout=30)

    opened = [c.params["text"] for c in tg.calls_of("sendMessage") if c.params["chat_id"] == ann.id]
    # One progress message per press; the refused one became the refusal (no job was made: below).
    assert opened.count(texts.progress(texts.UPSCALING, {})) == 3
    assert done["text"].splitlines()[0] == texts.upscaled(256, 256, 1)
    assert done["text"].splitlines()[1].startswith("image 1: ")
    assert texts.TINY_NOTE in done["text"]
    with Image.open(io.BytesIO(first.files["document"][1])) as image:
        assert (image.format, image.size) == ("PNG", (256, 256))  # the file itself, twice the 128-px preview
    with Image.open(io.BytesIO(tg.calls_of("sendDocument")[1].files["document"][1])) as image:
        assert image.size == (512, 512)
    assert document["caption"].startswith("image 1: ")

    source_id = int(button(preview, upscale).split(":")[-1])
    upscaled_id = int(button(document, upscale).split(":")[-1])
    source, upscaled = await db.get_image(source_id), await db.get_image(upscaled_id)
    assert source is not None and upscaled is not None and upscaled_id != source_id
    assert upscaled.prompt == source.prompt
    assert upscaled.blob_key.startswith(owner_for(await user_id(db, ann)) + "/images/")
    requests = [j.payload["request"] for j in await db.list_jobs(await user_id(db, ann)) if j.kind == "draw" and j.payload]
    assert [r["upscale_of"] for r in requests] == [source.blob_key, upscaled.blob_key]  # no third job


# --- Telegram's limits -----------------------------------------------------------------------------


async def test_a_429_is_waited_out(tg: FakeTelegram, service: BotService, inbox: Inbox) -> None:
    ann = tg.user(1001)
    tg.fail_next("sendMessage", retry_after=1)
    async with serving(service, inbox, telegram_settings(tg)):
        tg.send_text(ann, "/help")
        await tg.wait_text(ann.id, "Commands:")
    attempts = [c for c in tg.calls if c.method == "sendMessage"]
    assert [c.status for c in attempts] == [429, 200]
    assert attempts[1].at - attempts[0].at >= 1.0
    assert tg.texts_in(ann.id) == [texts.TELEGRAM_HELP]


async def test_a_file_over_telegrams_download_limit_gets_a_clear_reply(
    tg: FakeTelegram, service: BotService, inbox: Inbox
) -> None:
    ann = tg.user(1001)
    await service.agree(UserRef("telegram", str(ann.id)))
    async with serving(service, inbox, telegram_settings(tg)):
        tg.send_document(ann, b"\xff\xd8", file_name="huge.jpg", file_size=25 * 1024 * 1024)
        answer = await tg.wait_text(ann.id, "huge.jpg")
    assert answer["text"].splitlines() == [
        texts.photo_unreceived("photo 1 (huge.jpg)", texts.TELEGRAM_FILE_TOO_BIG.format(limit_mb=20)),
        texts.enrollment_standing(0, service.settings.min_photos, service.settings.max_photos),
    ]
    assert tg.calls_of("getFile") == []


async def test_progress_is_edited_at_most_once_per_interval(tg: FakeTelegram) -> None:
    ann = tg.user(1001)
    tg.send_text(ann, "hello")  # opens the private chat
    async with Bot(TOKEN, base_url=tg.base_url, base_file_url=tg.base_file_url) as bot:
        channel = Channel(bot, ann.id, None, interval=0.4)
        progress = await channel.open_progress("drawing...")
        for step in range(1, 21):
            await progress.update(f"drawing: step {step}/20")
            await asyncio.sleep(0.05)
        await progress.finish("Here it is.")
    edits = tg.calls_of("editMessageText")
    gaps = [b.at - a.at for a, b in zip(edits[:-1], edits[1:-1])]
    assert 2 <= len(edits) <= 5
    assert all(gap >= 0.39 for gap in gaps), gaps
    assert edits[-1].params["text"] == "Here it is."
    assert tg.texts_in(ann.id) == ["Here it is."]


# --- chats, errors, webhook ------------------------------------------------------------------------


async def test_errors_and_stray_messages_get_friendly_replies(
    tg: FakeTelegram, service: BotService, inbox: Inbox
) -> None:
    ann = tg.user(1001)
    async with serving(service, inbox, telegram_settings(tg)):
        tg.send_text(ann, "/draw me")
        await tg.wait_text(ann.id, texts.CONSENT_REQUIRED)
        tg.send_text(ann, "/draw --style nosuch me")
        await tg.wait_text(ann.id, "There is no style called 'nosuch'")
        tg.send_text(ann, "/styles")
        await tg.wait_text(ann.id, "Styles for /preview and /draw")
        tg.send_text(ann, "/dance")
        await tg.wait_text(ann.id, texts.UNKNOWN_COMMAND.format(command="/dance"))
        tg.send_text(ann, "hello")
        await tg.wait_text(ann.id, texts.NOT_A_COMMAND)
        tg.send_text(ann, "/photo")
        await tg.wait_text(ann.id, texts.TELEGRAM_SEND_PHOTOS)
        tg.send_text(ann, "/agree")
        await tg.wait_text(ann.id, "consent is recorded")
        tg.send_text(ann, "/draw")
        await tg.wait_text(ann.id, texts.EMPTY_PROMPT)
        tg.send_text(ann, "/draw --zoom 2 me")
        await tg.wait_text(ann.id, texts.UNKNOWN_OPTION.format(option="--zoom"))
        tg.send_text(ann, "/preview --boost")  # the boost is for drawing from a trained model
        await tg.wait_text(ann.id, texts.UNKNOWN_OPTION.format(option="--boost"))
        tg.send_text(ann, "/train")
        await tg.wait_text(ann.id, "You have 0 accepted photo(s)")
        tg.send_photo(ann, faceless_photo(100))  # too small: refused at the boundary
        await tg.wait_text(ann.id, "photo 1: refused, the image is too small")


async def test_groups_get_commands_only_answered_in_private(
    tg: FakeTelegram, service: BotService, inbox: Inbox
) -> None:
    ann, bob, carol = tg.user(1001, "Ann"), tg.user(1002, "Bob"), tg.user(1003, "Carol")
    tg.group(GROUP)
    tg.group(GROUP - 1, "Strangers")
    tg.send_text(ann, "/help")  # Ann has a private chat with the bot; Bob never wrote to it
    settings = telegram_settings(tg, allowed_chats=(GROUP, ann.id, bob.id))
    async with serving(service, inbox, settings):
        await tg.wait_text(ann.id, "Commands:")
        tg.send_text(ann, "/status", chat_id=GROUP)
        await tg.wait_text(ann.id, texts.STATUS_NOT_CONSENTED)
        await tg.wait_text(GROUP, texts.TELEGRAM_ANSWERED_PRIVATELY)

        tg.send_text(bob, "/status", chat_id=GROUP)
        await tg.wait_text(GROUP, texts.TELEGRAM_PRIVATE_ONLY)

        tg.send_photo(ann, face_photo(0), chat_id=GROUP)  # not a command: ignored in groups
        tg.send_text(ann, "/help", chat_id=GROUP)
        await tg.wait_text(GROUP, "Commands:")

        tg.send_text(ann, "/status", chat_id=GROUP - 1)  # a group not in allowed_chats
        await tg.wait_text(GROUP - 1, texts.TELEGRAM_PRIVATE_ONLY)

        tg.send_text(carol, "/start")  # a private chat not in allowed_chats
        await tg.wait_text(carol.id, texts.TELEGRAM_NOT_ALLOWED)
        await asyncio.sleep(0.3)

    assert tg.texts_in(GROUP) == [
        texts.TELEGRAM_ANSWERED_PRIVATELY, texts.TELEGRAM_PRIVATE_ONLY, texts.TELEGRAM_HELP
    ]
    assert tg.texts_in(bob.id) == []
    assert tg.downloads == []


async def test_webhook_mode_checks_the_secret_token(tg: FakeTelegram, service: BotService, inbox: Inbox) -> None:
    ann = tg.user(1001)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = telegram_settings(
        tg, webhook_url="https://bot.example/telegram", webhook_port=port, webhook_path="telegram"
    )
    async with serving(service, inbox, settings, webhook_secret="s3cret"):
        url = f"http://127.0.0.1:{port}/telegram"
        async with aiohttp.ClientSession() as http:
            await listening(http, url)
            for secret in (None, "wrong"):
                headers = {"X-Telegram-Bot-Api-Secret-Token": secret} if secret else {}
                async with http.post(url, json=tg.text_update(ann, "/help"), headers=headers) as response:
                    assert response.status == 403
            headers = {"X-Telegram-Bot-Api-Secret-Token": "s3cret"}
            async with http.post(url, json=tg.text_update(ann, "/help"), headers=headers) as response:
                assert response.status == 200
        await tg.wait_text(ann.id, "Commands:")
    webhook = tg.calls_of("setWebhook")[0].params
    assert webhook["url"] == "https://bot.example/telegram"
    assert webhook["secret_token"] == "s3cret"
    assert tg.texts_in(ann.id) == [texts.TELEGRAM_HELP]
    assert tg.calls_of("getUpdates") == []


# --- settings and metadata -------------------------------------------------------------------------


def test_settings_refuse_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="base_file_url"):
        TelegramSettings(base_url="http://127.0.0.1:8081/bot")
    with pytest.raises(ValueError, match="https"):
        TelegramSettings(webhook_url="http://bot.example/hook")
    assert TelegramSettings().download_limit == TELEGRAM_DOWNLOAD_LIMIT
    own_server = TelegramSettings(base_url="http://h/bot", base_file_url="http://h/file/bot")
    assert own_server.download_limit is None
    assert "token" not in {f for f in TelegramSettings.__dataclass_fields__}


# --- packs -------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_pack_is_one_progress_message_then_one_album(
    tg: FakeTelegram, service: BotService, inbox: Inbox, db: Database, worker: None
) -> None:
    ann = tg.user(1001)
    user = UserRef("telegram", str(ann.id))
    await service.agree(user)
    await service.add_photos(user, [Upload(f"selfie-{n}.jpg", face_photo(n)) for n in range(3)])
    await service.train(user)
    async with serving(service, inbox, telegram_settings(tg)):
        tg.send_text(ann, "/pack")
        listed = await tg.wait_text(ann.id, "Packs (send /pack NAME")
        tg.send_text(ann, "/pack portraits")
        done = await tg.wait_text(ann.id, "Your pack Portraits")
        album = await tg.wait_for(lambda: [m for m in photos_in(tg, ann.id) if "media_group_id" in m][7:])

    assert "portraits: Portraits, 8 images." in listed["text"]
    pack_messages = tg.sent_to(ann.id)[1:]  # after the list: the progress message, then the album
    assert pack_messages[0] is done  # the one progress message, edited into the result
    assert [m for m in pack_messages if "text" in m] == [done]
    photos = [m for m in pack_messages if "photo" in m]
    assert len(photos) == 8 and len({m["media_group_id"] for m in photos}) == 1
    assert all("reply_markup" not in m for m in photos)  # albums carry no buttons
    assert [m["caption"].split(": ")[0] for m in photos] == [f"image {n}" for n in range(1, 9)]
    assert album
    edits = [str(c.params["text"]) for c in tg.calls_of("editMessageText") if c.params.get("message_id") == done["message_id"]]
    counts = [int(t.split(": ")[1].split(" of ")[0]) for t in edits if t.startswith("Pack Portraits: ")]
    assert counts and counts == sorted(counts)  # one message, edited as the images come (throttled)

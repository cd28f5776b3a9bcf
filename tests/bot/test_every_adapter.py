"""Each concept the adapters share (bot.chat and bot.replies), run through every adapter: the
console over text streams, Telegram's python-telegram-bot against the fake Bot API server, and
discord.py against the fake Discord, all over one real service (SQLite, blob store, Valkey).

The same user action must get the same reply on every platform; where a platform draws a concept
its own way (a consent button, a typed /agree) the test says how, and checks the outcome.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from bot import texts
from bot.chat.actions import Verb, decode
from bot.console import ConsoleAdapter
from bot.errors import ConsentRequired, NotEnoughPhotos
from bot.inbox import Inbox
from bot.jobs import JobClient
from bot.options import parse_options
from bot.service import BotService, UserRef
from bot.settings import BotSettings
from bot.telegram.adapter import PLATFORM as TELEGRAM
from engine.api import QUEUE_INTERACTIVE, Refusal
from storage.blobs import LocalBlobStore
from storage.db import Database
from tests.bot.discord_http import FakeDiscord, Person, Place, custom_ids
from tests.bot.fake_telegram import FakeTelegram
from tests.bot.test_discord import TOKEN as DISCORD_TOKEN
from tests.bot.test_discord import command, edit_of, followup_of, press
from tests.bot.test_discord import serving as serving_discord
from tests.bot.test_service import consented, seed_accepted
from tests.bot.test_telegram import button, telegram_settings
from tests.bot.test_telegram import serving as serving_telegram

MAX_UPLOAD = 1024 * 1024  # small, so that a file over it costs nothing to make
ADAPTERS = ["console", "telegram", "discord"]


class Front(Protocol):
    """One user talking to the bot through one adapter."""

    user: UserRef

    async def say(self, command: str, *, until: str) -> str:
        """Send a command (no arguments) and return the text of the reply containing ``until``."""

    async def send_files(self, files: list[tuple[str, Path]], *, until: str) -> str:
        """Send files as one message (an album, one command's attachments, one /photo line)."""

    async def agree(self) -> str:
        """Take up the consent offer of /start the way the platform shows it; the answer's text."""

    async def ask(self, line: str) -> None:
        """Send a /preview or /draw line, options before the prompt (Discord: the slash command's
        options), without waiting for the answer."""


class ConsoleFront:
    def __init__(self, service: BotService, out_dir: Path) -> None:
        self.user = UserRef("console", "tester")
        self._service = service
        self._out_dir = out_dir
        self._asked: list[asyncio.Task[str]] = []

    async def _run(self, line: str) -> str:
        stdout = io.StringIO()
        console = ConsoleAdapter(
            self._service, user=self.user, out_dir=self._out_dir, stdin=io.StringIO(line + "\n"), stdout=stdout
        )
        await console.run()
        return stdout.getvalue().rstrip("\n")

    async def say(self, command: str, *, until: str) -> str:
        out = await self._run(command)
        assert until in out, out
        return out

    async def send_files(self, files: list[tuple[str, Path]], *, until: str) -> str:
        return await self.say("/photo " + " ".join(f"'{path}'" for _, path in files), until=until)

    async def agree(self) -> str:
        start = await self.say("/start", until="/agree")  # the console offers consent as a command
        assert start
        return await self.say("/agree", until="consent")

    async def ask(self, line: str) -> None:
        self._asked.append(asyncio.create_task(self._run(line)))

    async def close(self) -> None:
        """Stop the console sessions still waiting for a job."""
        for task in self._asked:
            task.cancel()
        await asyncio.gather(*self._asked, return_exceptions=True)


class TelegramFront:
    def __init__(self, tg: FakeTelegram) -> None:
        self._tg = tg
        self._ann = tg.user(1001)
        self.user = UserRef(TELEGRAM, str(self._ann.id))
        self._albums = 0

    async def _answer(self, until: str, sent_before: int) -> str:
        async def found() -> str:
            while True:
                texts_now = self._tg.texts_in(self._ann.id)[sent_before:]
                match = next((t for t in texts_now if until in t), None)
                if match is not None:
                    return match
                await asyncio.sleep(0.02)

        return await asyncio.wait_for(found(), 20)

    async def say(self, command: str, *, until: str) -> str:
        before = len(self._tg.texts_in(self._ann.id))
        self._tg.send_text(self._ann, command)
        return await self._answer(until, before)

    async def send_files(self, files: list[tuple[str, Path]], *, until: str) -> str:
        before = len(self._tg.texts_in(self._ann.id))
        self._albums += 1
        for name, path in files:
            data = path.read_bytes()[:16]  # what it claims is what counts: never fetched when too big
            self._tg.send_document(
                self._ann, data if path.stat().st_size <= 16 else b"\xff\xd8",
                file_name=name, file_size=path.stat().st_size, media_group_id=f"album-{self._albums}",
            )
        return await self._answer(until, before)

    async def agree(self) -> str:
        await self.say("/start", until="biometric")
        offer = next(m for m in self._tg.sent_to(self._ann.id) if "reply_markup" in m)
        data = next(
            key["callback_data"] for row in offer["reply_markup"]["inline_keyboard"] for key in row
        )
        action = decode(data)
        assert action is not None and action.verb is Verb.AGREE, data
        assert data == button(offer, texts.BUTTON_LABELS[Verb.AGREE])
        before = len(self._tg.texts_in(self._ann.id))
        self._tg.press(self._ann, offer, data)
        return await self._answer("consent", before)

    async def ask(self, line: str) -> None:
        self._tg.send_text(self._ann, line)


class DiscordFront:
    def __init__(self, fake: FakeDiscord, place: Place) -> None:
        self._fake = fake
        self._place = place
        self._alice = Person.new("alice")
        self.user = UserRef("discord", str(self._alice.id))

    async def say(self, name: str, *, until: str) -> str:
        payload = await command(self._fake, self._alice, self._place, name.removeprefix("/"))
        edit = await self._fake.wait_for(edit_of(payload, until), timeout=20)
        return str(edit.json["content"])

    async def send_files(self, files: list[tuple[str, Path]], *, until: str) -> str:
        attachments = {}
        for number, (name, path) in enumerate(files, start=1):
            data = path.read_bytes() if path.stat().st_size <= MAX_UPLOAD else b"..."
            attachment = self._fake.attachment(self._place.channel_id, name, data, "image/jpeg")
            attachments[f"photo{number}"] = {**attachment, "size": path.stat().st_size}
        payload = await command(self._fake, self._alice, self._place, "enroll", attachments=attachments)
        edit = await self._fake.wait_for(edit_of(payload, until), timeout=20)
        return str(edit.json["content"])

    async def agree(self) -> str:
        start = await command(self._fake, self._alice, self._place, "start")
        await self._fake.wait_for(edit_of(start, "biometric"), timeout=20)
        message = self._fake.original_response(int(start["id"]))
        (data,) = custom_ids(message)
        action = decode(data)
        assert action is not None and action.verb is Verb.AGREE, data
        pressed = await press(self._fake, self._alice, self._place, message, data)
        recorded = await self._fake.wait_for(followup_of(pressed), timeout=20)
        return str(recorded.json["content"])

    async def ask(self, line: str) -> None:
        name, _, rest = line.removeprefix("/").partition(" ")
        typed = parse_options(rest)  # the same request, as Discord's options: those left unset are not sent
        given: dict[str, Any] = {
            "prompt": typed.prompt, "style": typed.style, "aspect": typed.aspect, "boost": typed.boost, "fast": typed.fast
        }
        options = {option: value for option, value in given.items() if value}
        await command(self._fake, self._alice, self._place, name, options=options)


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    async with Database.open(tmp_path / "avatarbooth.sqlite3") as database:
        yield database


@pytest.fixture
def blobs(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


@pytest.fixture
async def jobs(valkey_url: str) -> AsyncIterator[JobClient]:
    async with await JobClient.connect(valkey_url, poll_delay=0.02) as client:
        yield client


@pytest.fixture
def service(db: Database, blobs: LocalBlobStore, jobs: JobClient) -> BotService:
    settings = BotSettings(max_upload_bytes=MAX_UPLOAD, interactive_timeout_s=60, training_timeout_s=120)
    return BotService(db, blobs, jobs, settings, preset_name="tiny")


@pytest.fixture(params=ADAPTERS)
async def front(request: pytest.FixtureRequest, service: BotService, db: Database, tmp_path: Path) -> AsyncIterator[Front]:
    if request.param == "console":
        console = ConsoleFront(service, tmp_path / "out")
        try:
            yield console
        finally:
            await console.close()
    elif request.param == "telegram":
        async with FakeTelegram() as tg:
            settings = telegram_settings(tg, shutdown_grace_s=0.5)  # a job no worker runs is cut off at the stop
            async with serving_telegram(service, Inbox(db, TELEGRAM), settings):
                yield TelegramFront(tg)
    else:
        place = Place.guild_channel()
        async with FakeDiscord(tmp_path, token=DISCORD_TOKEN) as fake, serving_discord(fake, service, place):
            yield DiscordFront(fake, place)


def standing(service: BotService, accepted: int) -> str:
    return texts.enrollment_standing(accepted, service.settings.min_photos, service.settings.max_photos)


# --- the concepts ----------------------------------------------------------------------------------


async def test_the_consent_offer_is_taken_up_the_platforms_way_and_recorded(
    front: Front, service: BotService, db: Database
) -> None:
    answer = await front.agree()
    assert answer.startswith("Thank you, your consent is recorded."), answer
    account = await db.get_or_create_user(front.user.platform, front.user.platform_user_id)
    assert await db.has_consent(account.id)


async def test_one_upload_intake_numbers_files_as_sent_and_answers_once(
    front: Front, service: BotService, tmp_path: Path
) -> None:
    await service.agree(front.user)
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"my holiday notes")
    huge = tmp_path / "huge.jpg"
    with huge.open("wb") as handle:
        handle.truncate(MAX_UPLOAD + 1)  # sparse: costs no disk
    letter = tmp_path / "letter.txt"
    letter.write_bytes(b"dear diary")

    files = [("notes.txt", notes), ("huge.jpg", huge), ("letter.txt", letter)]
    reply = await front.send_files(files, until=standing(service, 0))

    not_an_image = texts.refusal(Refusal.NOT_AN_IMAGE, service.settings)
    too_large = texts.refusal(Refusal.FILE_TOO_LARGE, service.settings)
    assert reply.splitlines() == [
        texts.photo_refused("photo 1 (notes.txt)", not_an_image),
        texts.photo_refused("photo 2 (huge.jpg)", too_large),  # refused unread, numbered as sent
        texts.photo_refused("photo 3 (letter.txt)", not_an_image),
        standing(service, 0),
    ]


async def test_a_failure_gets_the_same_reply_that_says_what_to_do(front: Front, service: BotService) -> None:
    expected_consent = ConsentRequired().user_message
    reply = await front.say("/photos", until=expected_consent.splitlines()[0])
    assert expected_consent in reply

    await service.agree(front.user)
    expected = NotEnoughPhotos(0, service.settings.min_photos).user_message
    reply = await front.say("/preview", until=expected)
    assert expected in reply


async def queued_requests(jobs: JobClient, count: int) -> dict[str, dict[str, Any]]:
    """The requests of the first ``count`` jobs on the interactive queue (no worker takes them), by job
    name, as a worker would receive them."""
    async with asyncio.timeout(20):
        while len(queued := await jobs.redis.queued_jobs(queue_name=QUEUE_INTERACTIVE)) < count:
            await asyncio.sleep(0.02)
    return {job.function: job.args[0] for job in queued}


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "default"])
async def test_fast_asks_for_few_step_mode_and_its_absence_leaves_the_workers_default(
    front: Front, service: BotService, db: Database, blobs: LocalBlobStore, jobs: JobClient, fast: bool
) -> None:
    # Discord: /preview and /draw with the boolean option fast set, or left unset.
    user_id = await consented(service, db, front.user)
    await seed_accepted(db, blobs, user_id, service.settings.min_photos)
    flag = " --fast" if fast else ""
    await front.ask(f"/preview{flag}")
    await front.ask(f"/draw{flag} me as an astronaut")
    requests = await queued_requests(jobs, 2)
    expected = True if fast else None
    assert {name: request["fast"] for name, request in requests.items()} == {"preview": expected, "draw": expected}
    assert requests["draw"]["prompt"] == "me as an astronaut"


@pytest.mark.parametrize("front", ["console", "telegram"], indirect=True)  # on Discord, fast is a boolean
async def test_a_fast_with_a_value_or_given_twice_is_refused_before_anything_is_queued(
    front: Front, service: BotService, db: Database, blobs: LocalBlobStore
) -> None:
    user_id = await consented(service, db, front.user)
    await seed_accepted(db, blobs, user_id, service.settings.min_photos)
    for line, refusal in [
        ("/draw --fast=x me", texts.UNKNOWN_OPTION.format(option="--fast=x")),
        ("/preview --fast=yes", texts.UNKNOWN_OPTION.format(option="--fast=yes")),
        ("/draw --fast --ar 3:4 --fast me", texts.REPEATED_OPTION.format(option="--fast")),
        ("/preview --fast --fast", texts.REPEATED_OPTION.format(option="--fast")),
    ]:
        assert refusal in await front.say(line, until=refusal)
    assert await db.list_jobs(user_id) == []

"""Telegram load benchmark: N simulated users enrolling and drawing at once, through the fake Bot API.

Everything is real but Telegram itself: python-telegram-bot and the adapter (bot.telegram_adapter),
BotService, SQLite, the blob store, an embedded Valkey, and the engine worker on the tiny preset in
its own process (as `avatarbooth run` has it). Telegram is the fake server of the tests
(tests/bot/fake_telegram.py), in this process.

Every user, all at once: /start, presses "I agree", sends an album of 3 selfies, then /draw.
Time to first reply is measured per action, from the moment the update is queued on the fake server
to the bot's first message in that user's chat (for the album and /draw that is the progress message
that later shows the result). Uploads are counted from the database and from the answers: lost is a
photo sent but neither stored nor answered, duplicated is one stored or answered twice.

    python bench/telegram_load.py                 # 200 users
    python bench/telegram_load.py --users 50 --no-draw

Prints one JSON object. The bot's own rate limiter is raised to --messages-per-second (default 1000):
the fake server has no flood limit, and with Telegram's 30 messages/s no bot can answer 200 users in
one second. The target (p99 <= 1 s with the tiny preset, 0 lost) is in "targets".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bot import texts  # noqa: E402
from bot.jobs import JobClient  # noqa: E402
from bot.service import BotService  # noqa: E402
from bot.settings import BotSettings  # noqa: E402
from bot.telegram_adapter import TelegramSettings, serve_telegram  # noqa: E402
from storage.blobs import LocalBlobStore  # noqa: E402
from storage.db import Database  # noqa: E402
from tests.bot.fake_telegram import TOKEN, FakeTelegram, FakeUser  # noqa: E402
from tests.support import face_photo  # noqa: E402

PHOTOS_PER_USER = 3
FIRST_USER_ID = 10_000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--no-draw", action="store_true", help="enrol only")
    parser.add_argument("--messages-per-second", type=float, default=1000.0)
    parser.add_argument("--album-wait", type=float, default=0.5, help="album debounce, seconds")
    parser.add_argument("--timeout", type=float, default=600.0, help="for the whole run, seconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="avatarbooth-bench-") as folder:
        result = asyncio.run(run(Path(folder), args))
    print(json.dumps(result, indent=2))
    return 0


async def run(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    from avatarbooth.valkey import EmbeddedValkey
    from engine.tiny import build_tiny_preset

    models = folder / "models"
    build_tiny_preset(models / "tiny")
    blobs_dir = folder / "blobs"
    photos = [face_photo(n) for n in range(PHOTOS_PER_USER)]
    with EmbeddedValkey(folder / "valkey") as valkey:
        async with worker_process(valkey.url, models, blobs_dir, folder / "worker.log"):
            async with (
                Database.open(folder / "db.sqlite3") as db,
                await JobClient.connect(valkey.url) as jobs,
            ):
                bot_settings = BotSettings(draw_num_images=1, draws_per_hour=1000)
                service = BotService(db, LocalBlobStore(blobs_dir), jobs, bot_settings, preset_name="tiny")
                async with FakeTelegram() as tg:
                    tg.poll_timeout_cap_s = 30.0
                    settings = TelegramSettings(
                        enabled=True,
                        base_url=tg.base_url,
                        base_file_url=tg.base_file_url,
                        album_wait_s=args.album_wait,
                        messages_per_second=args.messages_per_second,
                        poll_timeout_s=10,
                    )
                    users = [tg.user(FIRST_USER_ID + n, f"user{n}") for n in range(args.users)]
                    async with serving(service, settings):
                        started = time.monotonic()
                        outcomes = await asyncio.wait_for(
                            asyncio.gather(
                                *(journey(tg, user, photos, draw=not args.no_draw) for user in users),
                                return_exceptions=True,
                            ),
                            args.timeout,
                        )
                        wall_s = time.monotonic() - started
                    return await report(tg, db, users, outcomes, wall_s, args)


async def journey(tg: FakeTelegram, user: FakeUser, photos: list[bytes], *, draw: bool) -> dict[str, float]:
    """One user's way through the bot; returns the time to first reply of each action, seconds."""
    firsts: dict[str, float] = {}
    await asyncio.sleep(0)
    t0 = time.monotonic()
    tg.send_text(user, "/start")
    consent = await tg.wait_text(user.id, "Welcome to AvatarBooth", timeout=300)
    firsts["start"] = first_reply(tg, user.id, t0)

    t0 = time.monotonic()
    agree = next(b["callback_data"] for row in consent["reply_markup"]["inline_keyboard"] for b in row)
    tg.press(user, consent, agree)
    await tg.wait_text(user.id, "consent is recorded", timeout=300)
    firsts["agree"] = first_reply(tg, user.id, t0)

    t0 = time.monotonic()
    for photo in photos:
        tg.send_photo(user, photo, media_group_id=f"album-{user.id}")
    await tg.wait_text(user.id, f"{PHOTOS_PER_USER} of 3 photos", timeout=300)
    firsts["album"] = first_reply(tg, user.id, t0)

    if draw:
        t0 = time.monotonic()
        tg.send_text(user, "/draw me as an astronaut")
        await tg.wait_text(user.id, "image 1:", timeout=300)
        firsts["draw"] = first_reply(tg, user.id, t0)
    return firsts


def first_reply(tg: FakeTelegram, chat_id: int, since: float) -> float:
    times = [
        c.at for c in tg.calls
        if c.status == 200 and c.method in ("sendMessage", "sendPhoto", "sendDocument")
        and c.params.get("chat_id") == chat_id and c.at >= since
    ]
    return min(times) - since


async def report(
    tg: FakeTelegram,
    db: Database,
    users: list[FakeUser],
    outcomes: list[dict[str, float] | BaseException],
    wall_s: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    samples: dict[str, list[float]] = {}
    failures = [repr(o) for o in outcomes if isinstance(o, BaseException)]
    for outcome in outcomes:
        if isinstance(outcome, dict):
            for kind, seconds in outcome.items():
                samples.setdefault(kind, []).append(seconds)
    lost = duplicated = 0
    for user in users:
        account = await db.get_or_create_user("telegram", str(user.id))
        stored = len(await db.list_photos(account.id))
        lost += max(0, PHOTOS_PER_USER - stored)
        duplicated += max(0, stored - PHOTOS_PER_USER)
        answers = [t for t in tg.texts_in(user.id) if "photo 1: " in t]
        duplicated += max(0, len(answers) - 1)
    every = [s for kind in samples.values() for s in kind]
    p99 = percentile(every, 99)
    return {
        "users": len(users),
        "actions_per_user": ["start", "agree", "album of 3"] + ([] if args.no_draw else ["draw"]),
        "completed_users": len(users) - len(failures),
        "failures": failures[:5],
        "wall_s": round(wall_s, 2),
        "time_to_first_reply_s": {
            "p50": round(percentile(every, 50), 3),
            "p99": round(p99, 3),
            "max": round(max(every, default=0.0), 3),
            **{
                kind: {"p50": round(percentile(v, 50), 3), "p99": round(percentile(v, 99), 3)}
                for kind, v in samples.items()
            },
        },
        "uploads": {
            "sent": len(users) * PHOTOS_PER_USER,
            "lost": lost,
            "duplicated": duplicated,
        },
        "bot_api_calls": len(tg.calls),
        "settings": {
            "preset": "tiny",
            "messages_per_second": args.messages_per_second,
            "album_wait_s": args.album_wait,
            "cpus": os.cpu_count(),
        },
        "targets": {
            "p99_time_to_first_reply_le_1s": p99 <= 1.0,
            "zero_lost_uploads": lost == 0,
            "zero_duplicated_uploads": duplicated == 0,
        },
        "note": texts.TINY_NOTE,
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


@asynccontextmanager
async def serving(service: BotService, settings: TelegramSettings) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(serve_telegram(service, settings, TOKEN, stop=stop))
    try:
        yield
    finally:
        stop.set()
        await task


@asynccontextmanager
async def worker_process(redis_url: str, models: Path, blobs: Path, log: Path) -> AsyncIterator[None]:
    """The engine worker on the tiny preset in its own process, as `avatarbooth run` starts it."""
    from redis.asyncio import Redis

    from engine.api import WORKER_KEY_PREFIX

    code = (
        "import asyncio; from pathlib import Path\n"
        "from engine.settings import EngineSettings\n"
        "from engine.worker import run_worker\n"
        f"asyncio.run(run_worker(EngineSettings(preset='tiny', models_dir=Path({str(models)!r}), "
        f"blobs_dir=Path({str(blobs)!r}), redis_url={redis_url!r})))\n"
    )
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
            # One thread for torch: on a small machine the chat side keeps a core (in production
            # the worker has a GPU host of its own).
            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        )
    redis = Redis.from_url(redis_url)
    try:
        while not await redis.keys(f"{WORKER_KEY_PREFIX}*"):
            if process.poll() is not None:
                raise RuntimeError(f"the worker stopped while starting; see {log.read_text()[-2000:]}")
            await asyncio.sleep(0.1)
        yield
    finally:
        await redis.aclose()
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())

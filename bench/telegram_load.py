"""Telegram load benchmark: N simulated users enrolling and drawing at once, through the fake Bot API.

The bot runs as an operator runs it: `avatarbooth run --config CFG` in its own process, with the
embedded Valkey and the engine worker on the tiny preset (python-telegram-bot, the adapter,
BotService, SQLite, the blob store: all real). Telegram is the fake Bot API server of the tests
(tests/bot/fake_telegram.py), in this process, together with the simulated users; so the bot's
event loop does the bot's work only, as it would against the real Telegram.

Every user, all at once: /start, presses "I agree", sends an album of 3 selfies, then /draw.
Time to first reply is measured per action, from the moment the update is queued on the fake server
to the bot's first message in that user's chat (for the album and /draw that is the progress message
that later shows the result). One warm-up user goes through the same journey first and is not
counted. Uploads are counted from the bot's database once it has stopped and from the answers:
lost is a photo sent but neither stored nor answered, duplicated is one stored or answered twice.

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
import re
import signal
import statistics
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
from storage.db import Database  # noqa: E402
from tests.bot.fake_telegram import TOKEN, FakeTelegram, FakeUser  # noqa: E402
from tests.support import face_photo  # noqa: E402

PHOTOS_PER_USER = 3
FIRST_USER_ID = 10_000
WARM_UP_USER_ID = 9_999
ANSWER_LINE = re.compile(r"^photo \d+: ", re.MULTILINE)


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
    from engine.tiny.models import build_tiny_preset

    build_tiny_preset(folder / "models" / "tiny")
    photos = [face_photo(n) for n in range(PHOTOS_PER_USER)]
    async with FakeTelegram() as tg:
        tg.poll_timeout_cap_s = 30.0
        config = write_config(folder, tg, args)
        users = [tg.user(FIRST_USER_ID + n, f"user{n}") for n in range(args.users)]
        async with bot_process(config, tg, folder / "bot.log"):
            await journey(tg, tg.user(WARM_UP_USER_ID, "warm-up"), photos, draw=not args.no_draw)
            started = time.monotonic()
            outcomes = await asyncio.wait_for(
                asyncio.gather(
                    *(journey(tg, user, photos, draw=not args.no_draw) for user in users),
                    return_exceptions=True,
                ),
                args.timeout,
            )
            wall_s = time.monotonic() - started
        async with Database.open(folder / "data" / "avatarbooth.sqlite3") as db:
            return await report(tg, db, users, outcomes, wall_s, args)


def write_config(folder: Path, tg: FakeTelegram, args: argparse.Namespace) -> Path:
    config = folder / "config.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{folder / "data"}"\n'
        f'[engine]\npreset = "tiny"\nmodels_dir = "{folder / "models"}"\n'
        "[limits]\ndraws_per_hour = 1000\nimages_per_draw = 1\n"
        f'[telegram]\nenabled = true\nbase_url = "{tg.base_url}"\nbase_file_url = "{tg.base_file_url}"\n'
        f"album_wait_s = {args.album_wait}\nmessages_per_second = {args.messages_per_second}\n"
        "poll_timeout_s = 10\n"
    )
    return config


@asynccontextmanager
async def bot_process(config: Path, tg: FakeTelegram, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`avatarbooth run` serving the fake server; yields it once it polls, stops it with SIGTERM."""
    env = {
        **os.environ,
        "TELEGRAM_TOKEN": TOKEN,
        "PYTHONPATH": str(ROOT),
        # One thread for torch: on a small machine the chat side keeps a core (in production
        # the worker has a GPU host of its own).
        "OMP_NUM_THREADS": "1",
    }
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "avatarbooth", "run", "--config", str(config),
            cwd=ROOT, env=env, stdout=output, stderr=output,
        )
    polls = len(tg.calls_of("getUpdates"))  # a second bot on the same server: its own first poll
    try:
        while len(tg.calls_of("getUpdates")) <= polls:
            if process.returncode is not None:
                raise RuntimeError(f"the bot stopped while starting:\n{log.read_text()[-3000:]}")
            await asyncio.sleep(0.1)
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 60)
        except TimeoutError:
            process.kill()
            await process.wait()


async def journey(tg: FakeTelegram, user: FakeUser, photos: list[bytes], *, draw: bool) -> dict[str, float]:
    """One user's way through the bot; returns when each action was sent (time.monotonic())."""
    sent: dict[str, float] = {}
    await asyncio.sleep(0)
    t0 = time.monotonic()
    tg.send_text(user, "/start")
    consent = await tg.wait_text(user.id, "Welcome to AvatarBooth", timeout=300)
    sent["start"] = t0

    t0 = time.monotonic()
    agree = next(b["callback_data"] for row in consent["reply_markup"]["inline_keyboard"] for b in row)
    tg.press(user, consent, agree)
    await tg.wait_text(user.id, "consent is recorded", timeout=300)
    sent["agree"] = t0

    t0 = time.monotonic()
    for photo in photos:
        tg.send_photo(user, photo, media_group_id=f"album-{user.id}")
    await tg.wait_text(user.id, f"{PHOTOS_PER_USER} of 3 photos", timeout=300)
    sent["album"] = t0

    if draw:
        t0 = time.monotonic()
        tg.send_text(user, "/draw me as an astronaut")
        await tg.wait_text(user.id, "image 1:", timeout=300)
        sent["draw"] = t0
    return sent


def first_replies(tg: FakeTelegram) -> dict[int, list[float]]:
    """When the bot's messages reached the server, per chat, in order (computed once, at the end:
    scanning every call after every action would slow the fake server down as it runs)."""
    replies: dict[int, list[float]] = {}
    for call in tg.calls:
        if call.status == 200 and call.method in ("sendMessage", "sendPhoto", "sendDocument"):
            replies.setdefault(int(call.params["chat_id"]), []).append(call.at)
    return replies


def first_reply(replies: list[float], since: float) -> float:
    return min(t for t in replies if t >= since) - since


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
    replies = first_replies(tg)
    for user, outcome in zip(users, outcomes):
        if isinstance(outcome, dict):
            for kind, since in outcome.items():
                samples.setdefault(kind, []).append(first_reply(replies[user.id], since))
    lost = duplicated = split = 0
    odd: list[dict[str, Any]] = []  # the users behind a lost or duplicated count, to look into
    for user in users:
        account = await db.get_or_create_user("telegram", str(user.id))
        stored = len(await db.list_photos(account.id))
        answers = [t for t in tg.texts_in(user.id) if ANSWER_LINE.search(t)]
        answered = sum(len(ANSWER_LINE.findall(t)) for t in answers)
        user_lost = max(0, PHOTOS_PER_USER - max(stored, answered))
        user_duplicated = max(0, stored - PHOTOS_PER_USER) + max(0, answered - PHOTOS_PER_USER)
        lost += user_lost
        duplicated += user_duplicated
        split += len(answers) > 1
        if user_lost or user_duplicated:
            odd.append({"user": user.id, "stored": stored, "answers": answers})
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
            # Albums answered in two messages: items that reached the bot further apart than the
            # album debounce. Nothing is lost or doubled, but the user gets two answers.
            "albums_answered_in_parts": split,
            "examples": odd[:3],
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


if __name__ == "__main__":
    sys.exit(main())

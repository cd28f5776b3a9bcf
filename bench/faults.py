"""Fault benchmark: `avatarbooth run` (Telegram, tiny preset) with its processes killed mid-work.

The bot runs as an operator runs it, in its own process with its embedded Valkey and worker;
Telegram is the fake Bot API server of the tests, in this process, with the simulated users. Each
scenario gets a fresh data folder and user, and SIGKILLs one process while work is under way:

- ``worker_mid_training``: the worker, a fifth into a /train; the supervisor starts another.
- ``valkey_mid_training``: the embedded Valkey, a fifth into a /train; it comes back with its file.
- ``bot_mid_training``: `avatarbooth run` itself; then it is started again on the same folder.
- ``bot_mid_album``: `avatarbooth run`, right after an album of 3 selfies is sent; started again.

Counted per scenario: jobs accepted (commands the bot acknowledged), delivered (their results
reached the chat), lost (accepted, never delivered), duplicated (delivered more than once), the
seconds from the kill to the result, and for the bot kills how long its children outlived it.

    python bench/faults.py            # every scenario; one JSON object at the end
    python bench/faults.py --only worker_mid_training
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.telegram_load import bot_process  # noqa: E402
from tests.bot.fake_telegram import FakeTelegram, FakeUser  # noqa: E402
from tests.support import face_photo  # noqa: E402

SCENARIOS = ("worker_mid_training", "valkey_mid_training", "bot_mid_training", "bot_mid_album")
TRAINING_STEPS = 60
READY = "model v1 is ready"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=SCENARIOS, action="append", help="run these scenarios only")
    parser.add_argument("--timeout", type=float, default=300.0, help="per scenario, seconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="avatarbooth-faults-") as folder:
        results = asyncio.run(run(Path(folder), args.only or list(SCENARIOS), args.timeout))
    print(json.dumps(results, indent=2))
    return 0 if all(r.get("lost") == 0 and r.get("duplicated") == 0 for r in results["scenarios"].values()) else 1


async def run(folder: Path, scenarios: list[str], timeout_s: float) -> dict[str, Any]:
    from engine.tiny.models import build_tiny_preset

    build_tiny_preset(folder / "models" / "tiny")
    results: dict[str, Any] = {}
    for name in scenarios:
        started = time.monotonic()
        try:
            async with FakeTelegram() as tg:
                tg.poll_timeout_cap_s = 5.0
                result = await asyncio.wait_for(SCENARIO_RUNS[name](tg, folder / name, folder / "models"), timeout_s)
        except Exception as e:  # one scenario's failure is its result; the others still run
            result = {"error": f"{type(e).__name__}: {e}"}
        result["wall_s"] = round(time.monotonic() - started, 1)
        results[name] = result
        print(f"[faults] {name}: {json.dumps(result)}", file=sys.stderr)
    return {"scenarios": results, "training_steps": TRAINING_STEPS, "preset": "tiny"}


def write_config(data: Path, models: Path, tg: FakeTelegram) -> Path:
    data.mkdir(parents=True, exist_ok=True)
    config = data / "config.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{data / "data"}"\n'
        f'[engine]\npreset = "tiny"\nmodels_dir = "{models}"\n'
        f"[training]\nsteps = {TRAINING_STEPS}\n"
        "[limits]\nimages_per_draw = 1\n"
        f'[telegram]\nenabled = true\nbase_url = "{tg.base_url}"\nbase_file_url = "{tg.base_file_url}"\n'
        "album_wait_s = 0.5\npoll_timeout_s = 2\n"
    )
    return config


async def agree_and_send_album(tg: FakeTelegram, user: FakeUser) -> None:
    """/start, the consent button, then an album of 3 selfies (not waiting for its answer)."""
    tg.send_text(user, "/start")
    consent = await tg.wait_text(user.id, "Welcome to AvatarBooth", timeout=120)
    agree = next(b["callback_data"] for row in consent["reply_markup"]["inline_keyboard"] for b in row)
    tg.press(user, consent, agree)
    await tg.wait_text(user.id, "consent is recorded", timeout=120)
    for n in range(3):
        tg.send_photo(user, face_photo(n), media_group_id=f"album-{user.id}")


async def enrol(tg: FakeTelegram, user: FakeUser) -> None:
    await agree_and_send_album(tg, user)
    await tg.wait_text(user.id, "3 of 3 photos", timeout=120)


def training_progress(database: Path) -> float:
    """The newest training row's progress, read as another process would (0 when there is none)."""
    if not database.exists():
        return 0.0
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        row = db.execute("SELECT progress FROM jobs WHERE kind = 'train' ORDER BY id DESC LIMIT 1").fetchone()
    return float(row[0]) if row else 0.0


async def until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.1)


def children_of(pid: int) -> dict[str, int]:
    """The worker and Valkey started by ``pid``, by name."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found["valkey" if "valkey-server" in cmdline else "worker"] = int(entry)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def count(tg: FakeTelegram, user: FakeUser, needle: str) -> int:
    return sum(needle in text for text in tg.texts_in(user.id))


def photos_sent(tg: FakeTelegram, user: FakeUser) -> int:
    """The images the bot sent (one per /draw here: images_per_draw = 1)."""
    return sum(1 for message in tg.sent_to(user.id) if message.get("photo"))


def tally(accepted: int, delivered_counts: list[int]) -> dict[str, Any]:
    return {
        "accepted": accepted,
        "delivered": sum(1 for c in delivered_counts if c >= 1),
        "lost": sum(1 for c in delivered_counts if c == 0),
        "duplicated": sum(1 for c in delivered_counts if c > 1),
    }


async def child_mid_training(tg: FakeTelegram, data: Path, models: Path, child: str) -> dict[str, Any]:
    config = write_config(data, models, tg)
    user = tg.user(5001, "Ann")
    async with bot_process(config, tg, data / "bot.log") as process:
        await enrol(tg, user)
        tg.send_text(user, "/train lora")
        await until(lambda: training_progress(data / "data" / "avatarbooth.sqlite3") >= 0.2, 120, "training under way")
        victim = children_of(process.pid)[child]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        await tg.wait_text(user.id, READY, timeout=240)
        recovered_s = time.monotonic() - killed
        tg.send_text(user, "/draw me as an astronaut")
        await tg.wait_text(user.id, "image 1:", timeout=120)
        await asyncio.sleep(2)  # time for a duplicate to show
        restarted = children_of(process.pid).get(child)
    return {
        **tally(2, [count(tg, user, READY), photos_sent(tg, user)]),
        "recover_s": round(recovered_s, 1),
        "restarted": restarted is not None and restarted != victim,
    }


async def bot_killed(tg: FakeTelegram, data: Path, models: Path, *, mid_album: bool) -> dict[str, Any]:
    config = write_config(data, models, tg)
    user = tg.user(5002, "Bo")
    async with bot_process(config, tg, data / "bot.log") as process:
        if mid_album:
            await agree_and_send_album(tg, user)
            await until(lambda: tg.pending_updates() == 0, 30, "the album fetched")
        else:
            await enrol(tg, user)
            tg.send_text(user, "/train lora")
            await until(lambda: training_progress(data / "data" / "avatarbooth.sqlite3") >= 0.2, 120, "training under way")
        children = children_of(process.pid)
        process.kill()
        killed = time.monotonic()
        await process.wait()
        while any(alive(pid) for pid in children.values()) and time.monotonic() - killed < 30:
            await asyncio.sleep(0.05)
        orphans_s = time.monotonic() - killed
        orphans_left = sorted(name for name, pid in children.items() if alive(pid))
    async with bot_process(config, tg, data / "bot-2.log"):
        if mid_album:
            await tg.wait_text(user.id, "3 of 3 photos", timeout=180)
            await asyncio.sleep(2)
            with sqlite3.connect(data / "data" / "avatarbooth.sqlite3") as db:
                stored = db.execute("SELECT COUNT(*) FROM photos WHERE status = 'accepted'").fetchone()[0]
            answers = sum(text.count(": accepted") for text in tg.texts_in(user.id))
            result = tally(3, [1] * min(stored, 3) + [0] * max(0, 3 - stored))
            result["duplicated"] = max(0, answers - 3) + max(0, stored - 3)
        else:
            await tg.wait_text(user.id, READY, timeout=240)
            await asyncio.sleep(2)
            result = tally(1, [count(tg, user, READY)])
        result["recover_s"] = round(time.monotonic() - killed, 1)
    return {**result, "children_outlived_bot_s": round(orphans_s, 2), "orphans_left": orphans_left}


SCENARIO_RUNS: dict[str, Any] = {
    "worker_mid_training": lambda tg, data, models: child_mid_training(tg, data, models, "worker"),
    "valkey_mid_training": lambda tg, data, models: child_mid_training(tg, data, models, "valkey"),
    "bot_mid_training": lambda tg, data, models: bot_killed(tg, data, models, mid_album=False),
    "bot_mid_album": lambda tg, data, models: bot_killed(tg, data, models, mid_album=True),
}

if __name__ == "__main__":
    sys.exit(main())

"""`TELEGRAM_TOKEN=... avatarbooth run --config cfg.toml` as an operator runs it, against the fake Bot API.

The command is a real subprocess: it starts the embedded Valkey and a worker process, and serves
Telegram through the real python-telegram-bot; the test plays a user through the fake server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from pathlib import Path

import pytest

from bot import texts
from bot.chat.actions import Verb
from tests.bot.fake_telegram import TOKEN, FakeTelegram
from tests.bot.test_telegram import button
from tests.support import face_photo

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, tg: FakeTelegram, models: Path, telegram_extra: str) -> Path:
    """`avatarbooth run`'s config: the tiny preset, Telegram on the fake server (plus ``telegram_extra``)."""
    config = tmp_path / "config.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[engine]\npreset = "tiny"\nmodels_dir = "{models}"\n'
        f'[telegram]\nenabled = true\nbase_url = "{tg.base_url}"\nbase_file_url = "{tg.base_file_url}"\n'
        + telegram_extra
    )
    return config


async def test_run_serves_the_journey_on_telegram_and_stops_cleanly(tmp_path: Path, tiny_preset_dir: Path) -> None:
    async with FakeTelegram() as tg:
        config = write_config(tmp_path, tg, tiny_preset_dir.parent, "progress_interval_s = 0.5\n")
        env = {**os.environ, "TELEGRAM_TOKEN": TOKEN}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "avatarbooth", "run", "--config", str(config),
            cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            ann = tg.user(2001, "Ann")
            tg.send_text(ann, "/start")
            consent = await tg.wait_text(ann.id, "Welcome to AvatarBooth", timeout=120)
            tg.press(ann, consent, button(consent, texts.BUTTON_LABELS[Verb.AGREE]))
            await tg.wait_text(ann.id, "your consent is recorded")

            for n in range(3):
                tg.send_photo(ann, face_photo(n), media_group_id="album")
            await tg.wait_text(ann.id, "3 of 3 photos", timeout=60)

            tg.send_text(ann, "/train lora")
            await tg.wait_text(ann.id, "lora model v1 is ready", timeout=120)
            tg.send_text(ann, "/draw me as an astronaut")
            await tg.wait_for(lambda: [c for c in tg.calls_of("sendPhoto") if c.params.get("chat_id") in (ann.id, str(ann.id))], timeout=60)
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()[-3000:]
    logs = stdout + stderr + (tmp_path / "data" / "logs" / "worker.log").read_bytes()
    assert TOKEN.encode() not in logs


async def _serving(config: Path, tg: FakeTelegram, log: Path) -> asyncio.subprocess.Process:
    """`avatarbooth run`, returned once it polls the fake server."""
    polls = len(tg.calls_of("getUpdates"))
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "avatarbooth", "run", "--config", str(config),
            cwd=ROOT, env={**os.environ, "TELEGRAM_TOKEN": TOKEN}, stdout=output, stderr=output,
        )
    await tg.wait_for(lambda: len(tg.calls_of("getUpdates")) > polls or process.returncode is not None, timeout=120)
    assert process.returncode is None, log.read_text()[-3000:]
    return process


async def test_a_bot_killed_mid_album_answers_the_album_once_after_its_restart(
    tmp_path: Path, tiny_preset_dir: Path
) -> None:
    async with FakeTelegram() as tg:
        config = write_config(tmp_path, tg, tiny_preset_dir.parent, "album_wait_s = 0.5\npoll_timeout_s = 2\n")
        first = await _serving(config, tg, tmp_path / "first.log")
        second = None
        try:
            bo = tg.user(2002, "Bo")
            tg.send_text(bo, "/start")
            consent = await tg.wait_text(bo.id, "Welcome to AvatarBooth", timeout=120)
            tg.press(bo, consent, button(consent, texts.BUTTON_LABELS[Verb.AGREE]))
            await tg.wait_text(bo.id, "your consent is recorded")
            for n in range(3):
                tg.send_photo(bo, face_photo(n), media_group_id="album")
            await tg.wait_for(lambda: tg.pending_updates() == 0, timeout=30)  # fetched, not yet answered
            first.kill()  # SIGKILL: nothing is flushed, nothing said
            await first.wait()
            second = await _serving(config, tg, tmp_path / "second.log")
            await tg.wait_text(bo.id, "3 of 3 photos", timeout=180)
            await asyncio.sleep(2)  # time for a second answer to show, if there were one
        finally:
            for process in (first, second):
                if process is not None and process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                    await asyncio.wait_for(process.wait(), timeout=60)
    said = "\n".join(tg.texts_in(bo.id))
    assert said.count(": accepted") == 3  # each photo answered once, none lost
    assert "already" not in said  # not refused as a duplicate of itself
    with sqlite3.connect(tmp_path / "data" / "avatarbooth.sqlite3") as db:
        stored = db.execute("SELECT status, COUNT(*) FROM photos GROUP BY status").fetchall()
    assert stored == [("accepted", 3)]
